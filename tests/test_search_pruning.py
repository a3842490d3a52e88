"""`ptune search`'s pruning, budgets, compute columns and confirmation seeds, on the tiny BERT (issue 27, items
1, 4 and 5): a trial that cannot keep up is pruned at its first evaluation and keeps a valid run folder; a
resumed search prunes with its saved pruner; search.timeout and search.max_examples stop between trials; the
report shows each trial's steps, examples and seconds; search.confirm_seeds retrains the best trial on all of
train and reports dev mean and std."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from .helpers import ptune_here
from .test_cli import csv_overrides, ptune
from .test_search import _space


def _args(tiny_models, tiny_csv, *extra: str) -> list[str]:
    """The tiny runs of a search: 4 steps of 4 examples, evaluated every 2 steps on 6 held-out examples."""
    base = [a for a in csv_overrides(tiny_models, tiny_csv) if not a.startswith("template=")]
    return [*base, "trainer.precision=fp32", "trainer.device=cpu", "trainer.save_every=0", "trainer.max_steps=4",
            "trainer.eval_every=2", *extra]


def _study(folder: Path):
    import optuna

    return optuna.load_study(study_name="ptune", storage=f"sqlite:///{folder / 'optuna.db'}")


def _trailing_search(tiny_models, tiny_csv, tmp_path: Path, *extra: str):
    """A 2-trial search whose second trial cannot keep up; returns its folder and the finished process. lr 1e-9
    leaves every prompt as initialised, so each trial's held-out accuracy is flat: 0.5 with the head template, 1/3
    with the MLM one (the hopeless configuration), and search.seed=11 draws the head template first. The median
    pruner is told to start after one complete trial."""
    folder = tmp_path / "search"
    space = [f"+hparams_search={_space(tmp_path, 'template: {type: categorical, choices: [sst2_head, sst2_mlm]}')}",
             f"search.dir={folder}", "search.seed=11", "search.n_startup_trials=10", "search.pruner=median",
             "search.pruner_args={n_startup_trials: 1}", "search.n_trials=2"]
    args = _args(tiny_models, tiny_csv, "dataset.validation=6", "trainer.lr=1e-9", "trainer.head_lr=1e-9", *extra)
    res = ptune("search", *space, *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return folder, res


def test_a_trailing_trial_is_pruned_keeps_a_valid_folder_and_a_resumed_search_prunes(tiny_models, tiny_csv,
                                                                                      tmp_path):
    """The MLM trial of ``_trailing_search`` trails the median at its first evaluation (step 2 of 4) and is pruned
    there."""
    from optuna.trial import TrialState

    folder, res = _trailing_search(tiny_models, tiny_csv, tmp_path)
    study = _study(folder)
    # search.seed=11 draws sst2_head, then sst2_mlm (then sst2_mlm again once resumed): the order this test needs
    assert [t.params["template"] for t in study.trials] == ["sst2_head", "sst2_mlm"], "sampler order changed"
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    head, mlm = study.trials
    assert set(head.intermediate_values) == {2, 4} and head.value == 0.5
    assert list(mlm.intermediate_values) == [2] and mlm.intermediate_values[2] < 0.5  # stopped at once
    assert "trial 1 pruned at step 2" in res.stdout
    run = folder / mlm.user_attrs["run_dir"]
    assert "pruned by search.pruner=median at step 2" in (run / "PRUNED").read_text()
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and results["best_step"] == 2
    assert 4 < results["examples_seen"] <= 8  # two batches of 4 (the last of 18 examples' epoch holds 2)
    assert (mlm.user_attrs["steps"], mlm.user_attrs["examples"]) == (2, results["examples_seen"])
    assert mlm.user_attrs["seconds"] > 0
    ev = ptune("eval", str(run), f"dataset.dev_file={tiny_csv['dev']}", cwd=tmp_path)  # a normal run folder
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text())["examples"] == 12
    assert "1 complete, 1 pruned, 0 failed of 2" in (folder / "search.md").read_text()

    # Resumed: the pruner comes back from search.yaml (Optuna's default n_startup_trials=5 would not prune after
    # one complete trial), and the pruned trials counted towards n_trials.
    again = ptune("search", "--resume", str(folder), "search.n_trials=3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _study(folder).trials
    assert [t.params["template"] for t in trials] == ["sst2_head", "sst2_mlm", "sst2_mlm"], "sampler order changed"
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert (folder / "trial_002" / "PRUNED").is_file()


def test_a_trial_is_never_pruned_at_its_last_evaluation(tiny_models, tiny_csv, tmp_path):
    """The trailing MLM trial of ``_trailing_search``, evaluated only at its last step: the median pruner would stop
    it there, but it has spent all its steps, so it is recorded COMPLETE (its value reported all the same)."""
    from optuna.trial import TrialState

    folder, res = _trailing_search(tiny_models, tiny_csv, tmp_path, "trainer.eval_every=4")
    study = _study(folder)
    assert [t.params["template"] for t in study.trials] == ["sst2_head", "sst2_mlm"], "sampler order changed"
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    mlm = study.trials[1]
    assert mlm.intermediate_values == {4: mlm.value} and mlm.value < 0.5  # trails the median, yet complete
    assert not (folder / mlm.user_attrs["run_dir"] / "PRUNED").exists() and "pruned" not in res.stdout


def test_budgets_stop_between_trials_and_the_report_shows_compute(tiny_models, tiny_csv, tmp_path):
    """Each trial takes 4 steps of 4 examples (20 training examples left by the hold-out: no short batch).
    search.max_examples=20 lets a second trial start (16 spent) and no third (32); search.timeout=0.01 lets the
    first trial of a search run (as Optuna's timeout does) and no other."""
    from optuna.trial import TrialState

    space_file = _space(tmp_path, "trainer.lr: {type: float, low: 0.01, high: 0.1}")
    args = _args(tiny_models, tiny_csv, "dataset.validation=4", "template=sst2_mlm")
    folder = tmp_path / "examples"
    res = ptune("search", f"+hparams_search={space_file}", f"search.dir={folder}", "search.n_trials=5",
                "search.pruner=none", "search.max_examples=20", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "search.max_examples=20 reached (32 training examples): no new trial started (2 of 5" in res.stdout
    assert [t.state for t in _study(folder).trials] == [TrialState.COMPLETE] * 2
    rows = list(csv.DictReader((folder / "search.csv").open()))
    assert [(r["state"], r["steps"], r["examples"]) for r in rows] == [("COMPLETE", "4", "16")] * 2
    assert all(float(r["seconds"]) > 0 for r in rows)
    md = (folder / "search.md").read_text()
    seconds = sum(float(r["seconds"]) for r in rows)
    assert f"Compute, all trials: 8 steps, 32 training examples, {seconds:.0f} s." in md
    assert "| steps | examples | seconds |" in md
    rep = ptune("report", str(folder), cwd=tmp_path)
    assert rep.returncode == 0 and "compute, all trials: 8 steps, 32 training examples" in rep.stdout, rep.stderr

    folder = tmp_path / "timeout"
    res = ptune("search", f"+hparams_search={space_file}", f"search.dir={folder}", "search.n_trials=3",
                "search.timeout=0.01", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "search.timeout=0.01 s reached" in res.stdout and "(1 of 3 finished)" in res.stdout
    assert len(_study(folder).trials) == 1
    # A resumed search may raise its budget (never its space or pruner)
    res = ptune("search", "--resume", str(folder), "search.timeout=600", "search.n_trials=2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_study(folder).trials) == 2
    res = ptune("search", "--resume", str(folder), "search.pruner=hyperband", cwd=tmp_path)
    assert res.returncode == 2 and "search.pruner=hyperband" in res.stderr and "can change" in res.stderr


def test_confirm_seeds_retrain_the_best_on_all_of_train_and_report_dev(tiny_models, tiny_csv, tmp_path):
    folder = tmp_path / "search"
    space_file = _space(tmp_path, "trainer.lr: {type: float, low: 0.01, high: 0.1}",
                        head="overrides: [dataset.validation=6]\n")
    args = _args(tiny_models, tiny_csv, "template=sst2_mlm")
    space = [f"+hparams_search={space_file}", f"search.dir={folder}", "search.n_trials=1", "search.confirm_seeds=2"]
    res = ptune("search", *space, *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lr = _study(folder).trials[0].params["trainer.lr"]
    last, best = [], []
    for seed in (0, 1):
        run = folder / f"confirm_seed_{seed}"
        overrides = list(OmegaConf.load(run / ".hydra" / "overrides.yaml"))
        assert "dataset.validation=6" not in overrides and f"trainer.lr={lr}" in overrides
        assert overrides[-2:] == ["dataset.validation=null", f"trainer.seed={seed}"]
        results = json.loads((run / "results.json").read_text())
        assert results["eval_examples"] == 12 and results["train_examples"] == 24  # dev, and all of train
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last.append(history[-1]["accuracy"])
        best.append(results["best_metric"])
    md = (folder / "search.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("**Confirmed**"))
    assert f"{statistics.mean(last):.4f} ± {statistics.stdev(last):.4f} at the last step" in line
    assert f"{statistics.mean(best):.4f} ± {statistics.stdev(best):.4f} for the best checkpoint" in line
    rep = ptune("report", str(folder), cwd=tmp_path)
    assert rep.returncode == 0 and "confirmed: dev accuracy over seeds 0, 1" in rep.stdout, rep.stderr
    # Rerun: the finished confirmations of the same trial are kept, not retrained
    again = ptune("search", "--resume", str(folder), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("already confirms trial 0: kept") == 2, again.stderr


@pytest.mark.parametrize(("override", "named"), [
    ("search.pruner=asha", "search.pruner='asha' is not valid: use one of none, median"),
    ("search.pruner_args={reduction_factor: 3}", "search.pruner_args.reduction_factor is not an argument of"),
    ("search.pruner_args={n_startup_trials: -1}", "search.pruner_args={'n_startup_trials': -1}"),
    ("search.max_examples=0", "search.max_examples=0 must be an integer >= 1"),
    ("search.timeout=-5", "search.timeout=-5.0 must be a number > 0.0"),
])
def test_bad_pruner_and_budget_values_are_one_line(override, named, tmp_path, capsys, monkeypatch):
    res = ptune_here("search", "+hparams_search=sst2_ptv2", f"search.dir={tmp_path / 's'}", override, cwd=tmp_path,
                     capsys=capsys, monkeypatch=monkeypatch)
    assert res.returncode == 2 and named in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "s").exists()


def test_a_search_saved_before_pruning_resumes_unpruned(tmp_path):
    """search.yaml of a ptune without pruning has no `pruner`: its trials all ran to their end, so resuming it goes
    on unpruned rather than judging new trials against full ones with the new default; a saved pruner is kept."""
    from ptune.commands.search import SAVED, _resume

    params = {"trainer.lr": {"type": "float", "low": 0.01, "high": 0.1}}
    saved = {"name": "old", "search": {"n_trials": 3, "params": params}, "overrides": []}
    (tmp_path / SAVED).write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    assert _resume(tmp_path, [], [])[1].pruner == "none"
    saved["search"].update(pruner="successive_halving", pruner_args={"reduction_factor": 2})
    (tmp_path / SAVED).write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    spec = _resume(tmp_path, ["search.n_trials=5", "search.max_examples=100"], [])[1]
    assert (spec.pruner, spec.pruner_args, spec.n_trials, spec.max_examples) == (
        "successive_halving", {"reduction_factor": 2}, 5, 100)


def test_bench_search_summarises_a_study(tmp_path):
    """scripts/bench_search.py's figures come from the study: best COMPLETE value, states, summed compute."""
    import importlib.util

    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from ptune.commands.search import STUDY, storage_url

    spec = importlib.util.spec_from_file_location("bench_search", Path(__file__).parents[1] / "scripts" /
                                                  "bench_search.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    study = optuna.create_study(study_name=STUDY, storage=storage_url(tmp_path), direction="maximize")
    dist = {"trainer.lr": FloatDistribution(0.01, 0.1)}
    for value, state, steps in [(0.7, TrialState.COMPLETE, 100), (0.9, TrialState.PRUNED, 20),
                                (0.8, TrialState.COMPLETE, 100)]:
        study.add_trial(create_trial(params={"trainer.lr": 0.05}, distributions=dist, state=state,
                                     value=value if state == TrialState.COMPLETE else None,
                                     intermediate_values={steps: value},
                                     user_attrs={"steps": steps, "examples": 16 * steps, "seconds": 1.5}))
    fig = bench.summarise(tmp_path)
    assert (fig["best_value"], fig["best_trial"], fig["complete"], fig["pruned"]) == (0.8, 2, 2, 1)
    assert (fig["steps"], fig["examples"], fig["seconds"]) == (220, 3520, 4.5)
