"""BERT-like encoders: the answer is the [MASK] slot, read by the MLM head (or a linear head on the pooled output)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from ..errors import PtuneError
from .base import Family


class EncoderFamily(Family):
    name: ClassVar[str] = "encoder"
    answer_mode: ClassVar[str] = "mask"
    head_class: ClassVar[type] = AutoModelForMaskedLM
    head_optional: ClassVar[bool] = True
    generates_answer: ClassVar[bool] = False
    peft_head_export: ClassVar[bool] = True
    packs_rows: ClassVar[bool] = True  # positions from position_ids (absolute or relative)
    peft_task_type: ClassVar[str] = "FEATURE_EXTRACTION"  # PEFT has no masked-LM task; it returns the MLM's logits
    answer_description: ClassVar[str] = "logits at the [MASK] position"

    @classmethod
    def matches(cls, config: PretrainedConfig) -> bool:
        """The fallback: every config that is neither seq2seq nor causal."""
        return True

    def head_logits(self, model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        head = mlm_head(model)
        if head is None:
            raise PtuneError("no MLM head found on this backbone")
        return head(hidden)


def mlm_head(model: PreTrainedModel) -> nn.Module | None:
    """The MLM head: the one child of a *ForMaskedLM model besides its base model (None on a bare encoder).

    Its transform (dense + layer norm) runs before the vocabulary projection, so the head is called whole."""
    base = model.base_model
    heads = [m for _, m in model.named_children() if m is not base]
    return heads[0] if len(heads) == 1 else None
