"""The generic search spaces (``+hparams_search=soft_prompt|ptuning_v1|ptuning_v2|prefix``): no experiment, any
backbone, data set and template from the command line. They compose with every shipped backbone and data set
(composition only, nothing trains); fitting a space to its trials holds out a stratified part of train when no
``dataset.validation`` is set (and says so) and drops keys the template does not use; a 2-trial search on the tiny
BERT over a JSONL data set whose dev file is not even JSON runs end to end without reading it."""

from __future__ import annotations

import json

import pytest

from ptune.commands import search
from ptune.config import SearchConfig, compose, config_dir, section
from ptune.errors import PtuneError

from .helpers import SENTENCES
from .test_cli import csv_overrides, ptune

GENERIC = ("soft_prompt", "ptuning_v1", "ptuning_v2", "prefix")
BACKBONES = sorted(p.stem for p in (config_dir() / "backbone").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (config_dir() / "dataset").glob("*.yaml"))
# what each shipped data set needs on the command line besides its name (composition reads no file)
NEEDS = {"csv": ["dataset.train_file=t.csv", "dataset.dev_file=d.csv", "dataset.label_names=[a,b]"],
         "tsv": ["dataset.train_file=t.tsv", "dataset.dev_file=d.tsv", "dataset.label_names=[a,b]"],
         "jsonl": ["dataset.train_file=t.jsonl", "dataset.dev_file=d.jsonl", "dataset.label_names=[a,b]"],
         "hf": ["dataset.path=some/folder", "dataset.label_names=[a,b]"]}
TEMPLATES = {"sst2": "sst2_head", "cb": "cb_head", "inews": "inews_head"}


def _spec(name: str) -> SearchConfig:
    return section(compose([f"+hparams_search={name}"]), "search", SearchConfig)


def _ends(spec: SearchConfig) -> list[dict]:
    """The lowest and the highest value of every searched key."""
    pick = lambda v, end: v["choices"][end] if v["type"] == "categorical" else v[("low", "high")[end]]  # noqa: E731
    return [{k: pick(v, end) for k, v in spec.params.items()} for end in (0, -1)]


def _composes(spec: SearchConfig, user: list[str]) -> None:
    for values in _ends(spec):
        cfg = search.compose_trial(search.trial_overrides(spec, user, values))
        assert cfg.method.name == spec.overrides[0].split("=")[1]
        for key, value in values.items():
            group, _, leaf = key.partition(".")
            assert cfg[group][leaf] == value, (key, user)


@pytest.mark.parametrize("name", GENERIC)
def test_generic_spaces_compose_with_every_backbone_and_data_set(name):
    """Each shipped backbone (with SST-2) and each shipped data set (with MiniLM), at both ends of every range;
    composition reads no data and loads no model, and the backbone and data set groups set disjoint keys."""
    spec = _spec(name)
    assert spec.experiment is None and spec.overrides[0] == f"method={name}"
    assert not any(o.startswith("dataset.validation") for o in spec.overrides)  # fit_space holds out
    assert len(BACKBONES) >= 5 and set(NEEDS) <= set(DATASETS)
    for backbone in BACKBONES:
        _composes(spec, [f"backbone={backbone}", *(["backbone.name=some/model"] if backbone == "hf" else []),
                         "dataset=sst2", "template=sst2_head"])
    for dataset in DATASETS:
        _composes(spec, ["backbone=minilm", f"dataset={dataset}", *NEEDS.get(dataset, []),
                         f"template={TEMPLATES.get(dataset, 'sst2_head')}"])


def test_every_method_has_a_generic_space():
    """One generic space per method (the experiment spaces: test_search.py's test_shipped_search_spaces_compose)."""
    from ptune.tuners import METHODS

    assert set(METHODS) == set(GENERIC) <= {p.stem for p in (config_dir() / "hparams_search").glob("*.yaml")}


def _user(tiny_models, tiny_csv, *extra: str) -> list[str]:
    return [*csv_overrides(tiny_models, tiny_csv), *extra]


def test_without_validation_a_search_holds_out_a_stratified_part_of_train(tiny_models, tiny_csv, capsys, monkeypatch):
    spec = _spec("ptuning_v2")
    fitted = search.fit_space(spec, _user(tiny_models, tiny_csv, "template=sst2_head"))
    assert fitted.overrides == [*spec.overrides, "dataset.validation=0.2"]
    assert fitted.params == spec.params  # a head template uses every key of the space
    out = capsys.readouterr().out
    assert "holds out the same 5 of the 24 training examples (dataset.validation=0.2, stratified by class)" in out
    assert "dev is never read" in out
    # a large training split: at most AUTO_HOLD_OUT_MAX examples, as a count
    monkeypatch.setattr(search, "AUTO_HOLD_OUT_MAX", 3)
    fitted = search.fit_space(spec, _user(tiny_models, tiny_csv, "template=sst2_head",
                                          "dataset.validation_stratify=false"))
    assert fitted.overrides[-1] == "dataset.validation=3"
    assert "the same 3 of the 24 training examples (dataset.validation=3, drawn at random)" in capsys.readouterr().out
    # the user's own hold-out is kept, and nothing is said
    fitted = search.fit_space(spec, _user(tiny_models, tiny_csv, "template=sst2_head", "dataset.validation=6"))
    assert fitted.overrides == spec.overrides and capsys.readouterr().out == ""


def test_keys_the_template_does_not_use_are_not_searched(tiny_models, tiny_csv, capsys):
    spec = _spec("soft_prompt")
    fitted = search.fit_space(spec, _user(tiny_models, tiny_csv, "dataset.validation=6"))  # sst2_mlm: verbalizer
    assert set(spec.params) - set(fitted.params) == {"trainer.head_lr"}
    assert "trainer.head_lr is not searched: template.readout=verbalizer trains no head" in capsys.readouterr().out
    cfg = compose(["template=sst2_generate"])
    assert set(search.unused_params(cfg)) == {"trainer.head_lr", "trainer.class_weights"}


def test_a_space_refuses_another_method(tiny_models, tiny_csv, tmp_path):
    with pytest.raises(PtuneError, match=r"tunes method=ptuning_v2; drop 'method=prefix'.*\+hparams_search=prefix"):
        search.fit_space(_spec("ptuning_v2"), _user(tiny_models, tiny_csv, "method=prefix"))
    res = ptune("search", "+hparams_search=ptuning_v2", f"search.dir={tmp_path / 's'}", "method=soft_prompt",
                cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "method=soft_prompt" in res.stderr, res.stderr
    assert not (tmp_path / "s").exists()


def test_a_generic_search_runs_on_a_new_jsonl_data_set_without_reading_dev(tiny_models, tmp_path):
    """Two trials of the shipped ptuning_v2 space on a JSONL data set with nothing but the command line: the dev
    file is not JSON, so reading it would fail every trial; the trials hold out 20% of train instead. The one change
    to the space: trainer.max_steps choices of 2 and 4 steps instead of 300 and 600 (a space file read as
    +hparams_search=FILE, as users pass their own)."""
    import optuna
    import yaml

    space = yaml.safe_load((config_dir() / "hparams_search" / "ptuning_v2.yaml").read_text())
    assert space["params"]["trainer.max_steps"]["choices"] == [300, 600]
    space["params"]["trainer.max_steps"]["choices"] = [2, 4]
    (tmp_path / "ptuning_v2.yaml").write_text(yaml.safe_dump(space))
    rows = [{"text": s, "label": ["negative", "positive"][i % 2]} for i, s in enumerate(SENTENCES * 4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.jsonl").write_text("this is not JSON {\n")
    folder = tmp_path / "search"
    res = ptune(
        "search", f"+hparams_search={tmp_path / 'ptuning_v2.yaml'}", f"search.dir={folder}", "search.n_trials=2",
        "backbone=hf", f"backbone.name={tiny_models['bert']}", "backbone.max_length=64", "dataset=jsonl",
        f"dataset.train_file={tmp_path / 'train.jsonl'}", f"dataset.dev_file={tmp_path / 'dev.jsonl'}",
        "dataset.label_names=[negative,positive]", "template=sst2_head", "trainer.batch_size=4",
        "trainer.eval_every=2", "trainer.precision=fp32", "trainer.device=cpu", "trainer.num_threads=1",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "holds out the same 5 of the 24 training examples" in res.stdout
    study = optuna.load_study(study_name="ptune", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        results = json.loads((folder / t.user_attrs["run_dir"] / "results.json").read_text())
        assert results["eval_examples"] == 5 and set(t.params) == set(space["params"])
    assert "dataset.validation=0.2" in (folder / "search.yaml").read_text()  # a resumed search keeps the hold-out
    assert (folder / "search.md").is_file()
