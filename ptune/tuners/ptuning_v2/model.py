from __future__ import annotations

import torch
from torch import nn

from ..base import Tuner, TunerContext
from .config import PTuningV2Config


def initial_prefixes(ctx: TunerContext, length: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """[sites, 2, heads, length, head_dim]: keys/values of real tokens (well scaled), or small noise."""
    s = ctx.sites
    heads, dim = s[0].heads, s[0].head_dim
    if init == "vocab" and ctx.site_init is not None and length > 0:
        kv = ctx.site_init(length)
        return torch.stack([torch.stack([k[0], v[0]]) for k, v in kv]).float()
    return torch.randn(len(s), 2, heads, length, dim, generator=generator) * 0.02


class PTuningV2(Tuner):
    """The key/value prefixes are the parameters: nothing to fold at save time."""

    config_class = PTuningV2Config
    is_deep = True
    peft_type = "PREFIX_TUNING"

    def __init__(self, config: PTuningV2Config, ctx: TunerContext, tokenizer, generator: torch.Generator):
        super().__init__()
        self.config = config
        self.prefix = nn.Parameter(initial_prefixes(ctx, config.prompt_length, config.init, generator))
        self.dropout = nn.Dropout(config.dropout)

    def deep_prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        return split_sites(self.dropout(self.prefix))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"deep_prefix": self.prefix.detach()}

    def load_exported(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.prefix.copy_(state["deep_prefix"])


def split_sites(prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[sites, 2, heads, length, dim] -> per site (key, value) [1, heads, length, dim].

    Under autocast the whole prefix is cast once here (not once per site and layer), and ``unbind`` views
    backpropagate as one stack rather than one full-size zero gradient per indexed site."""
    device = prefix.device.type
    if torch.is_autocast_enabled(device):
        prefix = prefix.to(torch.get_autocast_dtype(device))
    return [(k, v) for k, v in (site.unbind(0) for site in prefix.unsqueeze(2).unbind(0))]
