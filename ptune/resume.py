"""Resumable training state: written every `trainer.save_every` steps, read back by `trainer.resume=true`.

Everything needed to continue bit-for-bit on CPU: the raw (unfolded) trainable weights, optimizer and scheduler
state, GradScaler state, the step, every RNG state and the data-order position (the rest of the current epoch's
batch list plus the sampler's RNG). Tensors go to safetensors, the rest to JSON: no pickle is ever loaded.
The folder is built aside and swapped in, so a kill leaves either the previous state or the new one.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder, readable_folder
from .errors import PtuneError
from .runtime import AUTO_DTYPE

STATE_DIR = "resume"
CONFIG = "config.yaml"  # the config the state was trained with (Hydra rewrites .hydra/config.yaml at each start)


@dataclass
class LoopState:
    """The training loop's own counters, saved with the tensors."""

    step: int = 0
    batches: list[list[int]] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    best: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    ckpt_bytes: int = 0
    train_examples: int = 0
    train_time: float = 0.0
    # results.json's speed figures (train.mark_speed): seconds of training at the marked steps
    first_step_s: float = 0.0
    warmup_s: float = 0.0
    half_time: float = 0.0
    half_examples: int = 0


def _rng_json(rng: random.Random) -> dict[str, Any]:
    version, internal, gauss = rng.getstate()
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "sampler": [version, list(internal), gauss],
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _restore_rng(data: dict[str, Any], rng: random.Random) -> None:
    v, internal, gauss = data["sampler"]
    rng.setstate((v, tuple(internal), gauss))
    v, internal, gauss = data["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_state(
    out_dir: Path, model, opt, sched, scaler, rng: random.Random, loop: LoopState, cfg: DictConfig
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("tuner", model.tuner), ("readout", model.readout)):
        for k, v in module.state_dict().items():
            if v is not None:
                tensors[f"model.{prefix}.{k}"] = v.detach().cpu().contiguous()
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {
        "loop": asdict(loop),
        "optim_param_groups": opt_state["param_groups"],
        "optim_scalars": {
            str(pid): {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
            for pid, st in opt_state["state"].items()
        },
        "scheduler": sched.state_dict() | {"lr_lambdas": None},
        "scaler": scaler.state_dict(),
        "rng": _rng_json(rng),
    }
    with atomic_folder(out_dir / STATE_DIR) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(_comparable(cfg)), encoding="utf-8")


# Settings a resumed run may change: they take effect from the resumed step on, and the run folder's
# .hydra/config.yaml records them. Every other difference from the state's config is refused.
RESUMABLE_KEYS = (
    "trainer.resume",
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.log_every",
    "trainer.save_every",
    "trainer.eval_batch_size",
    "trainer.early_stopping_patience",
    "trainer.tensorboard",
    "trainer.loggers",
    "trainer.mlflow_uri",
    "trainer.num_threads",
    "trainer.device",
    "data.root",
)


def _comparable(cfg: DictConfig) -> DictConfig:
    """The resolved config without Hydra's own section."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return OmegaConf.create(plain)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def _keys_added_since(saved: dict[str, Any], now: dict[str, Any], method: str | None) -> dict[str, Any]:
    """The keys a later ptune added to the schemas that a state's config lacks, at the value that does what the
    older ptune did: the schema default, unless ``config.BEHAVIOUR_BEFORE_KEY`` says otherwise. Without this every
    state saved before a release that added a key would be refused as "changed" by that key alone."""
    from .config import BEHAVIOUR_BEFORE_KEY, SCHEMAS
    from .tuners import METHODS

    schemas = dict(SCHEMAS) | ({"method": METHODS[method].config_class} if method in METHODS else {})
    defaults: dict[str, Any] = {}
    for group, schema in schemas.items():
        defaults |= _flatten(OmegaConf.to_container(OmegaConf.structured(schema)), f"{group}.")
    defaults |= BEHAVIOUR_BEFORE_KEY
    # a required key ("???") has no value an older run could have had: left unset, so it is refused as before
    return {k: defaults[k] for k in now.keys() - saved.keys() if defaults.get(k, "???") != "???"}


def check_same_config(out_dir: Path, cfg: DictConfig) -> list[str]:
    """Refuse a resume whose settings differ from those the saved state was trained with (they would be silently
    ignored by the restored optimizer and schedule, or mix two set-ups in one run). Returns the resumable keys that
    changed (they take effect), for the log."""
    from .checkpoint import load_plain_yaml

    folder = readable_folder(out_dir / STATE_DIR, CONFIG)
    if folder is None:  # a state written before ptune saved its config: nothing to compare with
        return []
    saved = _flatten(OmegaConf.to_container(load_plain_yaml(folder / CONFIG)))
    if cfg.backbone.get("dtype") == AUTO_DTYPE and saved.get("backbone.dtype") not in (None, AUTO_DTYPE):
        cfg.backbone.dtype = saved["backbone.dtype"]  # auto as settled when the run started, whatever this machine has
    now = _flatten(OmegaConf.to_container(_comparable(cfg), resolve=True))
    saved = _keys_added_since(saved, now, cfg.get("method", {}).get("name")) | saved
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k, "<unset>") != now.get(k, "<unset>"))
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        shown = ", ".join(f"{k}={now.get(k, '<unset>')!r} (saved {saved.get(k, '<unset>')!r})" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise PtuneError(
            f"resume keeps the settings the run started with, but these differ: {shown}{more}; drop them to resume, "
            "or start a new run to change them"
        )
    return changed


def clear_state(out_dir: Path) -> None:
    for name in (STATE_DIR, f".{STATE_DIR}.old"):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def has_state(out_dir: Path) -> bool:
    return readable_folder(out_dir / STATE_DIR, "state.json") is not None


def load_state(out_dir: Path, model, opt, sched, scaler, rng: random.Random) -> LoopState:
    # killed between the two renames of a save: the previous state is intact in .resume.old
    folder = readable_folder(out_dir / STATE_DIR, "state.json") or out_dir / STATE_DIR
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise PtuneError(f"resume state in {str(folder)!r} is unreadable ({exc}); start a fresh run") from None
    for prefix, module in (("tuner", model.tuner), ("readout", model.readout)):
        sd = {k[len(f"model.{prefix}.") :]: v for k, v in tensors.items() if k.startswith(f"model.{prefix}.")}
        module.load_state_dict(sd, strict=False)
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, scalars in meta["optim_scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    groups = [g | {"betas": tuple(g["betas"])} if "betas" in g else g for g in meta["optim_param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
    sched_state = {k: v for k, v in meta["scheduler"].items() if k != "lr_lambdas"}
    sched.__dict__.update(sched_state)
    scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    _restore_rng(meta["rng"], rng)
    return LoopState(**meta["loop"])
