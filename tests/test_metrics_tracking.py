"""Evaluation metrics (ptune/metrics.py) against independent computations; trainer.metric selecting them;
results.json, confusion.png, curves.png; trainer.loggers (csv, mlflow: the store opens with MlflowClient and shows
params and metrics); `ptune eval` printing them; `ptune --version`."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ptune.config import compose
from ptune.errors import PtuneError
from ptune.metrics import classification_metrics, expected_calibration_error
from ptune.runfolder import sqlite_url
from ptune.training import run_training

from .test_cli import csv_overrides, ptune


def _cfg(tiny_models, tiny_csv, *extra: str):
    cfg = compose([*csv_overrides(tiny_models, tiny_csv), "trainer.precision=fp32", "trainer.device=cpu",
                   "trainer.save_every=0", *extra])
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    return cfg


def test_metrics_match_hand_computed_values():
    # 3 classes, 6 examples; predictions are the argmax of these logits
    logits = torch.tensor([[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [2, 0, 0], [0, 3, 0], [0, 1, 0]])
    labels = [0, 1, 2, 1, 1, 2]  # predicted: 0, 1, 2, 0, 1, 1
    m = classification_metrics(logits, labels, 3, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == {"labels": ["a", "b", "c"], "matrix": [[1, 0, 0], [1, 2, 0], [0, 1, 1]]}
    # class b: tp 2, fp 1 (the last row), fn 1 (the fourth row)
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                   "f1": pytest.approx(2 / 3), "support": 3}
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5) and m["per_class"]["c"]["recall"] == 0.5
    f1s = [2 * 0.5 * 1 / 1.5, 2 / 3, 2 * 1 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(sum(f1s) / 3)
    # MCC from its multiclass definition (Gorodkin 2004) on the confusion matrix
    c = np.array(m["confusion"]["matrix"], dtype=float)
    t, p, n, s = c.sum(1), c.sum(0), np.trace(c), c.sum()
    mcc = (n * s - t @ p) / math.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    assert m["mcc"] == pytest.approx(mcc)


def test_macro_precision_recall_and_weighted_f1_against_the_confusion_matrix():
    """The three scores trainer.metric can select besides accuracy, macro_f1 and mcc, from their definitions on a
    confusion matrix where all of them (and macro_f1) differ, so that a swap of any two is caught."""
    labels = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2]
    preds = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1]
    logits = torch.nn.functional.one_hot(torch.tensor(preds), 3).float()
    m = classification_metrics(logits, labels, 3)
    c = np.zeros((3, 3))
    for t, p in zip(labels, preds, strict=True):
        c[t, p] += 1
    precision = np.diag(c) / c.sum(0)
    recall = np.diag(c) / c.sum(1)
    f1 = 2 * precision * recall / (precision + recall)
    support = c.sum(1)
    expected = {
        "macro_precision": precision.mean(),
        "macro_recall": recall.mean(),
        "weighted_f1": float((f1 * support).sum() / support.sum()),
        "macro_f1": f1.mean(),
    }
    values = sorted(expected.values())
    assert all(b - a > 0.01 for a, b in zip(values, values[1:], strict=False)), "the four scores must differ"
    for name, value in expected.items():
        assert m[name] == pytest.approx(value), name


def test_ece_against_a_direct_computation():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    # bins of width 1/15: confidences 0.9, 0.8, 0.7, 0.55 fall in 4 different bins, each of one example
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(0 - 0.55)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    m = classification_metrics(torch.log(torch.tensor(probs)), labels.tolist(), 2)
    assert m["ece"] == pytest.approx(expected)


def test_trainer_metric_selects_mcc_and_the_run_writes_every_metric(tiny_models, tiny_csv, tmp_path, monkeypatch):
    loop = run_training.__globals__
    scripted = iter([0.2, 0.9, 0.5])  # mcc at steps 1, 2, 3; accuracy stays flat: only mcc can pick step 2
    real = loop["evaluate"]

    def evaluate(*args, **kwargs):
        res = real(*args, **kwargs)
        return {**res, "accuracy": 0.5, "mcc": next(scripted, 0.5)}

    monkeypatch.setitem(loop, "evaluate", evaluate)
    run = tmp_path / "run"
    res = run_training(_cfg(tiny_models, tiny_csv, "trainer.metric=mcc", "trainer.max_steps=3",
                            "trainer.eval_every=1", "trainer.loggers=[csv]"), run)
    assert res["metric"] == "mcc" and res["best_step"] == 2 and res["best_metric"] == 0.9
    saved = json.loads((run / "results.json").read_text())
    metrics = saved["metrics"]
    for key in ("accuracy", "macro_f1", "mcc", "ece", "weighted_f1", "per_class", "confusion"):
        assert key in metrics, key
    assert sum(map(sum, metrics["confusion"]["matrix"])) == saved["eval_examples"]
    assert set(metrics["per_class"]) == {"negative", "positive"}
    for name in ("confusion.png", "curves.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(math.isfinite(float(r["loss"])) for r in rows)


def test_curves_png_without_any_logger(tiny_models, tiny_csv, tmp_path):
    run = tmp_path / "run"
    run_training(_cfg(tiny_models, tiny_csv, "trainer.max_steps=2", "trainer.eval_every=1"), run)
    assert (run / "curves.png").stat().st_size > 0
    assert not (run / "train_log.csv").exists() and not (run / "mlflow.json").exists()


@pytest.mark.parametrize("bad", ["trainer.metric=ece", "trainer.metric=loss", "trainer.loggers=[wandb]"])
def test_bad_metric_or_logger_is_refused(bad, tiny_models, tiny_csv):
    with pytest.raises(PtuneError, match=bad.split("=")[0].replace("trainer.", "")):
        from ptune.config import validate

        validate(compose([*csv_overrides(tiny_models, tiny_csv), bad]))


def test_mlflow_store_shows_params_metrics_and_the_checkpoint(tiny_models, tiny_csv, tmp_path):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "outputs" / "runs" / "x" / "run"  # default store: the outputs/ folder above the run
    res = run_training(_cfg(tiny_models, tiny_csv, "trainer.max_steps=3", "trainer.eval_every=3",
                            "trainer.loggers=[mlflow]"), run)
    info = json.loads((run / "mlflow.json").read_text())
    assert info["uri"] == sqlite_url(tmp_path / "outputs" / "mlflow.db")
    client = MlflowClient(tracking_uri=info["uri"])
    got = client.get_run(info["run_id"])
    assert got.info.status == "FINISHED"
    assert got.data.params["trainer.max_steps"] == "3" and got.data.params["method.prompt_length"] == "4"
    assert got.data.params["backbone.name"] == str(tiny_models["bert"])
    assert [m.step for m in client.get_metric_history(info["run_id"], "train/loss")] == [1, 2, 3]
    assert got.data.metrics["dev/accuracy"] == pytest.approx(res["metrics"]["accuracy"])
    assert got.data.metrics["dev/mcc"] == pytest.approx(res["metrics"]["mcc"])
    artifacts = [a.path for a in client.list_artifacts(info["run_id"], "checkpoint")]
    assert "checkpoint/prompt.safetensors" in artifacts
    # artifacts live beside the SQLite store, not in the current folder
    assert list((tmp_path / "outputs" / "mlartifacts").rglob("prompt.safetensors"))


def test_tensorboard_switch_is_an_alias_of_the_logger(tiny_models, tiny_csv, tmp_path):
    from ptune.config import trainer_config
    from ptune.tracking import open_tracker

    cfg = _cfg(tiny_models, tiny_csv, "trainer.tensorboard=true")
    tracker = open_tracker(cfg, trainer_config(cfg), tmp_path)
    tracker.step(1, 0.5, 0.1)
    tracker.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_prints_the_metrics_and_version(tiny_models, tiny_csv, tmp_path):
    run = tmp_path / "run"
    run_training(_cfg(tiny_models, tiny_csv, "trainer.max_steps=1", "trainer.eval_every=1"), run)
    out = ptune("eval", str(run), f"dataset.dev_file={tiny_csv['dev']}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((run / "eval.json").read_text())
    assert f"mcc={saved['mcc']:.6f}" in out.stdout and f"ece={saved['ece']:.6f}" in out.stdout
    neg = saved["per_class"]["negative"]
    assert f"negative:p={neg['precision']:.4f},r={neg['recall']:.4f}" in out.stdout
    assert f"confusion={saved['confusion']['matrix']}" in out.stdout
    from ptune import __version__

    ver = ptune("--version", cwd=tmp_path)
    assert ver.returncode == 0 and ver.stdout.strip() == f"ptune {__version__}"
