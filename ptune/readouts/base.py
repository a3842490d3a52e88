"""The readout protocol: how a prompt-filled backbone's output becomes what a task predicts.

A readout (``template.readout``) is a strategy object beside ``Family`` and ``Tuner``: it says which backbone head
it needs, how the answer slot is rendered, how targets are encoded, what the training loss is, how class scores (or
generated texts) are read, which metrics its evaluation reports, what ``ptune export`` writes for it and how
``ptune predict`` and ``ptune serve`` may use it. Code outside ``ptune/readouts/`` asks the readout object instead
of testing its type, so a new readout is one module here plus one line in ``ptune/readouts/__init__.py``
(a test scans ``ptune/`` for type tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..batching import Encoded
from ..errors import PtuneError
from ..metrics import CLASSIFIER_SELECTABLE

if TYPE_CHECKING:
    from ..families import Family
    from ..prompt_model import PromptModel


class Readout(nn.Module):
    """One readout; subclasses set the class facts and override what differs. The defaults are a classifier's:
    class scores from ``run`` then ``read``, cross-entropy loss, classification metrics."""

    name: ClassVar[str]
    """The ``template.readout`` value that selects this readout."""
    needs_lm_head: ClassVar[bool] = True
    """The backbone is loaded with its LM / MLM head (an encoder is otherwise loaded bare)."""
    generates_text: ClassVar[bool] = False
    """Predictions are generated texts (``ptune predict --generate``), not class scores."""
    calibratable: ClassVar[bool] = False
    """Has a ``calibration`` buffer of class-score offsets (``template.calibrate``, ptune/calibration.py)."""
    reads_vocabulary: ClassVar[bool] = False
    """Class scores are read off the answer slot's vocabulary logits (``self(vocab_logits)``), so multi-prompt
    serving may compute the vocabulary logits once for several prompts."""
    metrics: ClassVar[tuple[str, ...]] = CLASSIFIER_SELECTABLE
    """The ``trainer.metric`` values its evaluation reports (higher is better)."""
    trains_own_parameters: ClassVar[bool] = False
    """Has trainable parameters of its own (a head), trained at ``trainer.head_lr``."""
    weighs_classes: ClassVar[bool] = True
    """Its loss is over classes, so ``trainer.class_weights=balanced`` applies."""
    no_label_words: ClassVar[str] = ""
    """Why there are no label words (for ``method.init=labels``), where the readout has none."""
    verbalizer: Any = None
    """The ``Verbalizer`` (label words as token ids) where the readout scores label words."""

    # ---------------------------------------------------------------- building (before the object exists)
    @classmethod
    def check_backbone(cls, family: Family, backbone, name: str) -> None:
        """Refuse a backbone this readout cannot read (``name``: the configured backbone, for the message)."""

    @classmethod
    def answer_mode(cls, family: Family) -> str:
        """How the template's answer slot is rendered (``TemplateRenderer.answer_mode``)."""
        return family.answer_mode

    @classmethod
    def target_length(cls, tcfg, family: Family) -> int:
        """Tokens of the input length the target needs in the same sequence (0: the target is not in it)."""
        return 0

    @classmethod
    def create(cls, tcfg, label_names: list[str], backbone, template, seed: int) -> Readout:
        """The readout for template config ``tcfg`` (a ``TemplateConfig``) on ``backbone``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- label words
    def label_word_ids(self) -> list[int]:
        """First token of every label word (``method.init=labels``); empty where there are none."""
        return []

    # ---------------------------------------------------------------- data and training
    def encode(self, renderer, examples: list[dict[str, str]], labels: list[int], ids: list[list[int]],
               answers: list[int]) -> Encoded:
        """The encoded split: rendered prompts plus whatever targets the loss needs."""
        return Encoded(ids, answers, list(labels))

    def loss(self, pm: PromptModel, data: Encoded, idx: list[int], batch: dict[str, torch.Tensor],
             device: torch.device, class_weight: torch.Tensor | None) -> torch.Tensor:
        """Training loss of examples ``idx`` (``batch``: their collated rows)."""
        logits = pm(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["answer_pos"].to(device))
        return nn.functional.cross_entropy(logits.float(), batch["labels"].to(device), class_weight)

    def check_class_weights(self) -> None:
        """Refuse ``trainer.class_weights=balanced`` where the loss has no classes to weigh."""

    # ---------------------------------------------------------------- forward
    def run(self, pm: PromptModel, embeds: torch.Tensor, attention_mask: torch.Tensor,
            answer_pos: torch.Tensor) -> torch.Tensor:
        """The backbone's forward (inside the deep-prompt context): what ``read`` turns into class scores."""
        return pm.family.run(pm, embeds, attention_mask)

    def read(self, pm: PromptModel, states: torch.Tensor, attention_mask: torch.Tensor,
             answer_pos: torch.Tensor) -> torch.Tensor:
        """[B, C] class scores from what ``run`` returned."""
        raise NotImplementedError

    @property
    def shares_prefix(self) -> bool:
        """A causal LM may compute the prefix shared by every row once (``PromptModel.share_prefix``): true where
        the scores depend only on the positions after it."""
        return True

    def mixable(self, family: Family) -> bool:
        """Multi-prompt serving may run this prompt's rows in one forward with other prompts' rows (the family's
        ``run``, then ``read``)."""
        return True

    def decodes_mixed(self, family: Family) -> bool:
        """Serving may decode this prompt's rows (POST /v1/completions) in one batch with other prompts' rows:
        per-row soft vectors and deep prefixes on ``generation._Decoder`` (``server.decode.decode_rows``). Only a
        readout that writes text decodes."""
        return False

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, pm: PromptModel, data: Encoded, batch_size: int, device, amp, left_pad: bool,
                 num_classes: int, label_names: list[str] | None = None) -> dict:
        """Metrics of one split (``metrics`` lists the selectable ones) plus ``eval_examples_per_s``."""
        import time

        from ..evaluate import metrics_from_logits, predict_logits

        start = time.perf_counter()
        logits = predict_logits(pm, data, batch_size, device, amp, left_pad)
        wall = time.perf_counter() - start
        result = metrics_from_logits(logits, data.labels, num_classes, label_names)
        result["eval_examples_per_s"] = len(data) / max(wall, 1e-9)
        return result

    # ---------------------------------------------------------------- export (ptune export --format peft)
    def export_info(self, pm: PromptModel, out: Path) -> dict[str, Any]:
        """The ``readout`` entry of ``ptune_export.json`` (files it needs are written into ``out``)."""
        raise NotImplementedError

    def export_reference(self, pm: PromptModel, ids: torch.Tensor, answer: int) -> torch.Tensor:
        """ptune's scores for one rendered row ``ids`` [1, L], to compare with the PEFT reload's."""
        return pm(ids, torch.ones_like(ids), torch.tensor([max(answer, 0)]))

    def export_scores(self, pm: PromptModel, output: torch.Tensor, answer: int) -> torch.Tensor:
        """The same scores computed from the PEFT model's output for that row (logits or hidden states)."""
        row = output[:, pm.family.output_answer_index(answer)]
        ids = pm.answer_ids(row.device)
        return self(row if ids is None else row[:, ids], ids)

    # ---------------------------------------------------------------- prediction
    def check_prediction(self, generate: bool, name: str) -> None:
        """Refuse ``ptune predict`` of checkpoint ``name`` in the other mode (``generate``: --generate given)."""
        if generate:
            raise PtuneError(
                f"--generate needs a checkpoint trained with template.readout=generate; {name!r} has "
                f"template.readout={self.name}"
            )

    def describe(self) -> str:
        """What ``ptune show-template`` says the model reads (after the rendered tokens), where it is not a slot."""
        return ""
