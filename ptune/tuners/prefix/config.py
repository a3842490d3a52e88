from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig


@dataclass
class PrefixConfig(MethodConfig):
    """Li & Liang 2021: deep prefixes produced by an MLP from a small embedding (dropped after training)."""

    name: str = "prefix"
    prompt_length: int = 20  # key/value prefixes per attention layer
    prefix_projection: int = 512  # hidden size of the reparameterisation MLP
    dropout: float = 0.0  # dropout on the MLP's prefixes while training

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_range("prefix_projection", self.prefix_projection, 1)
        self.check_range("dropout", self.dropout, 0.0, 0.99)
