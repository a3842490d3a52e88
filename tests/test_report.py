"""Sweeps and `ptune report`: a tiny multirun writes a report whose numbers are its runs' results.json."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from ptune.errors import PtuneError
from ptune.report import summarise, write_report

from .test_cli import csv_overrides, ptune


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def job_overrides(job: Path) -> dict[str, str]:
    items = (job / ".hydra" / "overrides.yaml").read_text().splitlines()
    return dict(x.lstrip("- ").split("=", 1) for x in items if "=" in x)


def test_multirun_sweep_writes_report(tiny_models, tiny_csv, tmp_path):
    args = [o for o in csv_overrides(tiny_models, tiny_csv) if not o.startswith("method.prompt_length")]
    res = ptune(
        "train",
        "-m",
        *args,
        "method.prompt_length=2,4,-1",
        "trainer.seed=0,1",
        "trainer.tensorboard=true",
        cwd=tmp_path,
    )
    # Jobs with prompt_length=-1 fail; the others finish and the sweep still writes its report.
    assert res.returncode == 1, res.stderr
    assert "2 of 6 jobs failed" in res.stderr
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1
    sweep = sweeps[0]
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert (sweep / name).is_file() and (sweep / name).stat().st_size > 0, name
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert len(jobs) == 6
    by_length: dict[str, list[dict]] = {}
    failed = []
    for job in jobs:
        length = job_overrides(job)["method.prompt_length"]
        if (job / "FAILED").exists():
            failed.append(length)
            assert not (job / "results.json").exists()
            continue
        by_length.setdefault(length, []).append(json.loads((job / "results.json").read_text()))
        assert list((job / "tensorboard").glob("events.out.tfevents.*")), "trainer.tensorboard=true logged nothing"
    assert sorted(failed) == ["-1", "-1"] and sorted(by_length) == ["2", "4"]

    rows = {r["method.prompt_length"]: r for r in read_csv(sweep / "summary.csv")}
    assert set(rows) == {"-1", "2", "4"}
    assert rows["-1"]["n_runs"] == "0" and rows["-1"]["n_failed"] == "2"
    for length, results in by_length.items():
        row = rows[length]
        metric = [r["best_metric"] for r in results]
        assert row["metric"] == results[0]["metric"]
        assert float(row["mean"]) == pytest.approx(statistics.mean(metric), abs=1e-12)
        assert float(row["std"]) == pytest.approx(statistics.stdev(metric), abs=1e-12)
        assert float(row["best_step_mean"]) == pytest.approx(statistics.mean(r["best_step"] for r in results))
        assert int(row["trainable_params"]) == results[0]["trainable_params"]
        for key in ("train_examples_per_s", "eval_examples_per_s"):
            assert float(row[key]) == pytest.approx(statistics.mean(r[key] for r in results), rel=1e-12)
        assert row["n_runs"] == "2" and row["n_failed"] == "0" and sorted(row["seeds"].split()) == ["0", "1"]
    md = (sweep / "summary.md").read_text()
    assert "method.prompt_length" in md and "Failed jobs" in md and "must be >= 0" in md
    mean2 = statistics.mean(r["best_metric"] for r in by_length["2"])
    assert f"{mean2:.4f} ± " in md
    # `ptune report DIR` regenerates the same numbers (and also works on any folder of runs).
    before = (sweep / "summary.csv").read_text()
    again = ptune("report", str(sweep), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (sweep / "summary.csv").read_text() == before
    assert "method.prompt_length" in again.stdout


def fake_run(folder: Path, overrides: list[str], **results) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    base = {
        "best_metric": 0.5,
        "metric": "accuracy",
        "best_step": 10,
        "metrics": {"accuracy": 0.5, "macro_f1": 0.4},
        "trainable_params": 100,
        "train_examples_per_s": 10.0,
        "eval_examples_per_s": 20.0,
        "method": "soft_prompt",
        "backbone": "minilm",
        "dataset": "sst2",
    }
    (folder / "results.json").write_text(json.dumps({**base, **results}))


def test_report_groups_methods_and_numeric_values(tmp_path):
    # Two experiments (different methods) x two prompt lengths x two seeds, as two sweeps side by side.
    for exp, method in (("a", "soft_prompt"), ("b", "ptuning_v2")):
        n = 0
        for length in (10, 2):
            for seed in (0, 1):
                fake_run(
                    tmp_path / exp / str(n),
                    [f"+experiment=sst2_{exp}", f"method.prompt_length={length}", f"trainer.seed={seed}"],
                    best_metric=0.5 + 0.01 * length + 0.1 * seed + (0.2 if method == "ptuning_v2" else 0),
                    method=method,
                    trainable_params=length * 32,
                )
                n += 1
    (tmp_path / "a" / ".checkpoint.old").mkdir()  # hidden folders are not runs
    (tmp_path / "a" / ".checkpoint.old" / "results.json").write_text("{}")
    keys, rows, failed = summarise(tmp_path)
    assert keys == ["experiment", "method.prompt_length", "method"]
    assert [(r["experiment"], r["method.prompt_length"]) for r in rows] == [
        ("sst2_a", 2),
        ("sst2_a", 10),
        ("sst2_b", 2),
        ("sst2_b", 10),
    ]  # numeric order, not string order
    r = rows[1]
    assert r["mean"] == pytest.approx(0.65) and r["std"] == pytest.approx(statistics.stdev([0.6, 0.7]))
    assert r["n_runs"] == 2 and r["trainable_params"] == 320 and r["method"] == "soft_prompt"
    summary = write_report(tmp_path, print_it=False)
    assert summary["png_error"] is None and (tmp_path / "summary.png").is_file()
    assert not failed


def test_report_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(PtuneError, match="no runs"):
        write_report(tmp_path, print_it=False)
    res = ptune("report", str(tmp_path / "missing"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("ptune: error:") and "Traceback" not in res.stderr


def test_plot_uses_a_log_axis_for_geometric_grids(tmp_path, monkeypatch):
    """Prompt lengths 1, 4, 16, 64 crowd the left of a linear axis: the plot switches to a log axis."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ptune.report import plot

    scales = []
    monkeypatch.setattr(plt, "close", lambda fig=None: scales.append([a.get_xscale() for a in fig.axes]))
    row = {"mean": 0.8, "std": 0.01, "n_runs": 2, "metric": "accuracy"}
    plot(tmp_path / "geo.png", ["method.prompt_length"], [{"method.prompt_length": n, **row} for n in (1, 4, 16, 64)])
    plot(tmp_path / "lin.png", ["trainer.lr"], [{"trainer.lr": x, **row} for x in (1, 2, 3)])
    assert scales == [["log"], ["linear"]]


def test_hydra_mode_multirun_is_a_sweep_too(tiny_models, tiny_csv, tmp_path):
    """`hydra.mode=MULTIRUN` (no -m) runs a sweep: a failing job is marked FAILED and the others still run (it
    was once treated as a single run, and the first failure ended the whole sweep)."""
    args = [o for o in csv_overrides(tiny_models, tiny_csv) if not o.startswith("method.prompt_length")]
    res = ptune("train", "hydra.mode=MULTIRUN", *args, "method.prompt_length=-1,2", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "1 of 2 jobs failed" in res.stderr
    jobs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/*"))
    assert [(j / "FAILED").is_file() for j in jobs if j.is_dir()] == [True, False]
    assert (jobs[1] / "results.json").is_file()
