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

    def from_word_scores(self, word_scores: torch.Tensor) -> torch.Tensor:
        """[B, C, W] per-word scores (e.g. log-likelihoods for multi_token=full) -> calibrated class scores."""
        return self.verbalizer.aggregate(word_scores.float()) - self.calibration


def full_sequence_scores(pm, embeds: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor):
    """multi_token=full: class score = mean over the class's words of log p(all the word's tokens | prompt).

    Teacher forcing, one row per (example, word): the family (``word_logits``) feeds each word's tokens after
    the prompt (a causal LM after the answer position, a seq2seq decoder after its start token).
    ``pm`` is the PromptModel; call this inside its deep-prefix context.
    """
    verb = pm.readout.verbalizer
    c, w, t = verb.token_ids.shape
    dev, b, n = embeds.device, embeds.shape[0], c * w
    words = verb.token_ids.to(dev).view(n, t).repeat(b, 1)  # row i * n + j: example i, word j
    wmask = verb.token_mask.to(dev).view(n, t).repeat(b, 1)
    logits = pm.family.word_logits(pm, embeds, attention_mask, answer_pos, words, n)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, words[..., None]).squeeze(-1)
    return pm.readout.from_word_scores((logp * wmask).sum(-1).view(b, c, w))


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
