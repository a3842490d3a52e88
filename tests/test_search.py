"""`ptune search`: a 3-trial Optuna search on the tiny BERT, offline, with one failing trial, resumed once; its
study opens with Optuna's own API; `ptune report` on the search folder; dataset.validation carving the eval split
out of the training data (the dev file is never read)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ptune.config import compose
from ptune.data import load_train_dev
from ptune.errors import PtuneError

from .helpers import ptune_here
from .test_cli import csv_overrides, ptune


def _space(tmp_path: Path, *params: str, head: str = "") -> Path:
    """A search space file of the tiny runs (keys as in conf/hparams_search/*.yaml)."""
    path = tmp_path / "space.yaml"
    path.write_text(head + "params:\n" + "".join(f"  {p}\n" for p in params))
    return path


def test_search_records_a_failing_trial_and_resumes(tiny_models, tiny_csv, tmp_path):
    import optuna
    from optuna.trial import TrialState

    folder = tmp_path / "search"
    # The dev file does not exist: a search selects on dataset.validation and must never read it.
    args = [a for a in csv_overrides(tiny_models, tiny_csv) if not a.startswith("dataset.dev_file")]
    args += [f"dataset.dev_file={tmp_path / 'no_such_dev.csv'}", "dataset.validation=6", "trainer.precision=fp32",
             "trainer.device=cpu", "trainer.save_every=0", "trainer.max_steps=2"]
    # lr 1e30 makes the loss NaN at step 2 (see test_training_loop): that trial must be recorded as FAIL.
    space_file = _space(tmp_path, "trainer.lr: {type: categorical, choices: [1.0e+30]}",
                        "trainer.eval_every: {type: int, low: 1, high: 2}")
    space = [f"+hparams_search={space_file}", "search.n_startup_trials=2", f"search.dir={folder}", "search.n_trials=2"]
    first = ptune("search", *space, *args, cwd=tmp_path)
    assert first.returncode == 2, first.stderr[-3000:]  # every trial failed: one line, exit 2
    assert "every trial of the search" in first.stderr and "loss became nan" in first.stderr

    # Resumed into the same folder with a larger budget: the saved space and overrides are reused.
    again = ptune("search", "--resume", str(folder), "search.n_trials=3", cwd=tmp_path)
    assert again.returncode == 2, again.stderr[-3000:]
    study = optuna.load_study(study_name="ptune", storage=f"sqlite:///{folder / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL] * 3
    assert all((folder / f"trial_{i:03d}" / "FAILED").is_file() for i in range(3))


def test_search_finds_completes_and_reports(tiny_models, tiny_csv, tmp_path):
    import optuna
    from optuna.trial import TrialState

    folder = tmp_path / "search"
    args = [*csv_overrides(tiny_models, tiny_csv), "trainer.precision=fp32", "trainer.device=cpu",
            "trainer.save_every=0", "trainer.max_steps=2", "trainer.eval_every=2"]
    space_file = _space(tmp_path, "trainer.lr: {type: categorical, choices: [0.01, 1.0e+30]}",
                        "method.prompt_length: {type: int, low: 2, high: 4}",
                        head="overrides: [dataset.validation=0.25]\n")
    space = [f"+hparams_search={space_file}",
             f"search.dir={folder}", "search.n_trials=2", "search.n_startup_trials=1"]
    res = ptune("search", *space, *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = ptune("search", *space, "search.n_trials=3", *args, cwd=tmp_path)  # a rerun into the folder continues
    assert res.returncode == 0, res.stderr[-3000:]
    assert "continuing" in res.stdout
    study = optuna.load_study(study_name="ptune", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert len(study.trials) == 3
    for t in study.trials:
        run = folder / t.user_attrs["run_dir"]
        overrides = OmegaConf.load(run / ".hydra" / "overrides.yaml")
        assert f"method.prompt_length={t.params['method.prompt_length']}" in overrides
        assert "dataset.validation=0.25" in overrides
        if t.params["trainer.lr"] > 1:
            assert t.state == TrialState.FAIL and (run / "FAILED").is_file()
        else:
            assert t.state == TrialState.COMPLETE and math.isfinite(t.value)
            import json

            results = json.loads((run / "results.json").read_text())
            assert t.value == results["best_metric"] and results["eval_examples"] == 6  # 25% of 24 held out
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete, "no trial completed"
    rep = ptune("report", str(folder), cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr[-3000:]
    best = max(complete, key=lambda t: t.value)
    md = (folder / "search.md").read_text()
    assert f"**Best trial {best.number}**" in md
    rows = list(csv.DictReader((folder / "search.csv").open()))
    assert [r["state"] for r in rows] == [t.state.name for t in study.trials]
    assert (folder / "search.png").stat().st_size > 0


def test_validation_holds_out_training_examples_and_never_reads_dev(tiny_models, tiny_csv, tmp_path):
    base = [a for a in csv_overrides(tiny_models, tiny_csv) if not a.startswith("dataset.dev_file")]
    cfg = compose([*base, f"dataset.dev_file={tmp_path / 'missing.csv'}", "dataset.validation=0.25"])
    train, held = load_train_dev(cfg, seed=3)
    full, _ = load_train_dev(compose([*csv_overrides(tiny_models, tiny_csv)]), seed=3)
    assert len(held) == 6 and len(train) == 18
    pairs = lambda s: sorted(zip((e["text_a"] for e in s.examples), s.labels, strict=True))  # noqa: E731
    assert sorted(pairs(train) + pairs(held)) == pairs(full)
    # the same split whatever the training seed
    _, held2 = load_train_dev(cfg, seed=7)
    assert held2.examples == held.examples
    counted = compose([*base, f"dataset.dev_file={tmp_path / 'missing.csv'}", "dataset.validation=5"])
    assert len(load_train_dev(counted, 0)[1]) == 5
    with pytest.raises(PtuneError, match="leave at least one"):
        load_train_dev(compose([*base, "dataset.validation=24"]), 0)


def test_validation_is_stratified_by_class_unless_told_otherwise():
    """CB's shape (115 / 119 / 16): the held-out part gets each class's share, rare classes included, and every
    class keeps training examples; validation_stratify=false is the plain seeded draw."""
    import random

    from ptune.data.selection import VALIDATION_SEED, hold_out
    from ptune.data.sources import Split

    labels = [0] * 115 + [1] * 119 + [2] * 16
    random.Random(5).shuffle(labels)
    split = Split([{"text_a": str(i)} for i in range(250)], labels, ["e", "c", "n"], "cb-like")
    counts = lambda s: [s.labels.count(c) for c in range(3)]  # noqa: E731
    train, held = hold_out(split, 50, stratify=True)
    assert counts(held) == [23, 24, 3] and counts(train) == [92, 95, 13]
    assert counts(hold_out(split, 0.3, stratify=True)[1]) == [34, 36, 5]
    assert sorted(e["text_a"] for e in train.examples + held.examples) == sorted(str(i) for i in range(250))
    # a class of one example stays in training while others can give
    tiny = Split([{"text_a": str(i)} for i in range(7)], [0, 0, 0, 0, 0, 0, 1], ["a", "b"], "tiny")
    assert hold_out(tiny, 3, stratify=True)[0].labels.count(1) == 1
    _, plain = hold_out(split, 50, stratify=False)
    drawn = sorted(random.Random(VALIDATION_SEED).sample(range(250), 50))
    assert [e["text_a"] for e in plain.examples] == [str(i) for i in drawn]
    assert counts(plain) != counts(held)


@pytest.mark.parametrize("value", ["1.5", "0", "-0.2", "true"])
def test_bad_validation_values_are_refused_in_one_line(value, tiny_models, tiny_csv, tmp_path, capsys, monkeypatch):
    res = ptune_here("train", *csv_overrides(tiny_models, tiny_csv), f"dataset.validation={value}", cwd=tmp_path,
                     capsys=capsys, monkeypatch=monkeypatch)
    assert res.returncode == 2
    assert "dataset.validation" in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_search_refuses_unknown_spaces_and_keys(tmp_path):
    res = ptune("search", "+hparams_search=nope", cwd=tmp_path)
    assert res.returncode == 2 and "sst2_ptv2" in res.stderr
    res = ptune("search", "+hparams_search=sst2_ptv2", f"search.dir={tmp_path / 's'}", "trainer.nope=1", cwd=tmp_path)
    assert res.returncode == 2 and "trainer.nope is not a trainer option" in res.stderr, res.stderr
    assert not (tmp_path / "s").exists()
    res = ptune("search", "--resume", str(tmp_path / "none"), cwd=tmp_path)
    assert res.returncode == 2 and "nothing to resume" in res.stderr


def test_shipped_search_spaces_compose():
    from ptune.config import SearchConfig, config_dir, section

    for path in sorted((config_dir() / "hparams_search").glob("*.yaml")):
        if path.stem in ("soft_prompt", "ptuning_v1", "ptuning_v2", "prefix"):  # generic: test_search_spaces.py
            continue
        spec = section(compose([f"+hparams_search={path.stem}"]), "search", SearchConfig)
        assert spec.experiment and spec.params and any("validation" in o for o in spec.overrides), path
        assert (config_dir() / "experiment" / f"{spec.experiment}.yaml").is_file()


def test_search_table_is_readable_in_a_log(tmp_path, capsys):
    """Printed into a log (not a terminal), the trials table of the real 6-parameter space used to be squeezed into
    80 columns, every value cut to "0.87…"; it now shows each parameter by its last name and 4 significant digits."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from ptune.commands.search import STUDY, storage_url, write_search_report

    study = optuna.create_study(study_name=STUDY, storage=storage_url(tmp_path), direction="maximize")
    space = {"trainer.lr": FloatDistribution(0.003, 0.3, log=True),
             "trainer.head_lr": FloatDistribution(0.001, 0.1, log=True),
             "method.prompt_length": CategoricalDistribution([8, 16, 32, 64]),
             "trainer.max_steps": CategoricalDistribution([400, 600]),
             "trainer.schedule": CategoricalDistribution(["linear", "cosine"]),
             "method.init": CategoricalDistribution(["vocab", "random"])}
    params = {"trainer.lr": 0.049782250719132864, "trainer.head_lr": 0.002575842777242345,
              "method.prompt_length": 64, "trainer.max_steps": 600, "trainer.schedule": "cosine",
              "method.init": "vocab"}
    study.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=0.873,
                                              user_attrs={"metric": "accuracy", "run_dir": "trial_000",
                                                          "steps": 600, "examples": 19200, "seconds": 271.25}))
    write_search_report(tmp_path)
    out = capsys.readouterr().out
    assert "…" not in out
    header = next(line for line in out.splitlines() if "trial" in line and "state" in line)
    assert [c.strip() for c in header.strip("┃│ ").split("┃")] == [
        "trial", "state", "accuracy", "lr", "head_lr", "prompt_length", "max_steps", "schedule", "init", "steps",
        "examples", "seconds"]
    row = next(line for line in out.splitlines() if "COMPLETE" in line)
    assert [c.strip() for c in row.strip("│ ").split("│")] == [
        "0", "COMPLETE", "0.873", "0.04978", "0.002576", "64", "600", "cosine", "vocab", "600", "19200", "271.2"]
    assert (tmp_path / "search.csv").read_text().count("0.049782250719132864") == 1  # the file keeps every digit
