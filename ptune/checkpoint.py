"""Checkpoints hold only the trained prompt tensors (reparameterisations folded), the head, and the config.

Layout of ``checkpoint/``: ``prompt.safetensors``, ``config.yaml`` (resolved), ``meta.json`` (backbone identity,
label names, ptune version). Only safetensors, JSON and YAML are ever read back: no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder, readable_folder
from .errors import PtuneError, one_line
from .version import __version__

WEIGHTS = "prompt.safetensors"


def trainable_state(model) -> dict[str, torch.Tensor]:
    state = {f"method.{k}": v for k, v in model.tuner.export_state().items()}
    for k, v in model.readout.state_dict().items():
        state[f"readout.{k}"] = v
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(directory: Path, model, cfg: DictConfig, meta: dict[str, Any]) -> int:
    """Build the checkpoint in a temporary sibling folder, then swap it in; returns the weights' bytes."""
    directory = Path(directory)
    with atomic_folder(directory) as tmp:
        save_file(trainable_state(model), str(tmp / WEIGHTS), metadata={"format": "pt", "ptune": __version__})
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps({**meta, "ptune_version": __version__}, indent=2) + "\n")
    return (directory / WEIGHTS).stat().st_size


def find_checkpoint(path: str | Path) -> Path:
    """Accept a run folder or its checkpoint/ folder; a save killed between its two renames left the previous
    checkpoint as ``.checkpoint.old``, which is used then."""
    p = Path(path)
    for cand in (p, p / "checkpoint"):
        found = readable_folder(cand, WEIGHTS)
        if found is not None and (found / "config.yaml").is_file():
            return found
    raise PtuneError(f"no checkpoint at {str(path)!r}: expected a run folder holding checkpoint/{WEIGHTS}")


MAX_CONFIG_BYTES = 1 << 20  # a saved config is a few KB; anything near this was not written by ptune
MAX_DEPTH = 32
CONFIG_GROUPS = ("backbone", "method", "dataset", "template", "trainer")
# Keys of a saved config that name files or folders: a checkpoint may come from anyone, so these are never
# followed unless the user names them again (``ptune eval RUN dataset.dev_file=...``; data.root from PTUNE_DATA).
DATA_PATH_KEYS = ("data.root", "dataset.train_file", "dataset.dev_file", "dataset.test_file", "dataset.path")


def _check_plain(value: Any, where: str, depth: int = 0, interpolation: bool = False) -> None:
    """Plain data only: mappings with string keys, lists, scalars; no interpolation (saved configs are resolved)."""
    if depth > MAX_DEPTH:
        raise PtuneError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise PtuneError(f"{where} has a non-string key {k!r}")
            _check_plain(v, where, depth + 1, interpolation)
    elif isinstance(value, list):
        for v in value:
            _check_plain(v, where, depth + 1, interpolation)
    elif isinstance(value, str):
        if "${" in value and not interpolation:
            raise PtuneError(
                f"{where} holds an interpolation {value[:60]!r}: saved configs are plain resolved values"
            )
    elif value is not None and not isinstance(value, bool | int | float):
        raise PtuneError(f"{where} holds a value of type {type(value).__name__}")


def load_plain_yaml(path: Path, *, interpolation: bool = False) -> DictConfig:
    """Read a YAML file as plain data: size-capped, no anchors or aliases (no expansion bombs), no tags beyond the
    safe ones, no OmegaConf interpolation (``${oc.env:...}`` would read the environment). ``interpolation=True``
    only for a run's own ``.hydra/config.yaml``, which Hydra saves unresolved (``${oc.env:PTUNE_DATA,null}``)."""
    import yaml
    from omegaconf._utils import get_yaml_loader

    where = str(path)
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise PtuneError(f"{where!r} is larger than {MAX_CONFIG_BYTES} bytes: not a ptune config")
        text = Path(path).read_text(encoding="utf-8")
        loader = get_yaml_loader()  # a SafeLoader that reads floats such as 1e-05 as OmegaConf wrote them
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise PtuneError(f"{where!r} uses YAML anchors/aliases, which ptune never writes: refused")
        data = yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except PtuneError:
        raise
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise PtuneError(f"{where!r} is not readable YAML: {one_line(exc, 160)}") from None
    if not isinstance(data, dict):
        raise PtuneError(f"{where!r} is not a YAML mapping of config groups")
    _check_plain(data, repr(where), interpolation=interpolation)
    return OmegaConf.create(data)


def _load_meta(path: Path) -> dict[str, Any]:
    where = str(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise PtuneError(f"{where!r} is larger than {MAX_CONFIG_BYTES} bytes: not a ptune meta.json")
        meta = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except PtuneError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PtuneError(f"{where!r} is not readable JSON: {one_line(exc, 160)}") from None
    if not isinstance(meta, dict):
        raise PtuneError(f"{where!r} is not a JSON object")
    labels = meta.get("label_names")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise PtuneError(f"{where!r}: label_names must be a non-empty list of strings")
    if not isinstance(meta.get("backbone", {}), dict):
        raise PtuneError(f"{where!r}: backbone must be an object (the backbone identity)")
    return meta


def _no_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def _check_config(cfg: DictConfig, where: Path) -> None:
    for group in CONFIG_GROUPS:
        if not isinstance(cfg.get(group), DictConfig):
            raise PtuneError(f"checkpoint config {str(where)!r} has no {group}: mapping")
    for key in ("backbone.name", "method.name", "dataset.name"):
        if not isinstance(OmegaConf.select(cfg, key), str):
            raise PtuneError(f"checkpoint config {str(where)!r}: {key} must be a string")


def drop_data_paths(cfg: DictConfig) -> None:
    """Blank the saved config's file and folder paths (``DATA_PATH_KEYS``)."""
    for key in DATA_PATH_KEYS:
        if OmegaConf.select(cfg, key, default=None) is not None:
            OmegaConf.update(cfg, key, None, merge=False)


def read_checkpoint(directory: Path) -> tuple[DictConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """Config and meta as checked plain data, weights as finite tensors. The config's data paths are blanked."""
    cfg = load_plain_yaml(directory / "config.yaml")
    _check_config(cfg, directory / "config.yaml")
    drop_data_paths(cfg)
    meta = _load_meta(directory / "meta.json")
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PtuneError(
            f"checkpoint weights {str(directory / WEIGHTS)!r} are corrupted or truncated ({exc})"
        ) from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise PtuneError(
                f"checkpoint weights {str(directory / WEIGHTS)!r} hold NaN or Inf values ({name}): refused"
            )
    return cfg, meta, state


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    method = {k[len("method.") :]: v for k, v in state.items() if k.startswith("method.")}
    readout = {k[len("readout.") :]: v for k, v in state.items() if k.startswith("readout.")}
    try:
        model.tuner.load_exported(method)
        model.readout.load_state_dict(readout)
    except (KeyError, RuntimeError) as exc:
        raise PtuneError(
            f"checkpoint weights do not fit this model/method: {one_line(exc)}"
        ) from None
