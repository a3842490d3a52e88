from __future__ import annotations

import torch
from torch import nn

from ..base import Tuner, TunerContext, initial_prefixes, split_sites
from .config import PTuningV2Config


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
