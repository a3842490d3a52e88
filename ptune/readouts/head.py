"""template.readout=head: a linear classifier on the backbone's pooled hidden state, on every family.

``pooling=cls`` reads the family's summary state (``Family.summary_state``): an encoder's first token ([CLS]), a
decoder's last real token (as PEFT's SEQ_CLS and transformers' ``*ForSequenceClassification`` pool it, left or
right padding alike), a seq2seq model's first decoder state (``Family.run_hidden``); ``pooling=mean`` averages the
real tokens of an encoder or a decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PtuneError
from .base import Readout


class HeadReadout(Readout):
    """Linear classifier on the pooled hidden state (the summary token, or the mean of real tokens)."""

    name = "head"
    trains_own_parameters = True
    needs_lm_head = False
    no_label_words = "template.readout=head reads a linear head, which has no label words"

    def __init__(self, hidden_size: int, num_classes: int, pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise PtuneError(f"template.pooling={pooling!r} is not valid: use cls or mean")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_classes)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def answer_mode(cls, family) -> str:
        return "none"

    @classmethod
    def create(cls, tcfg, label_names, backbone, template, seed: int) -> HeadReadout:
        family = backbone.family
        if tcfg.pooling == "mean" and not family.head_reads_input:
            raise PtuneError(
                f"template.pooling=mean averages the input's hidden states, but a {family} backbone's head reads "
                "the decoder's first state: use template.pooling=cls"
            )
        hidden = backbone.model.get_input_embeddings().embedding_dim
        return cls(hidden, len(label_names), tcfg.pooling, tcfg.head_dropout)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, family=None) -> torch.Tensor:
        """Class scores from hidden states [B, L, H]; ``family`` picks the summary state (the first token
        when None)."""
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0] if family is None else family.summary_state(hidden, attention_mask)
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return self.linear(self.dropout(pooled))

    def run(self, pm, embeds, attention_mask, answer_pos):
        return pm.family.run_hidden(pm, embeds, attention_mask)

    def read(self, pm, states, attention_mask, answer_pos):
        return self(states, attention_mask, pm.family)

    @property
    def shares_prefix(self) -> bool:
        """The mean would leave the shared prefix's tokens out."""
        return self.pooling != "mean"

    def mixable(self, family) -> bool:
        """Serving's mixed forward runs ``family.run``, which returns the hidden states only where they are the
        ones the head reads."""
        return family.head_reads_input

    def export_info(self, pm, out):
        from safetensors.torch import save_file

        if not pm.family.peft_head_export:
            raise PtuneError(
                f"ptune export of template.readout=head needs an encoder backbone (PEFT's {pm.family.peft_task_type} "
                f"adapter of a {pm.family} backbone returns logits, not the hidden states the head reads)"
            )
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in self.linear.state_dict().items()},
            str(out / "ptune_head.safetensors"),
        )
        return {
            "kind": "head",
            "file": "ptune_head.safetensors",
            "pooling": self.pooling,
            "how": "logits = weight @ pooled + bias; pooled = hidden[:, 0] (cls) or the mean over attended "
            "positions, virtual tokens included (mean)",
        }

    def export_scores(self, pm, output, answer):
        """``output``: the hidden states (the head is exported beside the adapter)."""
        return self(output, torch.ones(output.shape[:2], dtype=torch.long, device=output.device), pm.family)

    def describe(self) -> str:
        return f"linear head ({self.pooling} pooling)"
