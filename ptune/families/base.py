"""What ptune needs to know about a backbone family, in one place: one ``Family`` subclass per family.

A family decides how a frozen model is loaded (which head class), run (decoder start token, position ids),
padded (which side), read (where the answer sits and which logits score it) and exported to PEFT. Everything
else in ptune asks the family object instead of comparing family names, so a new family is one new module here
plus one line in ``ptune/families/__init__.py``; a new architecture inside an existing family needs no change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from ..errors import PtuneError

if TYPE_CHECKING:
    from ..prompt_model import PromptModel


def position_ids(attention_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Position ids that skip padding: every row's first real token sits at ``offset``.

    Left padding (causal LMs) would otherwise push each row's real tokens to positions that depend on how much
    shorter the row is than the batch's longest; ``offset`` places rows behind a shared prefix of that length."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + offset


class Family:
    """A backbone family. Instances are stateless singletons (``ptune.families.FAMILIES``) that travel on
    ``Backbone`` and ``PromptModel``; one compares equal to its ``name``, the string that configs, meta.json,
    backbone identities (and so checkpoint compatibility checks) and messages carry."""

    name: ClassVar[str]
    answer_mode: ClassVar[str]
    """How ``TemplateRenderer`` places the answer: ``mask`` (an MLM slot), ``end`` (the next token after the
    input) or ``drop`` (nothing in the input: the decoder's first step predicts it)."""
    head_class: ClassVar[type]
    """The transformers auto class with the LM head that a verbalizer reads."""
    head_optional: ClassVar[bool] = False
    """True when the family is loaded bare (``AutoModel``) unless a verbalizer asks for its LM head; the others
    always load with their head, which their forward needs."""
    left_pad: ClassVar[bool] = False
    """Pad batches on the left, so the answer (the next token) is every row's last position."""
    causal_attention: ClassVar[bool] = False
    """Tokens see only earlier tokens, so a prefix shared by every row can be computed once per batch."""
    generates_answer: ClassVar[bool] = True
    """The answer is a generated token (next token or first decoder step), not a [MASK] slot: label words are
    tokenised as generated text (leading space after a space) and may be scored whole (multi_token=full)."""
    writes_in_decoder: ClassVar[bool] = False
    """Generated text comes from a separate decoder that reads the encoded input (``template.readout=generate``:
    the target is the decoder's input and labels), not from continuing the input sequence itself."""
    head_reads_input: ClassVar[bool] = True
    """A linear head (template.readout=head) reads the input's hidden states, the ones ``run`` returns too (so
    mean pooling and multi-prompt serving's shared forward apply); False where it reads a decoder state."""
    peft_head_export: ClassVar[bool] = False
    """``ptune export`` can verify a linear head: the PEFT adapter's forward returns the hidden states it reads."""
    label_rows_only: ClassVar[bool] = False
    """The verbalizer multiplies only the label words' rows of the LM head (Gemma's head alone has 168M
    weights) instead of computing logits over the whole vocabulary."""
    packs_rows: ClassVar[bool] = False
    """Rows of different lengths may share one sequence to score classes (``ptune.packing``): the body takes position
    ids and a ready 4D mask, and its self-attention goes through ptune's attention function (which runs it per row)
    and depends on nothing else across the sequence. Not seq2seq: the decoder's cross-attention would need packing
    too."""
    peft_task_type: ClassVar[str]
    """PEFT's ``task_type`` for an exported adapter."""
    peft_prefix_export: ClassVar[bool] = False
    """Deep prompts export to PEFT prefix tuning (PEFT shifts positions and routes prefixes per family)."""
    answer_description: ClassVar[str]
    """Where the answer is read, for ``ptune_export.json``."""

    # ---------------------------------------------------------------- identity: a family is its name
    def __eq__(self, other: object) -> bool:
        if isinstance(other, Family):
            return other.name == self.name
        return isinstance(other, str) and other == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ---------------------------------------------------------------- detection and loading
    @classmethod
    def matches(cls, config: PretrainedConfig) -> bool:
        """Whether ``config`` belongs to this family; ``detect_family`` asks the families in order."""
        raise NotImplementedError

    def wants_head(self, with_lm_head: bool) -> bool:
        return with_lm_head or not self.head_optional

    def auto_class(self, want_head: bool) -> type:
        """The transformers auto class to load: with the LM head, or the bare model."""
        return self.head_class if want_head else AutoModel

    def body(self, model: PreTrainedModel) -> nn.Module:
        """The module that turns input embeddings into the hidden states the answer is read from (and that
        deep prompts and a shared prefix run through)."""
        return model.base_model

    def compile_target(self, model: PreTrainedModel) -> nn.Module:
        """The part of the backbone that ``PromptModel.forward`` calls, so the part worth ``torch.compile``."""
        return self.body(model)

    def probe_inputs(self, ids: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments that run the whole model (every attention site) on token ids ``ids``."""
        return {"input_ids": ids}

    # ---------------------------------------------------------------- forward and readout
    def run(self, pm: PromptModel, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone's forward on prompt-filled embeddings; returns what ``answer_logits`` reads: here the
        body's hidden states [B, L, H]."""
        return pm.hidden_states(embeds, attention_mask)

    def run_packed(
        self, pm: PromptModel, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """``run`` on rows packed end to end in one sequence (``packs_rows``): ``mask`` [1, 1, T, T], which ptune's
        attention function sets aside for its per-row buckets (``deep_attention.prefixes(..., buckets=...)``);
        ``positions`` restarting at every row."""
        return pm.hidden_states(embeds, mask, positions)

    def run_hidden(self, pm: PromptModel, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states [B, L, H] a linear head (template.readout=head) pools."""
        return pm.hidden_states(embeds, attention_mask)

    def summary_state(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, H]: the one state that sums up each row for a linear head (``pooling=cls``): the first ([CLS])."""
        return hidden[:, 0]

    def answer_logits(
        self, model: PreTrainedModel, states: torch.Tensor, answer_pos: torch.Tensor, ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Vocabulary logits at each row's answer position, over the token ``ids`` only when given."""
        rows = torch.arange(states.shape[0], device=states.device)
        return self.head_logits(model, states[rows, answer_pos], ids)

    def head_logits(self, model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """The LM head on hidden states [..., H]."""
        raise NotImplementedError

    def word_logits(
        self, pm: PromptModel, embeds: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor,
        words: torch.Tensor, per_example: int,
    ) -> torch.Tensor:
        """Teacher-forced logits [B * per_example, T, V] predicting each label word's T tokens (multi_token=full):
        row i * per_example + j scores word j for example i. Only families that generate the answer can."""
        raise PtuneError("template.multi_token=full needs a causal or seq2seq backbone: use first or mean")

    def output_answer_index(self, answer_pos: int) -> int:
        """Where the answer's logits sit in the sequence of logits a plain forward returns (PEFT export)."""
        return answer_pos

    def forward_inputs(self, model: PreTrainedModel, batch: int, device: torch.device) -> dict[str, Any]:
        """Extra keyword arguments of a plain forward that reads the answer (a decoder start for seq2seq)."""
        return {}
