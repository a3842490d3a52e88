"""T5/mT5-like encoder-decoders: the encoder reads the prompt, the decoder's first step predicts the answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers import AutoModelForSeq2SeqLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .base import Family

if TYPE_CHECKING:
    from ..prompt_model import PromptModel


class Seq2SeqFamily(Family):
    name: ClassVar[str] = "seq2seq"
    answer_mode: ClassVar[str] = "drop"
    head_class: ClassVar[type] = AutoModelForSeq2SeqLM
    writes_in_decoder: ClassVar[bool] = True
    head_reads_input: ClassVar[bool] = False
    peft_task_type: ClassVar[str] = "SEQ_2_SEQ_LM"
    answer_description: ClassVar[str] = "first decoder step's logits"

    @classmethod
    def matches(cls, config: PretrainedConfig) -> bool:
        return bool(getattr(config, "is_encoder_decoder", False))

    def body(self, model: PreTrainedModel) -> nn.Module:
        """The encoder: prompts go where the input is read (deep prompts also reach the decoder's attention)."""
        return model.get_encoder()

    def compile_target(self, model: PreTrainedModel) -> nn.Module:
        """The whole model: the forward runs the decoder too."""
        return model

    def probe_inputs(self, ids: torch.Tensor) -> dict[str, Any]:
        """The ids go to the decoder as well, so its self- and cross-attention sites run."""
        return {"input_ids": ids, "decoder_input_ids": ids}

    def decoder_start(self, model: PreTrainedModel, batch: int, device: torch.device) -> torch.Tensor:
        """[batch, 1] decoder start tokens: the decoder's first step is where the answer is predicted."""
        start = model.config.decoder_start_token_id or 0
        return torch.full((batch, 1), start, dtype=torch.long, device=device)

    def forward_inputs(self, model: PreTrainedModel, batch: int, device: torch.device) -> dict[str, Any]:
        return {"decoder_input_ids": self.decoder_start(model, batch, device)}

    def run(self, pm: PromptModel, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The first decoder step's vocabulary logits [B, V]."""
        extra = self.forward_inputs(pm.backbone, embeds.shape[0], embeds.device)
        return pm.backbone(inputs_embeds=embeds, attention_mask=attention_mask, **extra).logits[:, 0]

    def run_hidden(self, pm: PromptModel, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The first decoder step's hidden state [B, 1, H] (the state the answer's logits are computed from):
        the decoder has read the whole encoded input through cross-attention."""
        model = pm.backbone
        enc = model.get_encoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        start = self.decoder_start(model, embeds.shape[0], embeds.device)
        return model.get_decoder()(
            input_ids=start, encoder_hidden_states=enc, encoder_attention_mask=attention_mask
        ).last_hidden_state

    def answer_logits(
        self, model: PreTrainedModel, states: torch.Tensor, answer_pos: torch.Tensor, ids: torch.Tensor | None
    ) -> torch.Tensor:
        """``run`` already returns the answer's logits."""
        return states

    def word_logits(
        self, pm: PromptModel, embeds: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor,
        words: torch.Tensor, per_example: int,
    ) -> torch.Tensor:
        """The encoder runs once per example; each word goes to the decoder after the start token."""
        model = pm.backbone
        enc = model.get_encoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        dec = torch.cat([self.decoder_start(model, words.shape[0], words.device), words[:, :-1]], 1)
        return model(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc.repeat_interleave(per_example, 0)),
            attention_mask=attention_mask.repeat_interleave(per_example, 0),
            decoder_input_ids=dec,
        ).logits

    def output_answer_index(self, answer_pos: int) -> int:
        return 0
