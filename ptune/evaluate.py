"""Evaluation: sorted-by-length batches under inference_mode; the metrics (ptune/metrics.py) via scikit-learn."""

from __future__ import annotations

import torch

from .batching import Encoded, collate, eval_batches
from .metrics import classification_metrics
from .runtime import autocast


def predict_logits(
    model, data: Encoded, batch_size: int, device: torch.device, amp: torch.dtype | None, left_pad: bool
) -> torch.Tensor:
    was_training = model.training
    model.eval()
    chunks: list[tuple[list[int], torch.Tensor]] = []
    lengths = [len(x) for x in data.input_ids]
    with torch.inference_mode(), autocast(device, amp), model.frozen_prompt():
        for idx in eval_batches(lengths, batch_size):
            b = collate(data, idx, model.pad_id, left_pad)
            logits = model(
                b["input_ids"].to(device), b["attention_mask"].to(device), b["answer_pos"].to(device)
            ).float()
            chunks.append((idx, logits.cpu()))
    model.train(was_training)
    out = torch.empty(len(data), chunks[0][1].shape[1]) if chunks else torch.empty(0, 0)
    for idx, logits in chunks:
        out[idx] = logits
    return out


def metrics_from_logits(
    logits: torch.Tensor, labels: list[int], num_classes: int, label_names: list[str] | None = None
) -> dict:
    """accuracy, macro_f1, weighted_f1, mcc, ece, per-class precision/recall/F1 and the confusion matrix."""
    return classification_metrics(logits, labels, num_classes, label_names)


def evaluate(
    model, data: Encoded, batch_size: int, device, amp, left_pad: bool, num_classes: int,
    label_names: list[str] | None = None,
) -> dict:
    """The readout's metrics of one split (``Readout.evaluate``: class scores, or decoded texts)."""
    return model.readout.evaluate(model, data, batch_size, device, amp, left_pad, num_classes, label_names)
