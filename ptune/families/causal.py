"""GPT-2/Llama/Gemma-like decoders: the answer is the next token after the input."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from .base import Family

if TYPE_CHECKING:
    from ..prompt_model import PromptModel


class CausalFamily(Family):
    name: ClassVar[str] = "causal"
    answer_mode: ClassVar[str] = "end"
    head_class: ClassVar[type] = AutoModelForCausalLM
    left_pad: ClassVar[bool] = True
    causal_attention: ClassVar[bool] = True
    label_rows_only: ClassVar[bool] = True
    packs_rows: ClassVar[bool] = True  # rotary or absolute positions from position_ids; attention causal per row
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    peft_prefix_export: ClassVar[bool] = True
    answer_description: ClassVar[str] = "next-token logits at the last position"

    @classmethod
    def matches(cls, config: PretrainedConfig) -> bool:
        """BERT-like types also appear in the causal-LM auto mapping (``BertLMHeadModel``), so they count as
        causal only when the config says ``is_decoder``."""
        model_type = getattr(config, "model_type", "") or ""
        if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            return bool(getattr(config, "is_decoder", False))
        architectures = list(getattr(config, "architectures", None) or [])
        if any("ForCausalLM" in a or "LMHeadModel" in a for a in architectures):
            return True
        return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def summary_state(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last real token: the only one that has seen the whole input (left or right padding)."""
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]

    def head_logits(self, model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """The LM head (only its ``ids`` rows when given), with Gemma's final logit soft-capping."""
        head = model.get_output_embeddings()
        if ids is None:
            logits = head(hidden)
        else:
            bias = head.bias[ids] if getattr(head, "bias", None) is not None else None
            logits = torch.nn.functional.linear(hidden, head.weight[ids], bias)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def word_logits(
        self, pm: PromptModel, embeds: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor,
        words: torch.Tensor, per_example: int,
    ) -> torch.Tensor:
        """Each word's tokens are written right after the answer position (later tokens masked out; causal
        attention makes what follows irrelevant anyway); logits from the positions before each word token."""
        b, h = embeds.shape[0], embeds.shape[-1]
        t, n, dev = words.shape[1], per_example, embeds.device
        e = torch.cat([embeds, embeds.new_zeros(b, t, h)], 1).repeat_interleave(n, 0)
        m = torch.cat([attention_mask, attention_mask.new_zeros(b, t)], 1).repeat_interleave(n, 0)
        ans = answer_pos.repeat_interleave(n, 0)[:, None]
        slots = ans + 1 + torch.arange(t, device=dev)[None]  # where the word's tokens go
        e = e.scatter(1, slots[..., None].expand(-1, -1, h), pm.embeddings(words).to(e.dtype))
        cols = torch.arange(e.shape[1], device=dev)[None]
        m = torch.where(cols <= ans, m, (cols <= ans + t).to(m.dtype))
        hidden = pm.hidden_states(e, m)
        hidden = hidden.gather(1, (slots - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.head_logits(pm.backbone, hidden, None)
