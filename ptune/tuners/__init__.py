"""Prompt-tuning methods, one package each (config validated on creation + model)."""

from __future__ import annotations

from typing import Any

from ..errors import PtuneError
from .base import MethodConfig, Tuner, TunerContext
from .prefix.config import PrefixConfig
from .prefix.model import PrefixTuning
from .ptuning_v1.config import PTuningV1Config
from .ptuning_v1.model import PTuningV1
from .ptuning_v2.config import PTuningV2Config
from .ptuning_v2.model import PTuningV2
from .soft_prompt.config import SoftPromptConfig
from .soft_prompt.model import SoftPrompt

METHODS: dict[str, tuple[type[MethodConfig], type[Tuner]]] = {
    "soft_prompt": (SoftPromptConfig, SoftPrompt),
    "ptuning_v1": (PTuningV1Config, PTuningV1),
    "ptuning_v2": (PTuningV2Config, PTuningV2),
    "prefix": (PrefixConfig, PrefixTuning),
}
DEEP_METHODS = {"ptuning_v2", "prefix"}


def method_config(cfg: dict[str, Any]) -> MethodConfig:
    name = cfg.get("name")
    if name not in METHODS:
        raise PtuneError(f"method.name={name!r} is not valid: use one of {', '.join(METHODS)}")
    return METHODS[name][0].from_mapping(dict(cfg))


def build_tuner(config: MethodConfig, ctx: TunerContext, tokenizer, seed: int) -> Tuner:
    generator = torch_generator(seed)
    return METHODS[config.name][1](config, ctx, tokenizer, generator)


def torch_generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


__all__ = ["DEEP_METHODS", "METHODS", "MethodConfig", "Tuner", "TunerContext", "build_tuner", "method_config"]
