from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig


@dataclass
class PTuningV2Config(MethodConfig):
    """Liu et al. 2022: trainable key/value prefixes in every attention layer, no reparameterisation."""

    name: str = "ptuning_v2"
    prompt_length: int = 20  # key/value prefixes per attention layer
    init: str = "vocab"  # vocab: keys/values of sampled real tokens; random: N(0, 0.02)
    dropout: float = 0.0  # dropout on the prefixes while training

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("init", self.init, ("vocab", "random"))
        self.check_range("dropout", self.dropout, 0.0, 0.99)
