"""A few short runs on the packaged real models and the real data sets, through the console script."""

from __future__ import annotations

import json

import pytest

from .test_cli import ptune, run_dir

pytestmark = pytest.mark.integration


def _train_and_eval(tmp_path, *args: str) -> tuple[dict, dict]:
    res = ptune("train", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = run_dir(tmp_path)
    results = json.loads((out / "results.json").read_text())
    named_data = [a for a in args if a.startswith("data.root=")]  # a checkpoint's data paths are not followed
    ev = ptune("eval", str(out), *named_data, cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    return results, json.loads((out / "eval.json").read_text())


def test_sst2_soft_prompt_on_minilm_learns_and_reproduces(tmp_path, data_root):
    results, evaluated = _train_and_eval(
        tmp_path, "+experiment=sst2_soft", f"data.root={data_root}", "trainer.max_steps=40",
        "trainer.eval_every=40", "dataset.max_eval_samples=256",
    )
    assert results["eval_examples"] == 256
    assert results["metrics"]["accuracy"] > 0.6  # well above chance after 40 steps (0.5)
    assert abs(evaluated["accuracy"] - results["metrics"]["accuracy"]) < 1e-6
    assert results["trainable_params"] == 20 * 384 + 384 * 2 + 2


def test_smollm2_verbalizer_runs(tmp_path, data_root):
    results, evaluated = _train_and_eval(
        tmp_path, "+experiment=sst2_smollm2_soft", f"data.root={data_root}", "trainer.max_steps=4",
        "trainer.eval_every=4", "dataset.max_eval_samples=48",
    )
    assert results["trainable_params"] == 20 * 576
    assert abs(evaluated["accuracy"] - results["metrics"]["accuracy"]) < 1e-6


def test_default_job_runs_offline_on_inews(tmp_path):
    results, evaluated = _train_and_eval(
        tmp_path, "trainer.max_steps=3", "trainer.eval_every=3", "dataset.max_eval_samples=32",
    )
    assert results["dataset"] == "inews" and results["backbone"] == "gemma3-270m"
    assert results["eval_examples"] == 32
    assert abs(evaluated["accuracy"] - results["metrics"]["accuracy"]) < 1e-6
