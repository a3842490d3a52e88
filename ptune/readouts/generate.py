"""template.readout=generate: the answer slot is a target text that the frozen backbone writes.

Training minimises the LM loss of the target tokens only (``lm_loss``): a causal LM reads prompt + input + target
(loss on the target), a seq2seq model reads prompt + input in the encoder and the target in the decoder.
Decoding and the text metrics live in ptune/generation.py.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PtuneError
from ..generation import GenEncoded, collate_prompts, evaluate_generation, first_step_logits, prompt_rows
from ..metrics import GENERATE_SELECTABLE
from ..tuners import deep_attention as da
from .base import Readout


class GenerateReadout(Readout):
    """No parameters, only where the target text comes from and how it is decoded.

    ``target``: the example field holding the target text, or None for the label's first label word
    (text-to-text classification)."""

    name = "generate"
    weighs_classes = False
    generates_text = True
    metrics = GENERATE_SELECTABLE
    no_label_words = "template.readout=generate has no template.label_words (its targets come from template.target)"

    def __init__(self, target: str | None, label_words: dict | None, label_names: list[str], stop_id: int,
                 max_target_length: int, leading_space: bool, tokenizer=None, decoding: str = "greedy",
                 num_beams: int = 4, seed: int = 0):
        super().__init__()
        self.tokenizer = tokenizer
        self.settings = {"strategy": decoding, "num_beams": num_beams, "seed": seed,
                         "max_new_tokens": max_target_length}
        self.target = target
        self.label_words = dict(label_words or {})
        self.label_names = list(label_names)
        self.stop_id = stop_id
        self.max_target_length = max_target_length
        self.leading_space = leading_space
        if target is None:
            missing = [n for n in self.label_names if not self.label_words.get(n)]
            if missing:
                raise PtuneError(
                    f"template.readout=generate without template.target needs a label word for every class: "
                    f"{missing[0]!r} has none in template.label_words"
                )


    @classmethod
    def check_backbone(cls, family, backbone, name: str) -> None:
        if not family.generates_answer:
            raise PtuneError(
                f"template.readout=generate needs a causal or seq2seq backbone, but {name!r} is {family}"
            )

    @classmethod
    def target_length(cls, tcfg, family) -> int:
        return tcfg.max_target_length if family.causal_attention else 0

    @classmethod
    def create(cls, tcfg, label_names, backbone, template, seed: int) -> GenerateReadout:
        family, tok = backbone.family, backbone.tokenizer
        return cls(
            tcfg.target, tcfg.label_words, label_names, stop_token(backbone.model, tok), tcfg.max_target_length,
            leading_space=family.causal_attention and template.text_before_mask().endswith(" "),
            tokenizer=tok, decoding=tcfg.decoding, num_beams=tcfg.num_beams, seed=seed,
        )

    def target_text(self, example: dict[str, str], label: int) -> str:
        if self.target is None:
            return str(self.label_words[self.label_names[label]][0])
        if self.target not in example:
            raise PtuneError(f"template.target={self.target!r} is not a field of the data: {', '.join(example)}")
        return str(example[self.target]).strip()

    def _tokenise(self, texts: list[str]) -> list[list[int]]:
        """Target texts as the backbone writes them (a leading space after a space in the template)."""
        shown = [(" " + t if self.leading_space and t else t) for t in texts]
        return [list(t) for t in self.tokenizer(shown, add_special_tokens=False)["input_ids"]] if shown else []

    def label_word_ids(self) -> list[int]:
        """First token of every label word as a target is written (``method.init=labels``)."""
        words = [str(w) for n in self.label_names for w in _as_list(self.label_words.get(n))]
        return [t[0] for t in self._tokenise(words) if t]

    def encode(self, renderer, examples, labels, ids, answers) -> GenEncoded:
        ids = prompt_rows(ids, answers)
        texts = [self.target_text(ex, lab) for ex, lab in zip(examples, labels, strict=True)]
        target_ids = [t[: self.max_target_length - 1] + [self.stop_id] for t in self._tokenise(texts)]
        return GenEncoded(ids, answers, list(labels), target_ids, texts)

    def loss(self, pm, data, idx, batch, device, class_weight):
        return lm_loss(pm, data, idx, device)

    def check_class_weights(self) -> None:
        raise PtuneError(
            "trainer.class_weights=balanced weighs classes of a classifier readout, but template.readout=generate "
            "trains on target tokens: use trainer.class_weights=none"
        )

    def read(self, pm, states, attention_mask, answer_pos):
        raise PtuneError("template.readout=generate writes text: it has no class scores")

    def mixable(self, family) -> bool:
        return False  # no class scores to mix: its rows decode (``decodes_mixed``)

    def decodes_mixed(self, family) -> bool:
        """The decode's inputs are the prompt's soft vectors and deep prefixes only, both of which stack per row;
        the stop token is the backbone's (``stop_token``), the same for every prompt on it."""
        return True

    def evaluate(self, pm, data, batch_size, device, amp, left_pad, num_classes, label_names=None) -> dict:
        """Decode, then exact match / ROUGE-L / BLEU."""
        return evaluate_generation(pm, data, batch_size, device, amp)

    def export_info(self, pm, out):
        return {
            "kind": "generate",
            "target": self.target or "the label's first label word",
            "label_words": self.label_words,
            "stop_token_id": self.stop_id,
            "max_new_tokens": self.max_target_length,
            "how": "decode the target text after the rendered template (greedy, beam or sampling) until the stop "
            "token; the adapter's first-step logits match ptune's",
        }

    def export_reference(self, pm, ids, answer):
        """The first generated token's vocabulary logits; generation starts right after the slot."""
        head = ids[:, : answer + 1] if answer >= 0 else ids
        return first_step_logits(pm, head, torch.ones_like(head))

    def export_scores(self, pm, output, answer):
        return output[:, pm.family.output_answer_index(answer)]

    def check_prediction(self, generate: bool, name: str) -> None:
        if not generate:
            raise PtuneError(f"checkpoint {name!r} generates text (template.readout=generate): add --generate")


def _as_list(words) -> list:
    if words is None:
        return []
    return list(words) if isinstance(words, list | tuple) else [words]


def stop_token(model, tok) -> int:
    """The token that ends a target: the model's eos, else the tokenizer's eos or [SEP]."""
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, list | tuple):
        eos = eos[0] if eos else None
    for cand in (eos, getattr(tok, "eos_token_id", None), getattr(tok, "sep_token_id", None)):
        if cand is not None:
            return int(cand)
    raise PtuneError("template.readout=generate needs a backbone with an end-of-sequence token")


def lm_loss(pm, data: GenEncoded, idx: list[int], device: torch.device) -> torch.Tensor:
    """Mean cross-entropy of the target tokens of examples ``idx`` given their prompts."""
    targets = [data.target_ids[i] for i in idx]
    prompts = [data.input_ids[i] for i in idx]
    model, family = pm.backbone, pm.family
    with da.prefixes(pm.tuner.deep_prefixes() if pm.tuner.is_deep else None):
        if family.writes_in_decoder:
            ids, mask = collate_prompts(prompts, pm.pad_id, False)
            width = max(len(t) for t in targets)
            labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets], device=device)
            start = family.decoder_start(model, len(idx), device)
            dec = torch.cat([start, labels[:, :-1].clamp(min=0)], 1)
            dec = dec.masked_fill(dec < 0, pm.pad_id)
            logits = model(
                inputs_embeds=pm.embed(ids.to(device)), attention_mask=mask.to(device), decoder_input_ids=dec
            ).logits
            return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        rows = [p + t for p, t in zip(prompts, targets, strict=True)]
        ids, mask = collate_prompts(rows, pm.pad_id, family.left_pad)
        width = ids.shape[1]
        lab = [[-100] * (width - len(t)) + t if family.left_pad else [-100] * len(p) + t + [-100] * (width - len(p)
               - len(t)) for p, t in zip(prompts, targets, strict=True)]
        labels = torch.tensor(lab, device=device)
        ids, mask = ids.to(device), mask.to(device)
        hidden = pm.hidden_states(pm.embed(ids), mask)
        where = labels[:, 1:] != -100  # position i predicts token i + 1
        h = hidden[:, :-1][where]
        logits = family.head_logits(model, h, None)
        return nn.functional.cross_entropy(logits.float(), labels[:, 1:][where])
