from __future__ import annotations

import torch
from torch import nn

from ..base import Tuner, TunerContext, init_soft_vectors
from .config import SoftPromptConfig


class SoftPrompt(Tuner):
    """The prompt vectors are the parameters: nothing to fold at save time."""

    config_class = SoftPromptConfig
    uses_soft_tokens = True
    peft_type = "PROMPT_TUNING"

    def __init__(self, config: SoftPromptConfig, ctx: TunerContext, tokenizer, generator: torch.Generator):
        super().__init__()
        self.config = config
        self.prompt = nn.Parameter(
            init_soft_vectors(ctx, config.init, config.init_text, tokenizer, generator)
        )

    def soft_vectors(self) -> torch.Tensor | None:
        return self.prompt if self.prompt.shape[0] else None

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"soft_prompt": self.prompt.detach()}

    def load_exported(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.prompt.copy_(state["soft_prompt"])
