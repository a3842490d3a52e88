"""Readouts turn the backbone's output into class scores: a verbalizer over LM logits, or a linear head."""

from __future__ import annotations

import torch
from torch import nn

from .errors import PtuneError
from .verbalizer import Verbalizer


class VerbalizerReadout(nn.Module):
    """Class scores from the answer slot's vocabulary logits; optional content-free calibration offsets."""

    def __init__(self, verbalizer: Verbalizer):
        super().__init__()
        self.verbalizer = verbalizer
        self.register_buffer("calibration", torch.zeros(len(verbalizer.label_names)))

    def forward(self, vocab_logits: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``vocab_logits`` over the whole vocabulary, or over just the token ``ids`` when given."""
        return self.verbalizer.class_scores(vocab_logits.float(), ids) - self.calibration


class ClsHead(nn.Module):
    """Linear classifier on the pooled encoder output ([CLS] token or mean of real tokens)."""

    def __init__(self, hidden_size: int, num_classes: int, pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise PtuneError(f"template.pooling={pooling!r} is not valid: use cls or mean")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_classes)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return self.linear(self.dropout(pooled))
