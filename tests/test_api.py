"""The Python API (ptune/api.py): train -> load -> predict/evaluate give what `ptune predict` / `ptune eval` give on
the same checkpoint and inputs; a bad override raises a one-line PtuneError (never SystemExit) and writes nothing;
a search of 2 tiny trials; the folders' locks are released when a call returns; progress in a notebook."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import ptune
from ptune.errors import PtuneError

from .conftest import write_csv
from .helpers import SENTENCES, run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api_data")
    rows = [(s, ["negative", "positive"][i % 2]) for i, s in enumerate(SENTENCES * 4)]
    return {"train": write_csv(root / "train.csv", rows), "dev": write_csv(root / "dev.csv", rows[:12])}


def tiny(tiny_models, data) -> dict:
    """The overrides of tests/test_cli.py's csv_overrides, as a dict of Python values."""
    return {
        "backbone": "hf", "backbone.name": tiny_models["bert"], "backbone.max_length": 64,
        "dataset": "csv", "dataset.train_file": data["train"], "dataset.dev_file": data["dev"],
        "dataset.label_names": ["negative", "positive"], "template": "sst2_mlm", "method.prompt_length": 4,
        "trainer.max_steps": 2, "trainer.eval_every": 2, "trainer.batch_size": 4, "trainer.device": "cpu",
        "trainer.precision": "fp32", "trainer.lr": 0.1,
    }  # fmt: skip


def assert_unlocked(folder: Path) -> None:
    """Another process could lock the folder now (flock locks conflict between open files, even in one process)."""
    fd = os.open(folder / ".ptune.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the call still holds it
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def run(tiny_models, data, tmp_path_factory) -> ptune.Run:
    folder = tmp_path_factory.mktemp("api_run") / "run"
    return ptune.train({**tiny(tiny_models, data), "hydra.run.dir": folder})


def test_train_returns_the_run_folder_and_releases_it(run):
    assert run.results == json.loads((run.path / "results.json").read_text())
    assert run.best_metric == run.results["best_metric"] and run.metric == "accuracy"
    assert (run.checkpoint / "meta.json").is_file() and run.checkpoint == run.path / "checkpoint"
    saved = (run.path / ".hydra" / "config.yaml").read_text()
    assert "prompt_length: 4" in saved and "hydra:" not in saved
    assert "trainer.lr=0.1" in (run.path / ".hydra" / "overrides.yaml").read_text()
    assert_unlocked(run.path)


def test_predict_equals_the_cli(run, tmp_path, capsys):
    pred = ptune.load(run.path)
    assert pred.label_names == ["negative", "positive"]
    inputs = [{"text_a": s} for s in SENTENCES] + [{"text": "a row under its csv column name"}]
    rows = pred.predict(inputs)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(o) + "\n" for o in inputs))
    code, _, err = run_cli(["predict", str(run.path), "--input", str(src), "--output", str(out)], capsys)
    assert code == 0, err
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(inputs) and {r["label_name"] for r in rows} <= {"negative", "positive"}
    code, cli_text, err = run_cli(["predict", str(run.path), "--text", SENTENCES[0]], capsys)
    assert code == 0, err
    assert run.load().predict(SENTENCES[0]) == [json.loads(cli_text)]  # a text fills the template's one field


def test_evaluate_equals_the_cli(run, data, capsys):
    pred = ptune.load(run.path)
    got = pred.evaluate({"dataset.dev_file": data["dev"], "dataset.split": "dev"})
    eval_json = run.path / "eval.json"
    eval_json.unlink()
    code, _, err = run_cli(["eval", str(run.path), f"dataset.dev_file={data['dev']}", "dataset.split=dev"], capsys)
    assert code == 0, err
    cli = json.loads(eval_json.read_text())
    for row in (got, cli):
        row.pop("eval_examples_per_s")  # a timing
    assert got == cli and got["examples"] == 12 and got["split"] == "dev"


@pytest.mark.parametrize("bad,needle", [
    ({"trainer.batch_size": 0}, "trainer.batch_size=0"),  # a value out of range (the schema's check)
    ({"trainer.bogus": 1}, "trainer.bogus is not a trainer option"),  # a key Hydra refuses
    ({"template.text": "{review} It was {mask}."}, "review"),  # found by the run itself, after it started
    ({"search.n_trials": 3}, "ptune search"),
])  # fmt: skip
def test_a_bad_override_raises_one_line_and_writes_nothing(bad, needle, tiny_models, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PtuneError) as err:  # a SystemExit would not be caught here: the test fails on it
        ptune.train({**tiny(tiny_models, data), **bad})
    message = str(err.value)
    assert "\n" not in message and needle in message, message
    assert list(tmp_path.iterdir()) == [], "a failed ptune.train left files behind"


def test_a_run_folder_in_use_or_holding_a_run_is_refused(run, tiny_models, data):
    with pytest.raises(PtuneError, match="already holds a run"):
        ptune.train({**tiny(tiny_models, data), "hydra.run.dir": run.path})
    assert (run.checkpoint / "meta.json").is_file()
    with pytest.raises(PtuneError, match="command-line flag"):
        ptune.train(["-m", "trainer.seed=0,1"])
    with pytest.raises(PtuneError, match="not the string"):
        ptune.train("trainer.lr=0.1")


def test_train_under_torchrun_is_refused(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PtuneError, match="under torchrun"):
        ptune.train(["trainer.max_steps=2"])
    assert list(tmp_path.iterdir()) == []


def test_load_and_predict_errors_are_ptune_errors(run, tmp_path):
    with pytest.raises(PtuneError, match="no checkpoint"):
        ptune.load(tmp_path)
    with pytest.raises(PtuneError, match="no field 'text_a'"):
        ptune.load(run.path).predict([{"title": "x"}])
    with pytest.raises(PtuneError, match="not a shipped search space"):
        ptune.search(["+hparams_search=nope"])
    with pytest.raises(PtuneError, match="nothing to resume"):
        ptune.search(resume=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_search_runs_two_tiny_trials(tiny_models, data, tmp_path, monkeypatch):
    import optuna

    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text("overrides: [dataset.validation=0.25]\nparams:\n"
                     "  trainer.lr: {type: categorical, choices: [0.01, 0.1]}\n"
                     "  method.prompt_length: {type: int, low: 2, high: 4}\n")
    folder = tmp_path / "search"
    found = ptune.search({"+hparams_search": space, "search.dir": folder, "search.n_trials": 2,
                          "search.n_startup_trials": 1, **tiny(tiny_models, data)})
    study = optuna.load_study(study_name="ptune", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert len(study.trials) == 2 and found.path == folder
    assert found.best_trial == study.best_trial.number and found.best_params == study.best_trial.params
    results = json.loads((found.best_run / "results.json").read_text())
    assert found.best_value == results["best_metric"] and results["eval_examples"] == 6  # 25% of 24 held out
    assert found.load().predict("a charming film")[0]["label_name"] in ("negative", "positive")
    assert_unlocked(folder)
    assert (folder / "search.md").is_file()


def test_override_values_are_written_in_hydras_grammar():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ptune.api import as_overrides

    values = {"a": "null", "b": "it's {x}", "c": 1e-3, "d": ["x y", 2, None], "e": {"neg": ["bad"], "pos": ["ok"]},
              "f": True, "g": "1e-3", "h": Path("/tmp/data/x.csv"), "i": "sst2_mlm", "j": "a\\'b"}
    parsed = OverridesParser.create().parse_overrides(as_overrides(values))
    assert {o.key_or_group: o.value() for o in parsed} == {**values, "h": "/tmp/data/x.csv"}
    assert as_overrides(["+experiment=sst2_ptv2", "~trainer.seed"]) == ["+experiment=sst2_ptv2", "~trainer.seed"]
    with pytest.raises(PtuneError, match="not a 'key=value'"):
        as_overrides(["trainer.lr"])
    with pytest.raises(PtuneError, match="set cannot be an override"):
        as_overrides({"x": {1, 2}})


def test_the_api_is_at_top_level_without_importing_torch():
    """`import ptune` (every CLI command) stays light; ptune.train and ptune.search are the API functions whatever
    was imported before: no module of ptune is named train or search, so none can be bound over them."""
    code = ("import sys, ptune; assert 'torch' not in sys.modules and 'hydra' not in sys.modules; "
            "import ptune.training, ptune.commands.search, ptune.commands.train; from ptune import search, train; "
            "import ptune.api as api; assert search is api.search and train is api.train; "
            "assert ptune.search is api.search and ptune.train is api.train; "
            "assert ptune.load.__module__ == 'ptune.api' and ptune.PtuneError.__module__ == 'ptune.errors'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-c", "import sys, ptune; ptune.load; assert 'torch' not in sys.modules"],
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert res.returncode == 0, res.stderr[-2000:]
    import ptune.api

    assert ptune.train is ptune.api.train and ptune.search is ptune.api.search
    assert not (Path(ptune.__file__).parent / "train.py").exists()
    with pytest.raises(AttributeError):
        ptune.no_such_name  # noqa: B018


def test_progress_is_a_tqdm_bar_in_a_notebook(monkeypatch, capsys):
    from ptune import progress

    assert not progress.in_notebook()
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: types.SimpleNamespace(kernel=object())  # what a Jupyter kernel's shell has
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert progress.in_notebook()
    rep = progress.Reporter(10, enabled=True)
    assert rep.bar is not None and rep.progress is None
    rep.update(4, "loss 0.5", log=True)
    rep.message("eval step 4: accuracy 0.5")
    rep.close()
    assert rep.bar.n == 4
    out = capsys.readouterr()
    assert "eval step 4" in out.out and "step 4: loss" not in out.out  # the bar shows the step, not a log line
    assert progress.SilentReporter().bar is None


def test_an_interrupted_run_resumes(tiny_models, data, tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt (a notebook's stop button) reaches the caller, the folder's lock is released and its
    resume state kept; ptune.train(resume=RUN) continues it as `ptune train --resume RUN` does."""
    import importlib

    loop = importlib.import_module("ptune.training")
    evaluate_and_keep_best = loop.evaluate_and_keep_best

    def stopped_at_step_4(run, state, loss):
        if state.step == 4:
            raise KeyboardInterrupt
        return evaluate_and_keep_best(run, state, loss)

    folder = tmp_path / "run"
    monkeypatch.setattr(loop, "evaluate_and_keep_best", stopped_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        ptune.train({**tiny(tiny_models, data), "trainer.max_steps": 4, "trainer.save_every": 2,
                     "hydra.run.dir": folder})
    assert (folder / "resume").is_dir() and not (folder / "results.json").exists()
    assert_unlocked(folder)
    monkeypatch.undo()
    with pytest.raises(PtuneError, match="continues a run with the config it started with"):
        ptune.train({"trainer.lr": 0.5}, resume=folder)
    capsys.readouterr()
    done = ptune.train(resume=folder)
    assert "resuming from step 2" in capsys.readouterr().out
    assert done.results["steps"] == 4 and done.path == folder and (folder / "results.json").is_file()
    assert_unlocked(folder)
    with pytest.raises(PtuneError, match="is finished"):
        ptune.train(resume=folder)
    with pytest.raises(PtuneError, match="not a ptune run folder"):
        ptune.train(resume=tmp_path)


def test_a_generate_readout_predicts_text_as_the_cli(tiny_models, data, tmp_path, capsys):
    gen = {**tiny(tiny_models, data), "backbone.name": tiny_models["gpt2"], "method": "soft_prompt",
           "template.readout": "generate", "template.text": "{text_a} It was {mask}", "template.max_target_length": 4,
           "trainer.metric": "rouge_l", "hydra.run.dir": tmp_path / "gen"}
    run = ptune.train(gen)
    assert run.metric == "rouge_l" and "rouge_l" in run.results["metrics"]
    texts = ["a gorgeous movie", "boring"]
    rows = run.load().predict(texts)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text_a": t}) + "\n" for t in texts))
    code, out, err = run_cli(["predict", str(run.path), "--input", str(src), "--generate"], capsys)
    assert code == 0, err
    assert rows == [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(isinstance(r["text"], str) for r in rows)
