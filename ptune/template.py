"""PET/OpenPrompt-style templates: text with input-field, answer-slot and soft-token placeholders.

A template is parsed once into segments and rendered straight to token ids, so that truncation can cut the
input fields (never the template words, the soft tokens or the answer slot) to fit the backbone.

Syntax: ``{text_a}`` / ``{any_field}`` an input field, ``{mask}`` the answer slot, ``{soft}`` one soft token,
``{soft:4}`` four, ``{soft:"it was"}`` soft tokens initialised from the embeddings of those words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .errors import PtuneError

SOFT_ID = -100  # placeholder id for a soft-token position in rendered ids (replaced by embeddings)
MAX_SOFT_TOKENS = 65536  # per {soft:N}: far above any backbone's maximum length; the renderer checks that too

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_SOFT = re.compile(r'^soft(?::(?:(\d+)|"([^"]*)"))?$')
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Segment:
    kind: Literal["text", "field", "mask", "soft"]
    value: str = ""  # literal text, or field name, or soft init words
    count: int = 0  # soft tokens (for kind == "soft")


@dataclass
class Template:
    source: str
    segments: list[Segment]

    @property
    def fields(self) -> list[str]:
        """Every field placeholder in order (a field used twice appears twice: truncation counts it twice)."""
        return [s.value for s in self.segments if s.kind == "field"]

    @property
    def field_names(self) -> list[str]:
        """Each field once, in order of first use: what gets tokenised."""
        return list(dict.fromkeys(self.fields))

    @property
    def has_mask(self) -> bool:
        return any(s.kind == "mask" for s in self.segments)

    def text_before_mask(self) -> str:
        out = ""
        for seg in self.segments:
            if seg.kind == "mask":
                return out
            out += seg.value if seg.kind == "text" else " "
        return out


def parse_template(source: str) -> Template:
    if not isinstance(source, str) or not source.strip():
        raise PtuneError("template.text is empty: write e.g. '{text_a} It was {mask}.'")
    segments: list[Segment] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(source):
        if m.start() > pos:
            segments.append(Segment("text", source[pos : m.start()]))
        body = m.group(1).strip()
        soft = _SOFT.match(body)
        if body == "mask":
            segments.append(Segment("mask"))
        elif soft:
            if soft.group(2) is not None:
                if not soft.group(2).strip():
                    raise PtuneError(f"template soft token {{{body}}} has empty init words")
                segments.append(Segment("soft", soft.group(2), 0))  # count set from the tokenizer later
            else:
                digits = soft.group(1) or "1"
                # checked on the digits first: int() of thousands of digits raises, and a count in the millions
                # would allocate per-token lists before the renderer can compare it with the maximum length
                n = int(digits) if len(digits) <= len(str(MAX_SOFT_TOKENS)) else MAX_SOFT_TOKENS + 1
                if n <= 0:
                    raise PtuneError(f"template soft token {{{body}}} must have a count >= 1")
                if n > MAX_SOFT_TOKENS:
                    shown = body if len(body) <= 40 else body[:40] + "..."
                    raise PtuneError(
                        f"template soft token {{{shown}}} asks for too many soft tokens: at most "
                        f"{MAX_SOFT_TOKENS}, and they must fit the backbone's maximum length with the input"
                    )
                segments.append(Segment("soft", "", n))
        elif _FIELD.match(body):
            segments.append(Segment("field", body))
        else:
            raise PtuneError(
                f"template placeholder {{{body}}} is not valid: use {{text_a}}-style field names, {{mask}}, "
                '{soft}, {soft:N} or {soft:"init words"}'
            )
        pos = m.end()
    if pos < len(source):
        segments.append(Segment("text", source[pos:]))
    if sum(s.kind == "mask" for s in segments) > 1:
        raise PtuneError(f"template {source!r} has more than one {{mask}} slot")
    if "{" in "".join(s.value for s in segments if s.kind == "text") or "}" in "".join(
        s.value for s in segments if s.kind == "text"
    ):
        raise PtuneError(f"template {source!r} has an unbalanced brace")
    if not any(s.kind == "field" for s in segments):
        raise PtuneError(f"template {source!r} has no input field placeholder such as {{text_a}}")
    return Template(source, segments)


@dataclass
class Rendered:
    input_ids: list[int]  # SOFT_ID at soft positions
    answer_pos: int  # index of the answer slot (MLM mask token / last position for causal), -1 if none
    truncated: int = 0  # tokens cut from input fields


@dataclass
class TemplateRenderer:
    """Tokenises a parsed template for one backbone family.

    ``answer_mode``: "mask" inserts the tokenizer's mask token (MLM); "end" requires the slot at the end and
    drops it, so the answer is read from the last position's next-token logits (causal LM); "drop" removes it
    (seq2seq: the answer is read from the decoder).
    """

    template: Template
    tokenizer: object
    answer_mode: Literal["mask", "end", "drop", "none"]
    max_length: int
    prepend_soft: int = 0
    truncate_side: Literal["head", "tail"] = "tail"
    _pieces: list[tuple[Segment, list[int]]] = field(default_factory=list, init=False)
    soft_init_ids: list[int | None] = field(default_factory=list, init=False)
    prefix_ids: list[int] = field(default_factory=list, init=False)
    suffix_ids: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.prefix_ids, self.suffix_ids = special_token_frame(tok)
        if self.answer_mode == "mask":
            if getattr(tok, "mask_token_id", None) is None:
                raise PtuneError(
                    "the backbone's tokenizer has no mask token, so an MLM verbalizer cannot be used"
                )
            if not self.template.has_mask:
                raise PtuneError(
                    f"template {self.template.source!r} has no {{mask}} slot, which an MLM verbalizer needs"
                )
        if self.answer_mode == "end":
            last = [s for s in self.template.segments if not (s.kind == "text" and not s.value.strip())]
            if not self.template.has_mask or last[-1].kind != "mask":
                raise PtuneError(
                    f"template {self.template.source!r} must end with {{mask}} for a causal-LM verbalizer "
                    "(the answer is the next token)"
                )
        segments = self.template.segments
        num_soft = self.prepend_soft + sum(s.count for s in segments if s.kind == "soft" and not s.value)
        if num_soft >= self.max_length:  # before any per-token list is built: the count may be huge
            raise PtuneError(
                f"{num_soft} soft tokens (template {{soft:N}} placeholders and method.prompt_length) leave no "
                f"room for the input within the backbone's maximum length {self.max_length}"
            )
        self.soft_init_ids = [None] * self.prepend_soft
        for i, seg in enumerate(segments):
            ids: list[int] = []
            if seg.kind == "text":
                text = seg.value
                if self.answer_mode == "end" and seg is self._text_before_answer():
                    text = text.rstrip(" ")  # the space belongs to the answer token (GPT/Llama tokenisation)
                nxt = segments[i + 1] if i + 1 < len(segments) else None
                if nxt is not None and nxt.kind == "field" and _field_has_space(self.template, nxt.value):
                    # the field text carries the space (see _field_text): keeping it here too would make BPE
                    # tokenizers read "Review:  good" (a standalone space token, then " good")
                    text = text.rstrip(" ")
                ids = self._encode(text) if text else []
            elif seg.kind == "soft" and seg.value:
                ids = self._encode(seg.value)
                self.soft_init_ids.extend(ids)
            elif seg.kind == "soft":
                self.soft_init_ids.extend([None] * seg.count)
            self._pieces.append((seg, ids))

    @property
    def num_soft(self) -> int:
        return len(self.soft_init_ids)

    def _text_before_answer(self) -> Segment | None:
        prev = None
        for seg in self.template.segments:
            if seg.kind == "mask":
                return prev if prev is not None and prev.kind == "text" else None
            prev = seg
        return None

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fixed_length(self) -> int:
        n = len(self.prefix_ids) + len(self.suffix_ids) + self.prepend_soft
        for seg, ids in self._pieces:
            if seg.kind == "text":
                n += len(ids)
            elif seg.kind == "soft":
                n += len(ids) if seg.value else seg.count
            elif seg.kind == "mask" and self.answer_mode == "mask":
                n += 1
        return n

    def encode_fields(self, texts: list[str]) -> list[list[int]]:
        """Tokenise input-field texts in one batched call, as plain text.

        ``split_special_tokens``: a review that contains "[MASK]", "[SEP]" or "<s>" must not put real special
        tokens into the input (a second mask slot, a fake segment end). Template words are not affected.
        """
        if not texts:
            return []
        out = self.tokenizer(
            list(texts),
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,  # only the ids are used; building the rest costs a third of the call
            return_token_type_ids=False,
        )["input_ids"]
        return [list(ids) for ids in out]

    def check_fields(self, example: dict[str, str]) -> None:
        for name in self.template.fields:
            if name not in example:
                raise PtuneError(
                    f"template field {{{name}}} is not in the data (fields: {', '.join(sorted(example))})"
                )

    def render(self, example: dict[str, str], field_ids: dict[str, list[int]] | None = None) -> Rendered:
        """``field_ids`` lets callers pass pre-tokenised fields (``encode_fields`` over a whole split)."""
        if field_ids is None:
            self.check_fields(example)
            names = self.template.field_names
            tokenised = self.encode_fields([self.field_text(example, name) for name in names])
            field_ids = dict(zip(names, tokenised, strict=True))
        budget = self.max_length - self.fixed_length()
        if budget < len(self.template.fields):
            raise PtuneError(
                f"template, soft tokens and special tokens take {self.fixed_length()} tokens, leaving no room "
                f"for the input within the backbone's maximum length {self.max_length}"
            )
        fitted, cut = _fit(field_ids, self.template.fields, budget, self.truncate_side)
        ids: list[int] = list(self.prefix_ids) + [SOFT_ID] * self.prepend_soft
        answer = -1
        for seg, seg_ids in self._pieces:
            if seg.kind == "text":
                ids.extend(seg_ids)
            elif seg.kind == "field":
                ids.extend(fitted[seg.value])
            elif seg.kind == "soft":
                ids.extend([SOFT_ID] * (len(seg_ids) if seg.value else seg.count))
            elif seg.kind == "mask":
                if self.answer_mode == "mask":
                    answer = len(ids)
                    ids.append(self.tokenizer.mask_token_id)
                elif self.answer_mode == "end":
                    answer = len(ids) - 1
        ids.extend(self.suffix_ids)
        return Rendered(ids, answer, cut)

    def leading_soft(self) -> int:
        """Soft tokens every rendered input opens with, right after the special-token frame."""
        n = self.prepend_soft
        for seg, ids in self._pieces:
            if seg.kind != "soft":
                break
            n += len(ids) if seg.value else seg.count
        return n

    def field_text(self, example: dict[str, str], name: str) -> str:
        return _field_text(example[name], self, name)

    def cache_settings(self) -> dict:
        """Everything besides the tokenizer and the data that decides the rendered ids (token-cache key)."""
        return {
            "template": self.template.source,
            "answer_mode": self.answer_mode,
            "max_length": self.max_length,
            "prepend_soft": self.prepend_soft,
            "truncate_side": self.truncate_side,
            "prefix_ids": list(self.prefix_ids),
            "suffix_ids": list(self.suffix_ids),
            "pieces": [[seg.kind, seg.value, seg.count, list(ids)] for seg, ids in self._pieces],
        }


def _field_has_space(template: Template, name: str) -> bool:
    """Whether field ``name`` carries a leading space: its first placeholder follows a literal ending in a space,
    or a mask/soft slot. Decided on the original template text (the renderer strips that literal's space)."""
    prev = None
    for seg in template.segments:
        if seg.kind == "field" and seg.value == name:
            break
        prev = seg
    return prev is not None and (prev.kind != "text" or prev.value.endswith(" "))


def _field_text(value: str, renderer: TemplateRenderer, name: str) -> str:
    """Fields that follow a literal ending in a space carry that space (matters for BPE tokenizers).

    An empty value gets no space either: a lone space would be a token of its own on BPE tokenizers.
    """
    text = value.strip()
    return " " + text if text and _field_has_space(renderer.template, name) else text


def _fit(
    field_ids: dict[str, list[int]], order: list[str], budget: int, side: str
) -> tuple[dict[str, list[int]], int]:
    """Longest-first truncation of the input fields to ``budget`` tokens in total.

    ``order`` lists every placeholder occurrence, so a field used twice costs its length twice.
    """
    lengths = {name: len(field_ids[name]) for name in order}
    total = sum(lengths[n] for n in order)
    cut = max(0, total - budget)
    remaining = cut
    while remaining > 0:
        longest = max(order, key=lambda n: lengths[n])
        lengths[longest] -= 1
        remaining -= order.count(longest)
    out = {}
    for name in order:
        ids = field_ids[name]
        keep = lengths[name]
        out[name] = ids[:keep] if side == "tail" else ids[len(ids) - keep :]
    return out, cut


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] ... [SEP], <bos> ..., ... </s>)."""
    probe = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(probe) + 1):
        if full[start : start + len(probe)] == probe:
            return full[:start], full[start + len(probe) :]
    return [], []
