"""Rebuild a PromptModel from a checkpoint and evaluate it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .build import Task, build_task, encode
from .checkpoint import atomic_write_json, find_checkpoint, load_trainable_state, read_checkpoint
from .data import load_split
from .errors import PtuneError
from .evaluate import evaluate
from .frozen import prepare_frozen_backbone
from .train import pick_amp, pick_device, seed_everything, subsample, trainer_config

IDENTITY_KEYS = ("model_type", "hidden_size", "num_layers", "vocab_size")


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, _, value = item.partition("=")
        if not key or OmegaConf.select(cfg, key.lstrip("+"), default="__missing__") == "__missing__":
            if not key.startswith("+"):
                raise PtuneError(
                    f"override {item!r} names no key of the saved config (prefix + to add a new key)"
                )
        OmegaConf.update(
            cfg, key.lstrip("+"), OmegaConf.create({"v": value}).v if value else None, merge=True
        )
    return cfg


def load_task(path: str | Path, overrides: list[str] | None = None) -> tuple[Task, DictConfig, Path, dict]:
    ckpt = find_checkpoint(path)
    cfg, meta, state = read_checkpoint(ckpt)
    cfg = apply_overrides(cfg, overrides or [])
    tr = trainer_config(cfg)
    seed_everything(tr.seed)
    task = build_task(cfg, list(meta["label_names"]), tr.seed)
    check_same_backbone(meta.get("backbone", {}), task.backbone.identity, ckpt)
    load_trainable_state(task.model, state)
    return task, cfg, ckpt, meta


def identity_mismatch(a: dict, b: dict) -> str | None:
    """The first identity key on which two backbone identities disagree, or None."""
    for key in ("sha256", *IDENTITY_KEYS):
        if key in a and key in b and a[key] != b[key]:
            return key
    return None


def check_same_backbone(saved: dict, current: dict, where: Path) -> None:
    key = identity_mismatch(saved, current)
    if key is not None:
        raise PtuneError(
            f"checkpoint {str(where)!r} was trained on a different backbone: {key} {saved[key]!r} there, "
            f"{current[key]!r} for {current.get('name_or_path')!r}"
        )


def evaluate_checkpoint(path: str | Path, overrides: list[str]) -> dict:
    task, cfg, ckpt, meta = load_task(path, overrides)
    tr = trainer_config(cfg)
    device = pick_device(tr.device)
    amp = pick_amp(tr.precision, device)
    split_name = str(cfg.dataset.get("split", cfg.dataset.get("eval_split", "dev")))
    split = load_split(cfg.dataset, split_name, cfg.data.get("root"))
    if split.label_names != task.label_names:
        raise PtuneError(f"data labels {split.label_names} differ from the checkpoint's {task.label_names}")
    split = subsample(split, cfg.dataset.get("max_eval_samples"), 0)
    data = encode(task, split.examples, split.labels)
    task.model.to(device)
    prepare_frozen_backbone(task.backbone.model, amp, tr.cast_frozen_weights, tr.fuse_projections)
    res = evaluate(task.model, data, tr.eval_batch_size, device, amp, task.left_pad, len(task.label_names))
    out = {"checkpoint": str(ckpt), "split": split_name, "examples": len(data), **res}
    atomic_write_json(ckpt.parent / "eval.json", out)
    return out


def print_eval_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ptune eval")
    for col in ("checkpoint", "split", "examples", "accuracy", "macro_f1", "eval ex/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["checkpoint"],
            r["split"],
            str(r["examples"]),
            f"{r['accuracy']:.4f}",
            f"{r['macro_f1']:.4f}",
            f"{r['eval_examples_per_s']:.1f}",
        )
    Console().print(table)
    for r in rows:
        print(f"{r['checkpoint']}: accuracy={r['accuracy']:.6f} macro_f1={r['macro_f1']:.6f}")
