"""Prompt-tuning methods, one package each (config validated on creation + model), and their registry.

A method describes itself through its ``Tuner`` class attributes (see ``Tuner``); adding one is its folder, one
line in ``METHODS`` and one YAML file in conf/method/.
"""

from __future__ import annotations

from typing import Any

from ..errors import PtuneError
from .base import MethodConfig, Tuner, TunerContext
from .prefix.model import PrefixTuning
from .ptuning_v1.model import PTuningV1
from .ptuning_v2.model import PTuningV2
from .soft_prompt.model import SoftPrompt

METHODS: dict[str, type[Tuner]] = {
    tuner.config_class.name: tuner
    for tuner in (
        SoftPrompt,
        PTuningV1,
        PTuningV2,
        PrefixTuning,
    )
}


def method_config(cfg: dict[str, Any]) -> MethodConfig:
    name = cfg.get("name")
    if name not in METHODS:
        raise PtuneError(f"method.name={name!r} is not valid: use one of {', '.join(METHODS)}")
    return METHODS[name].config_class.from_mapping(dict(cfg))


def tuner_class(config: MethodConfig) -> type[Tuner]:
    """The method's Tuner class: what it is (deep, soft tokens, ...) is known before the tuner is built."""
    return METHODS[config.name]


def soft_token_methods() -> list[str]:
    """Names of the methods that fill {soft} template slots (for messages)."""
    return [name for name, tuner in METHODS.items() if tuner.uses_soft_tokens]


def build_tuner(config: MethodConfig, ctx: TunerContext, tokenizer, seed: int) -> Tuner:
    generator = torch_generator(seed)
    return tuner_class(config)(config, ctx, tokenizer, generator)


def torch_generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


__all__ = [
    "METHODS",
    "MethodConfig",
    "Tuner",
    "TunerContext",
    "build_tuner",
    "method_config",
    "soft_token_methods",
    "tuner_class",
]
