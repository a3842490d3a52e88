"""Rebuild a PromptModel from a checkpoint and evaluate it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from .atomic import atomic_write_json
from .backbone import Backbone
from .backbone.identity import check_same_backbone
from .build import Task, build_task, encode
from .checkpoint import find_checkpoint, load_trainable_state, read_checkpoint
from .config import apply_overrides, trainer_config
from .data import Split, load_split, subsample
from .efficiency.frozen import prepare_frozen_backbone
from .errors import PtuneError
from .evaluate import evaluate
from .runtime import pick_amp, pick_device, seed_everything, settle_backbone_dtype


@dataclass
class SavedPrompt:
    """A prompt checkpoint read from disk with the user's overrides applied, before its model is built: what a
    caller that loads several (serving, on one shared backbone) needs to know first."""

    checkpoint: Path  # the checkpoint/ folder found from the path given
    cfg: DictConfig
    meta: dict
    state: dict


def read_saved(path: str | Path, overrides: Sequence[str] = ()) -> SavedPrompt:
    """Find and read the checkpoint of ``path`` (a run folder or a checkpoint/ folder), ``overrides`` applied."""
    ckpt = find_checkpoint(path)
    cfg, meta, state = read_checkpoint(ckpt)
    cfg = apply_overrides(cfg, list(overrides))
    settle_backbone_dtype(cfg)  # an override backbone.dtype=auto: this machine's choice (a checkpoint saves it settled)
    return SavedPrompt(ckpt, cfg, meta, state)


def rebuild(saved: SavedPrompt, backbone: Backbone | None = None) -> Task:
    """The saved prompt's Task with its trained values, on ``backbone`` if given (else the one its config names);
    refused when that backbone is not the one the prompt was trained on."""
    seed = trainer_config(saved.cfg).seed
    seed_everything(seed)
    task = build_task(saved.cfg, list(saved.meta["label_names"]), seed, backbone=backbone)
    check_same_backbone(saved.meta.get("backbone", {}), task.backbone.identity, saved.checkpoint)
    load_trainable_state(task.model, saved.state)
    return task


def load_task(path: str | Path, overrides: list[str] | None = None) -> tuple[Task, DictConfig, Path, dict]:
    """The one loader of a prompt checkpoint (eval, predict, export, serving through read_saved and rebuild)."""
    saved = read_saved(path, overrides or [])
    return rebuild(saved), saved.cfg, saved.checkpoint, saved.meta


def load_split_named_by_user(cfg: DictConfig, split_name: str) -> Split:
    """The evaluation split, from data paths the user names now: a checkpoint's saved paths were blanked on load
    (they could point anywhere), so data.root comes from an override or $PTUNE_DATA, files from overrides."""
    root = cfg.data.get("root") or os.environ.get("PTUNE_DATA")
    try:
        return load_split(cfg.dataset, split_name, root)
    except PtuneError as exc:
        if "has no" in str(exc) and "_file set" in str(exc):
            raise PtuneError(f"{exc}; ptune does not follow data paths stored in a checkpoint") from None
        raise


@dataclass
class EvalSetup:
    """A checkpoint rebuilt on its device with the evaluation split it is scored on (``ptune eval``, benchmarks)."""

    task: Task
    cfg: DictConfig
    ckpt: Path
    split_name: str
    split: Split
    device: torch.device
    amp: torch.dtype | None


def prepare_evaluation(path: str | Path, overrides: list[str]) -> EvalSetup:
    """Load the checkpoint with ``overrides``, read the split the config names (``dataset.eval_split``, at most
    ``dataset.max_eval_samples`` examples) and ready the frozen backbone as training did."""
    task, cfg, ckpt, _ = load_task(path, overrides)
    tr = trainer_config(cfg)
    device = pick_device(tr.device)
    amp = pick_amp(tr.precision, device)
    split_name = str(cfg.dataset.get("eval_split", "dev"))
    split = load_split_named_by_user(cfg, split_name)
    if split.label_names != task.label_names:
        raise PtuneError(f"data labels {split.label_names} differ from the checkpoint's {task.label_names}")
    split = subsample(split, cfg.dataset.get("max_eval_samples"), 0, "dataset.max_eval_samples")
    task.model.to(device)
    prepare_frozen_backbone(task.backbone.model, amp, tr.cast_frozen_weights, tr.fuse_projections)
    return EvalSetup(task, cfg, ckpt, split_name, split, device, amp)


def eval_overrides(overrides: list[str]) -> list[str]:
    """``dataset.split=NAME`` picks the split to evaluate (the config's ``dataset.eval_split``): ``ptune eval`` and
    ``Predictor.evaluate`` take it."""
    return [o.replace("dataset.split=", "dataset.eval_split=", 1) if o.startswith("dataset.split=") else o
            for o in overrides]


def evaluate_checkpoint(path: str | Path, overrides: list[str]) -> dict:
    setup = prepare_evaluation(path, overrides)
    task, ckpt, tr = setup.task, setup.ckpt, trainer_config(setup.cfg)
    data = encode(task, setup.split.examples, setup.split.labels)
    res = evaluate(
        task.model, data, tr.eval_batch_size, setup.device, setup.amp, task.left_pad, len(task.label_names),
        task.label_names,
    )
    out = {"checkpoint": str(ckpt), "split": setup.split_name, "examples": len(data), **res}
    # printed first: evaluating may have taken long, and a full disk or read-only folder must not lose the result
    print(metrics_line(out), flush=True)
    target = ckpt.parent / "eval.json"
    if not _written_by_eval(target):
        raise PtuneError(
            f"the metrics of {str(ckpt)!r} are printed above; {str(target)!r} was not written by ptune eval, so it "
            "is kept: move it away to have them written there"
        )
    try:
        atomic_write_json(target, out)
    except (OSError, ValueError) as exc:  # ValueError: a NaN metric, which JSON cannot hold
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PtuneError(
            f"the metrics of {str(ckpt)!r} are printed above, but {str(target)!r} could not be written: {reason}"
        ) from None
    return out


EVAL_KEYS = ("checkpoint", "split", "examples", "accuracy")


def _written_by_eval(target: Path) -> bool:
    """Whether ``ptune eval`` may replace ``target``: absent, or a JSON object of the keys it writes. A checkpoint
    can sit in a folder that ptune did not create (a copied checkpoint/ beside the user's own files), and a link
    there may be the user's too."""
    if target.is_symlink():
        return False
    if not target.exists():
        return True
    try:
        row = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(row, dict) and all(k in row for k in EVAL_KEYS)


def metrics_line(row: dict) -> str:
    """The machine-readable line ``ptune eval`` prints per checkpoint (full precision, greppable)."""
    line = f"{row['checkpoint']}: accuracy={row['accuracy']:.6f}"
    keys = ("macro_f1", "weighted_f1", "mcc", "ece", "exact_match", "rouge_l", "bleu")  # the last 3: readout=generate
    extra = " ".join(f"{k}={row[k]:.6f}" for k in keys if k in row)
    per_class = " ".join(
        f"{name}:p={m['precision']:.4f},r={m['recall']:.4f},f1={m['f1']:.4f},n={m['support']}"
        for name, m in row.get("per_class", {}).items()
    )
    confusion = row.get("confusion", {}).get("matrix")
    return " ".join(x for x in (line, extra, per_class, f"confusion={confusion}" if confusion else "") if x)
