"""Classification metrics of an evaluation, computed with scikit-learn from the class scores.

``classification_metrics`` gives the scalars (accuracy, macro-F1, weighted-F1, MCC, expected calibration error),
per-class precision/recall/F1/support and the confusion matrix (rows: true class, columns: predicted class).
``SELECTABLE`` are the scalars ``trainer.metric`` may select the best checkpoint on (higher is better; which of
them a readout reports: ``Readout.metrics``, ``ptune.readouts.selectable``);
``ece`` is lower-is-better and so only reported. ``plot_confusion`` and ``plot_curves`` write the run folder's
``confusion.png`` and ``curves.png`` (matplotlib, imported lazily: without it the plots are skipped).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

# what each readout's evaluation reports (classification_metrics; generation.generation_metrics): Readout.metrics
CLASSIFIER_SELECTABLE = ("accuracy", "macro_f1", "weighted_f1", "mcc", "macro_precision", "macro_recall")
GENERATE_SELECTABLE = ("accuracy", "rouge_l", "bleu")
SELECTABLE = tuple(dict.fromkeys(CLASSIFIER_SELECTABLE + GENERATE_SELECTABLE))

ECE_BINS = 15


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): the confidence of the predicted class against its accuracy, in ``bins`` equal-width
    confidence bins, weighted by the share of examples in each bin."""
    if len(labels) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def classification_metrics(
    logits: torch.Tensor, labels: list[int], num_classes: int, label_names: list[str] | None = None
) -> dict:
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        matthews_corrcoef,
        precision_recall_fscore_support,
    )

    classes = list(range(num_classes))
    names = list(label_names) if label_names else [str(c) for c in classes]
    y = np.asarray(labels, dtype=np.int64)
    probs = torch.softmax(logits.float(), dim=-1).numpy() if logits.numel() else np.zeros((0, num_classes))
    preds = probs.argmax(axis=1) if len(y) else np.zeros(0, dtype=np.int64)
    p, r, f, s = precision_recall_fscore_support(y, preds, labels=classes, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y, preds)),
        "macro_f1": float(f1_score(y, preds, average="macro", labels=classes, zero_division=0)),
        "weighted_f1": float(f1_score(y, preds, average="weighted", labels=classes, zero_division=0)),
        "macro_precision": float(np.mean(p)),
        "macro_recall": float(np.mean(r)),
        "mcc": float(matthews_corrcoef(y, preds)) if len(y) else 0.0,
        "ece": expected_calibration_error(probs, y),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(names)
        },
        "confusion": {"labels": names, "matrix": confusion_matrix(y, preds, labels=classes).tolist()},
    }


def scalars(metrics: dict) -> dict[str, float]:
    """The scalar metrics of an evaluation (what trackers log and ``metrics.jsonl`` lines hold)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> None:
    import io

    from .atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_confusion(path: Path, confusion: dict, title: str = "") -> bool:
    """``confusion.png``: the confusion matrix with counts. False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    names, m = confusion["labels"], np.asarray(confusion["matrix"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(names), 1.0 + 0.8 * len(names)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    top = m.max() if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > top / 2 else "black")
    _save(fig, path)
    plt.close(fig)
    return True


def plot_curves(path: Path, steps: list[tuple[int, float]], evals: list[dict], metric: str) -> bool:
    """``curves.png``: training loss against step (every step when known, else at each evaluation) and the eval
    metric against step. False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    if not steps:
        steps = [(int(h["step"]), float(h["loss"])) for h in evals if "loss" in h]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    finite = [(s, v) for s, v in steps if math.isfinite(v)]
    if finite:
        a.plot(*zip(*finite, strict=True), lw=1)
    a.set_xlabel("step")
    a.set_ylabel("train loss")
    pts = [(int(h["step"]), float(h[metric])) for h in evals if metric in h]
    if pts:
        b.plot(*zip(*pts, strict=True), marker="o")
    b.set_xlabel("step")
    b.set_ylabel(f"eval {metric}")
    _save(fig, path)
    plt.close(fig)
    return True
