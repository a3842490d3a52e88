"""Checkpoints hold only the trained prompt tensors (reparameterisations folded), the head, and the config.

Layout of ``checkpoint/``: ``prompt.safetensors``, ``config.yaml`` (resolved), ``meta.json`` (backbone identity,
label names, ptune version). Only safetensors, JSON and YAML are ever read back: no pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import PtuneError

WEIGHTS = "prompt.safetensors"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder and rename it over the target."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Binary counterpart of ``atomic_write_text``: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def trainable_state(model) -> dict[str, torch.Tensor]:
    state = {f"method.{k}": v for k, v in model.tuner.export_state().items()}
    for k, v in model.readout.state_dict().items():
        state[f"readout.{k}"] = v
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


@contextlib.contextmanager
def atomic_folder(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success swap it in for ``directory``.

    The previous folder is kept as ``.<name>.old`` until the new one is in place, so a kill at any moment
    leaves one complete version (the resume reader falls back to ``.old`` when ``directory`` is missing).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        yield tmp
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(directory: Path, model, cfg: DictConfig, meta: dict[str, Any]) -> int:
    """Build the checkpoint in a temporary sibling folder, then swap it in; returns the weights' bytes."""
    directory = Path(directory)
    with atomic_folder(directory) as tmp:
        save_file(trainable_state(model), str(tmp / WEIGHTS), metadata={"format": "pt", "ptune": __version__})
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps({**meta, "ptune_version": __version__}, indent=2) + "\n")
    return (directory / WEIGHTS).stat().st_size


def find_checkpoint(path: str | Path) -> Path:
    """Accept a run folder or its checkpoint/ folder."""
    p = Path(path)
    for cand in (p, p / "checkpoint"):
        if (cand / WEIGHTS).is_file() and (cand / "config.yaml").is_file():
            return cand
    raise PtuneError(f"no checkpoint at {str(path)!r}: expected a run folder holding checkpoint/{WEIGHTS}")


def read_checkpoint(directory: Path) -> tuple[DictConfig, dict[str, Any], dict[str, torch.Tensor]]:
    try:
        cfg = OmegaConf.load(directory / "config.yaml")
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupted checkpoint
        raise PtuneError(
            f"checkpoint {str(directory)!r} has an unreadable config.yaml/meta.json: {exc}"
        ) from None
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PtuneError(
            f"checkpoint weights {str(directory / WEIGHTS)!r} are corrupted or truncated ({exc})"
        ) from None
    return cfg, meta, state


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    method = {k[len("method.") :]: v for k, v in state.items() if k.startswith("method.")}
    readout = {k[len("readout.") :]: v for k, v in state.items() if k.startswith("readout.")}
    try:
        model.tuner.load_exported(method)
        model.readout.load_state_dict(readout)
    except (KeyError, RuntimeError) as exc:
        raise PtuneError(
            f"checkpoint weights do not fit this model/method: {str(exc).splitlines()[0]}"
        ) from None
