"""Batched decoding for POST /v1/completions: the rows of several requests for one prompt decode together.

The loop is ``ptune.generation.generate``'s greedy loop, on its decoder (``_Decoder``: the backbone's cache, the
prompt's deep prefixes held once for the whole decode), with what a server needs on top: each row its own
``max_tokens``, greedy or sampled (temperature, top_p, its own seeded generator, so a row's text does not depend on
the rows beside it), stop strings, and a callback per step for streaming. A greedy row gives the text that
``ptune predict --generate`` gives (decoded the same way: special tokens skipped, stripped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation import _Decoder, _prefixes, collate_prompts
from ..runtime import autocast
from ..tuners import deep_attention as da


@dataclass
class GenRow:
    """One prompt text to continue, with its settings; the decode fills ``tokens``, ``text`` and ``finish``."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    emit: Callable[[str, str | None], None] | None = None  # (new text, finish reason or None) while streaming
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: str = ""
    finish: str | None = None


def _sample(logits: torch.Tensor, row: GenRow, gen: torch.Generator) -> int:
    probs = torch.softmax(logits.float() / row.temperature, -1)
    if row.top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < row.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _visible(row: GenRow, tok) -> None:
    """Update ``row.text`` (cut at a stop string) and stream what can no longer change."""
    text = tok.decode(row.tokens, skip_special_tokens=True).strip()
    for s in row.stop:
        at = text.find(s)
        if at >= 0:
            text, row.finish = text[:at], "stop"
    row.text = text
    if row.emit is None:
        return
    if row.finish is None:  # hold back what a stop string or an unfinished character may still change
        hold = max((len(s) - 1 for s in row.stop), default=0)
        safe = text[: len(text) - hold] if hold else text
        safe = safe.rstrip().rstrip("\ufffd")
    else:
        safe = text
    if len(safe) > len(row.sent) and safe.startswith(row.sent):
        row.emit(safe[len(row.sent):], None)
        row.sent = safe
    if row.finish is not None:
        row.emit("", row.finish)


def decode_rows(pm, rows: list[GenRow], device: torch.device, amp: torch.dtype | None) -> None:
    """Decode every row (all for the prompt model ``pm``) in one batch with the cache."""
    tok, stop_id = pm.readout.tokenizer, pm.readout.stop_id
    ids, mask = collate_prompts([r.ids for r in rows], pm.pad_id, pm.family.left_pad)
    gens = [torch.Generator(device=device).manual_seed(r.seed) if r.temperature > 0 else None for r in rows]
    steps = max(r.max_tokens for r in rows)
    with torch.inference_mode(), autocast(device, amp), da.prefixes(_prefixes(pm, False)):
        dec = _Decoder(pm, ids.to(device), mask.to(device), use_cache=True, bare=False)
        logits = dec.start()
        for t in range(steps):
            tokens = logits.argmax(-1)
            for j, (r, g) in enumerate(zip(rows, gens, strict=True)):
                if r.finish is not None:
                    tokens[j] = stop_id  # finished rows feed the stop token, as generate() does
                    continue
                if g is not None:
                    tokens[j] = _sample(logits[j], r, g)
                token = int(tokens[j])
                if token == stop_id:
                    r.finish = "stop"
                else:
                    r.tokens.append(token)
                    if len(r.tokens) >= r.max_tokens:
                        r.finish = "length"
                _visible(r, tok)
            if t == steps - 1 or all(r.finish is not None for r in rows):
                break
            logits = dec.step(tokens)
    for r in rows:
        if r.finish is None:
            r.finish = "length"
            _visible(r, tok)
