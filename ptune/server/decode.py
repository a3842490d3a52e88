"""Batched decoding for POST /v1/completions: the rows of several requests, for any mix of prompts, decode together.

The loop is ``ptune.generation.generate``'s greedy loop, on its decoder (``_Decoder``: the backbone's cache, the
deep prefixes held once for the whole decode). Rows of different prompts on the shared backbone decode in one batch
as ``serving.PromptServer`` mixes them for classification: per-row soft vectors (padded to the most, ``embed`` fills
each row's slots from the front) and per-row deep prefixes padded to the longest prompt, each row's padding slots
masked out (``deep_attention.prefixes(..., mask)``); rows of one prompt run exactly ``generate``'s computation. On
top, what a server needs: each row its own ``max_tokens``, greedy or sampled (temperature, top_p, its own seeded
generator, so a row's text does not depend on the rows beside it), stop strings, and a callback per step for
streaming. A greedy row gives the text that ``ptune predict --generate`` gives (decoded the same way: special tokens
skipped, stripped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation import _Decoder, _prefixes, collate_prompts
from ..runtime import autocast
from ..serving import padded_tables
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


def _prompt_inputs(models: list, device: torch.device):
    """(per-row soft vectors or None, deep prefixes, prefix mask) of the rows' prompts, for ``_Decoder`` and
    ``deep_attention.prefixes``: one prompt holds its own [1, heads, P, head_dim] prefixes (``generate``'s
    computation); several are stacked per row, padded to the longest (``serving.padded_tables``), each row's padding
    slots masked out. Computed here, in the decode's autocast, as ``generate`` computes one prompt's."""
    distinct = list({id(m): m for m in models}.values())
    if len(distinct) == 1:
        return None, _prefixes(distinct[0], False), None
    which = torch.tensor([next(i for i, d in enumerate(distinct) if d is m) for m in models], device=device)
    soft, deep, keep, lengths = padded_tables(
        [m.tuner.soft_vectors() for m in distinct], [_prefixes(m, False) for m in distinct],
        distinct[0].embeddings.embedding_dim, device,
    )
    if deep is None:
        return soft[which], None, None
    keep = keep[which] if len(set(lengths)) > 1 else None  # one prefix length: nothing to mask
    return soft[which], [(k[which], v[which]) for k, v in deep], keep


def decode_rows(models, rows: list[GenRow], device: torch.device, amp: torch.dtype | None) -> None:
    """Decode every row in one batch with the cache. ``models``: the prompt model of every row (one for all rows,
    or a list beside ``rows``), prompts on one backbone whose readouts decode mixed (``Readout.decodes_mixed``)."""
    models = list(models) if isinstance(models, list | tuple) else [models] * len(rows)
    pm = models[0]
    tok = pm.readout.tokenizer
    stop_ids = [m.readout.stop_id for m in models]
    ids, mask = collate_prompts([r.ids for r in rows], pm.pad_id, pm.family.left_pad)
    gens = [torch.Generator(device=device).manual_seed(r.seed) if r.temperature > 0 else None for r in rows]
    steps = max(r.max_tokens for r in rows)
    with torch.inference_mode(), autocast(device, amp):
        vectors, prefixes, keep = _prompt_inputs(models, device)
        with da.prefixes(prefixes, keep):
            dec = _Decoder(pm, ids.to(device), mask.to(device), use_cache=True, bare=False, vectors=vectors)
            logits = dec.start()
            for t in range(steps):
                tokens = logits.argmax(-1)
                for j, (r, g, stop_id) in enumerate(zip(rows, gens, stop_ids, strict=True)):
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
