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

    Teacher forcing, one row per (example, word): a causal LM gets the word's tokens written right after the
    answer position (later tokens masked out; causal attention makes what follows irrelevant anyway), a
    seq2seq model gets them as decoder input after the start token, with the encoder run once per example.
    ``pm`` is the PromptModel; call this inside its deep-prefix context.
    """
    verb = pm.readout.verbalizer
    c, w, t = verb.token_ids.shape
    dev, b, n = embeds.device, embeds.shape[0], c * w
    words = verb.token_ids.to(dev).view(n, t).repeat(b, 1)  # row i * n + j: example i, word j
    wmask = verb.token_mask.to(dev).view(n, t).repeat(b, 1)
    if pm.family == "seq2seq":
        from transformers.modeling_outputs import BaseModelOutput

        enc = pm.backbone.get_encoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        start = pm.backbone.config.decoder_start_token_id or 0
        dec = torch.cat([torch.full_like(words[:, :1], start), words[:, :-1]], 1)
        logits = pm.backbone(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc.repeat_interleave(n, 0)),
            attention_mask=attention_mask.repeat_interleave(n, 0),
            decoder_input_ids=dec,
        ).logits
    elif pm.family == "causal":
        h = embeds.shape[-1]
        e = torch.cat([embeds, embeds.new_zeros(b, t, h)], 1).repeat_interleave(n, 0)
        m = torch.cat([attention_mask, attention_mask.new_zeros(b, t)], 1).repeat_interleave(n, 0)
        ans = answer_pos.repeat_interleave(n, 0)[:, None]
        slots = ans + 1 + torch.arange(t, device=dev)[None]  # where the word's tokens go
        e = e.scatter(1, slots[..., None].expand(-1, -1, h), pm.embeddings(words).to(e.dtype))
        cols = torch.arange(e.shape[1], device=dev)[None]
        m = torch.where(cols <= ans, m, (cols <= ans + t).to(m.dtype))
        kwargs = {"position_ids": (m.long().cumsum(-1) - 1).clamp(min=0)} if pm._takes_positions else {}
        hidden = pm._body(inputs_embeds=e, attention_mask=m, **kwargs).last_hidden_state
        hidden = hidden.gather(1, (slots - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = pm.backbone.get_output_embeddings()(hidden)
        if pm._softcap:
            logits = torch.tanh(logits / pm._softcap) * pm._softcap
    else:
        raise PtuneError("template.multi_token=full needs a causal or seq2seq backbone: use first or mean")
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
