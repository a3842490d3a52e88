from __future__ import annotations

import torch
from torch import nn

from ..base import Tuner, TunerContext, initial_prefixes, split_sites
from .config import PrefixConfig


class PrefixTuning(Tuner):
    """prefix = init + MLP(embedding): starts at real-token keys/values, the MLP learns the offset."""

    config_class = PrefixConfig
    is_deep = True
    folds_at_save = True
    peft_type = "PREFIX_TUNING"

    def __init__(self, config: PrefixConfig, ctx: TunerContext, tokenizer, generator: torch.Generator):
        super().__init__()
        self.config = config
        base = initial_prefixes(ctx, config.prompt_length, "vocab", generator)
        self.register_buffer("base", base)
        self.shape = tuple(base.shape)
        per_token = self.shape[0] * 2 * self.shape[2] * self.shape[4]
        self.embedding = nn.Parameter(
            torch.randn(config.prompt_length, ctx.hidden_size, generator=generator) * 0.02
        )
        self.mlp = nn.Sequential(
            nn.Linear(ctx.hidden_size, config.prefix_projection),
            nn.Tanh(),
            nn.Linear(config.prefix_projection, per_token),
        )
        nn.init.normal_(self.mlp[2].weight, std=1e-3)  # near the init, but gradients reach every layer
        nn.init.zeros_(self.mlp[2].bias)
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer("folded", None)

    def _prefix(self) -> torch.Tensor:
        if self.folded is not None:
            return self.folded
        sites, _, heads, length, dim = self.shape
        delta = self.mlp(self.embedding)  # [length, sites*2*heads*dim]
        delta = delta.view(length, sites, 2, heads, dim).permute(1, 2, 3, 0, 4)
        return self.base + delta

    def deep_prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        return split_sites(self.dropout(self._prefix()))

    def export_state(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"deep_prefix": self._prefix().detach().clone()}

    def load_exported(self, state: dict[str, torch.Tensor]) -> None:
        self.folded = state["deep_prefix"].clone()
        for p in self.parameters():
            p.requires_grad_(False)
