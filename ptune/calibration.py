"""Contextual calibration (Zhao et al. 2021, "Calibrate Before Use") for verbalizer readouts.

The prompt alone biases the label words: fed an input without content ("N/A", or nothing), the model still
prefers some classes. With ``template.calibrate: true`` the class log-probabilities of such content-free
inputs, averaged, are stored in the readout's ``calibration`` buffer and subtracted from every class score, so
scores become ``score - log p_cf`` (the diagonal W = diag(p_cf)^-1 of the paper, in log space). A
content-free input then gets a uniform class distribution.

Zhao et al. also use "[MASK]" as content-free text; it is left out here because in an MLM backbone it would
be read as a second mask token, i.e. not content-free at all.

The buffer is part of the readout's state_dict, so a checkpoint carries the calibration of its own prompt.
Training computes it right before each evaluation (the one that decides whether to save a checkpoint), so
reported metrics, the saved prompt and its calibration always belong together, and resets it to zero
afterwards: the prompt itself is trained on uncalibrated scores.
"""

from __future__ import annotations

import torch

from .batching import Encoded
from .build import Task
from .errors import PtuneError
from .evaluate import predict_logits

CONTENT_FREE = ("N/A", "")


def content_free_logprobs(task: Task, device, amp, values: tuple[str, ...] = CONTENT_FREE) -> torch.Tensor:
    """[len(values), C] uncalibrated class log-probabilities of the content-free inputs (every field = value).

    Variants whose rendering has nothing to read the answer from (e.g. an empty field in ``{text_a}{mask}`` on a
    causal LM without a BOS token) are skipped.
    """
    readout = task.model.readout
    if not readout.calibratable:
        raise PtuneError("contextual calibration (template.calibrate) needs template.readout=verbalizer")
    fields = task.renderer.template.fields
    rendered = [task.renderer.render({name: value for name in fields}) for value in values]
    usable = [r for r in rendered if r.input_ids and (r.answer_pos >= 0 or task.renderer.answer_mode == "drop")]
    if not usable:
        raise PtuneError(
            f"contextual calibration: no content-free input ({', '.join(map(repr, values))}) renders to a usable "
            f"input with template {task.renderer.template.source!r}"
        )
    data = Encoded([r.input_ids for r in usable], [r.answer_pos for r in usable], [0] * len(usable))
    saved = readout.calibration.clone()
    with torch.no_grad():
        readout.calibration.zero_()
        try:
            scores = predict_logits(task.model, data, len(data), device, amp, task.left_pad)
        finally:
            readout.calibration.copy_(saved)
    return torch.log_softmax(scores.float(), dim=-1)


def calibrate(task: Task, device, amp, values: tuple[str, ...] = CONTENT_FREE) -> torch.Tensor:
    """Set the readout's calibration to the mean content-free class log-probability; returns it [C]."""
    offset = content_free_logprobs(task, device, amp, values).mean(0)
    with torch.no_grad():
        task.model.readout.calibration.copy_(offset.to(task.model.readout.calibration.device))
    return offset


def reset(task: Task) -> None:
    """Back to uncalibrated scores (for training steps)."""
    if task.model.readout.calibratable:
        with torch.no_grad():
            task.model.readout.calibration.zero_()
