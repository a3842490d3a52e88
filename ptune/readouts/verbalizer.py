"""template.readout=verbalizer: each class has label words; class scores are read off the LM's answer-slot logits."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import PtuneError
from .base import Readout

MultiToken = Literal["first", "mean", "full"]


@dataclass
class Verbalizer:
    """Token ids of every label word, padded into one [classes, words, tokens] index with masks.

    Class score = mean over its words of the word score; a multi-token word scores the first token's logit
    ("first") or the mean of its tokens' logits at the answer slot ("mean"), or, for causal and seq2seq
    backbones, the teacher-forced log-likelihood of all its tokens ("full", computed in
    ``full_sequence_scores``).
    """

    label_names: list[str]
    words: list[list[str]]
    token_ids: torch.Tensor  # [C, W, T] long
    token_mask: torch.Tensor  # [C, W, T] bool
    word_mask: torch.Tensor  # [C, W] bool
    multi_token: MultiToken = "first"

    @property
    def flat_ids(self) -> torch.Tensor:
        """Unique token ids used, so the LM head only needs these rows."""
        return torch.unique(self.token_ids[self.token_mask])

    def class_scores(self, logits: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` [B, V] over the vocabulary, or [B, len(ids)] over ``ids`` (a subset of the vocab)."""
        index = self.token_ids
        if ids is not None:
            lookup = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long, device=ids.device)
            lookup[ids] = torch.arange(len(ids), device=ids.device)
            index = lookup[self.token_ids.to(ids.device)]
        index = index.to(logits.device)
        tmask = self.token_mask.to(logits.device)
        if self.multi_token == "first":
            tmask = torch.zeros_like(tmask)
            tmask[..., 0] = self.token_mask[..., 0]
        gathered = logits[:, index.clamp(min=0)]  # [B, C, W, T]
        tm = tmask.to(logits.dtype)
        return self.aggregate((gathered * tm).sum(-1) / tm.sum(-1).clamp(min=1))

    def aggregate(self, word_scores: torch.Tensor) -> torch.Tensor:
        """[B, C, W] word scores -> [B, C] class scores: the mean over each class's real words."""
        wm = self.word_mask.to(word_scores.device).to(word_scores.dtype)
        return (word_scores * wm).sum(-1) / wm.sum(-1).clamp(min=1)


def build_verbalizer(
    label_words: Mapping[str, Sequence[str] | str] | Sequence[Sequence[str] | str],
    label_names: Sequence[str],
    tokenizer,
    leading_space: bool,
    multi_token: MultiToken = "first",
) -> Verbalizer:
    """Tokenise label words and check each is known and unambiguous for this tokenizer."""
    if multi_token not in ("first", "mean", "full"):
        raise PtuneError(f"verbalizer multi_token={multi_token!r} is not valid: use first, mean or full")
    if isinstance(label_words, Mapping):
        unknown = [k for k in label_words if k not in label_names]
        if unknown:
            raise PtuneError(
                f"verbalizer has label {unknown[0]!r} that is not in the data set's labels {list(label_names)}"
            )
        missing = [n for n in label_names if n not in label_words]
        if missing:
            raise PtuneError(f"verbalizer has no label words for class {missing[0]!r}")
        per_class = [label_words[n] for n in label_names]
    else:
        per_class = list(label_words)
        if len(per_class) != len(label_names):
            raise PtuneError(
                f"verbalizer has {len(per_class)} classes but the data set has {len(label_names)}: {list(label_names)}"
            )
    words = [list(w) if isinstance(w, list | tuple) else [w] for w in per_class]
    unk = getattr(tokenizer, "unk_token_id", None)
    specials = set(getattr(tokenizer, "all_special_ids", None) or [])
    first_piece_only: list[tuple[str, str, list[int]]] = []  # warned about once every word has passed its checks
    ids: list[list[list[int]]] = []
    seen: dict[tuple[int, ...], str] = {}
    for cls, ws in zip(label_names, words, strict=True):
        if not ws:
            raise PtuneError(f"verbalizer class {cls!r} has no label words")
        cls_ids = []
        for w in ws:
            if not isinstance(w, str):  # YAML reads unquoted yes/no/on/off as booleans, 1 as a number
                raise PtuneError(
                    f"verbalizer class {cls!r} has label word {w!r}, which is not a string: quote it in the "
                    "config (e.g. \"yes\", \"no\")"
                )
            if not w.strip():
                raise PtuneError(f"verbalizer class {cls!r} has an empty label word")
            toks = list(tokenizer((" " + w) if leading_space else w, add_special_tokens=False)["input_ids"])
            if leading_space and len(toks) > 1 and _is_bare_space(tokenizer, toks[0]):
                toks = toks[1:]
            if not toks or (unk is not None and unk in toks):
                raise PtuneError(f"label word {w!r} (class {cls!r}) is unknown to the backbone's tokenizer")
            special = [t for t in toks if t in specials]
            if special:  # [SEP], </s>, [MASK]...: markers the model never predicts as an answer word
                raise PtuneError(
                    f"label word {w!r} (class {cls!r}) is the tokenizer's special token "
                    f"{tokenizer.convert_ids_to_tokens(special[0])!r}, not a word: use an ordinary word"
                )
            if multi_token == "first" and len(toks) > 1:
                first_piece_only.append((w, cls, toks))
            key = tuple(toks[:1]) if multi_token == "first" else tuple(toks)
            if key in seen and seen[key] != cls:
                raise PtuneError(
                    f"label word {w!r} (class {cls!r}) is ambiguous: it reads as the same token(s) as a word of "
                    f"class {seen[key]!r}"
                )
            seen[key] = cls
            cls_ids.append(toks)
        ids.append(cls_ids)
    c, w_max = len(ids), max(len(x) for x in ids)
    t_max = max(len(t) for x in ids for t in x)
    token_ids = torch.zeros(c, w_max, t_max, dtype=torch.long)
    token_mask = torch.zeros(c, w_max, t_max, dtype=torch.bool)
    word_mask = torch.zeros(c, w_max, dtype=torch.bool)
    for i, cls_ids in enumerate(ids):
        for j, toks in enumerate(cls_ids):
            token_ids[i, j, : len(toks)] = torch.tensor(toks)
            token_mask[i, j, : len(toks)] = True
            word_mask[i, j] = True
    for w, cls, toks in first_piece_only:  # only now: an error above must stay the one line on stderr
        _warn_first_piece(tokenizer, w, cls, toks)
    return Verbalizer(list(label_names), words, token_ids, token_mask, word_mask, multi_token)


_WARNED_FIRST_PIECE: set[tuple[str, tuple[int, ...]]] = set()  # (word, ids) already warned about in this process


def _warn_first_piece(tokenizer, word: str, cls: str, toks: list[int]) -> None:
    """Say once per process that a label word is not one token and will be scored by its first piece only:
    ``qzxqzxqzx`` read as ``q`` is a different, much more frequent word, which silently skews that class."""
    key = (word, tuple(toks))
    if key in _WARNED_FIRST_PIECE:
        return
    _WARNED_FIRST_PIECE.add(key)
    first = tokenizer.decode(toks[:1]).strip() or tokenizer.convert_ids_to_tokens(toks[0])
    print(
        f"ptune: warning: label word {word!r} (class {cls!r}) is not one token of the vocabulary "
        f"({len(toks)} pieces); with template.multi_token=first it is scored by its first piece {first!r} only: "
        "use template.multi_token=mean (or full on a causal or seq2seq backbone) to score the whole word",
        file=sys.stderr,
    )


def _is_bare_space(tokenizer, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip() == ""


class VerbalizerReadout(Readout):
    """Class scores from the answer slot's vocabulary logits; optional content-free calibration offsets."""

    name = "verbalizer"
    calibratable = True
    reads_vocabulary = True

    def __init__(self, verbalizer: Verbalizer):
        super().__init__()
        self.verbalizer = verbalizer
        self.register_buffer("calibration", torch.zeros(len(verbalizer.label_names)))

    @classmethod
    def check_backbone(cls, family, backbone, name: str) -> None:
        if family.head_optional and not backbone.has_lm_head:
            raise PtuneError(
                f"backbone {name!r} has no MLM head, so a verbalizer cannot read it: use "
                "template.readout=head or a backbone with an MLM head (e.g. backbone=cassette_bert)"
            )

    @classmethod
    def create(cls, tcfg, label_names, backbone, template, seed: int) -> VerbalizerReadout:
        family = backbone.family
        if tcfg.multi_token == "full" and not family.generates_answer:
            raise PtuneError(
                "template.multi_token=full (whole-word log-likelihood) needs a causal or seq2seq backbone; "
                "an MLM reads the single [MASK] slot: use multi_token=first or mean"
            )
        verbalizer = build_verbalizer(
            tcfg.label_words,
            label_names,
            backbone.tokenizer,
            leading_space=family.generates_answer and template.text_before_mask().endswith(" "),
            multi_token=tcfg.multi_token,
        )
        return cls(verbalizer)

    def label_word_ids(self) -> list[int]:
        v = self.verbalizer
        return v.token_ids[..., 0][v.word_mask].tolist()

    def forward(self, vocab_logits: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``vocab_logits`` over the whole vocabulary, or over just the token ``ids`` when given."""
        return self.verbalizer.class_scores(vocab_logits.float(), ids) - self.calibration

    def from_word_scores(self, word_scores: torch.Tensor) -> torch.Tensor:
        """[B, C, W] per-word scores (e.g. log-likelihoods for multi_token=full) -> calibrated class scores."""
        return self.verbalizer.aggregate(word_scores.float()) - self.calibration

    @property
    def whole_words(self) -> bool:
        """multi_token=full: ``run`` scores whole label words by teacher forcing (its own forward per word)."""
        return self.verbalizer.multi_token == "full"

    def run(self, pm, embeds, attention_mask, answer_pos):
        """multi_token=full returns the class scores here already (``read`` passes them on)."""
        if self.whole_words:
            return full_sequence_scores(pm, embeds, attention_mask, answer_pos)
        return pm.family.run(pm, embeds, attention_mask)

    def read(self, pm, states, attention_mask, answer_pos):
        if self.whole_words:
            return states
        ids = pm.answer_ids(states.device)
        return self(pm.family.answer_logits(pm.backbone, states, answer_pos, ids), ids)

    @property
    def shares_prefix(self) -> bool:
        return not self.whole_words

    def mixable(self, family) -> bool:
        return not self.whole_words

    def export_info(self, pm, out):
        v = self.verbalizer
        return {
            "kind": "verbalizer",
            "label_words": {n: list(ws) for n, ws in zip(v.label_names, v.words, strict=True)},
            "token_ids": v.token_ids.tolist(),
            "token_mask": v.token_mask.tolist(),
            "multi_token": v.multi_token,
            "calibration": self.calibration.tolist(),
            "how": "class score = mean over the class's words of the word's logit(s) at the answer position "
            "(first token, or mean of its tokens), minus calibration",
        }


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
