from __future__ import annotations

import torch
from torch import nn

from ..base import Tuner, TunerContext, init_soft_vectors
from .config import PTuningV1Config


class PTuningV1(Tuner):
    """Virtual tokens from a prompt encoder (bi-LSTM + MLP, or MLP) over seed vectors, folded at save time."""

    config_class = PTuningV1Config
    uses_soft_tokens = True
    folds_at_save = True
    peft_type = "PROMPT_TUNING"

    def __init__(self, config: PTuningV1Config, ctx: TunerContext, tokenizer, generator: torch.Generator):
        super().__init__()
        self.config = config
        h = ctx.hidden_size
        inner = config.encoder_hidden or h
        self.seed_vectors = nn.Parameter(
            init_soft_vectors(ctx, config.init, config.init_text, tokenizer, generator)
        )
        self.lstm = (
            nn.LSTM(h, inner // 2, num_layers=2, bidirectional=True, batch_first=True, dropout=config.dropout)
            if config.encoder == "lstm"
            else None
        )
        mlp_in = (inner // 2) * 2 if self.lstm is not None else h
        self.mlp = nn.Sequential(nn.Linear(mlp_in, inner), nn.ReLU(), nn.Linear(inner, h))
        # Start near identity on the seed vectors, so the chosen init is (almost) what the backbone first sees;
        # small rather than zero output weights keep gradients flowing into the LSTM from the first step.
        nn.init.normal_(self.mlp[2].weight, std=1e-3)
        nn.init.zeros_(self.mlp[2].bias)
        self.register_buffer("folded", None)

    def soft_vectors(self) -> torch.Tensor | None:
        if self.folded is not None:
            return self.folded if self.folded.shape[0] else None
        if self.seed_vectors.shape[0] == 0:
            return None
        x = self.seed_vectors
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.seed_vectors + self.mlp(x)

    def export_state(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            v = self.soft_vectors()
        return {"soft_prompt": (v if v is not None else self.seed_vectors).detach().clone()}

    def load_exported(self, state: dict[str, torch.Tensor]) -> None:
        self.folded = state["soft_prompt"].clone()
        for p in self.parameters():
            p.requires_grad_(False)
