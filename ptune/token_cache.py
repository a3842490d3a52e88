"""Render a whole split to token ids: fields tokenised in batches, the result cached on disk.

A second run over the same data, template and tokenizer reads ``<ptune cache>/tokens/<key>.npz`` instead of
re-tokenising (SST-2 train is 67k sentences). The key is a sha256 over everything the ids depend on: the cache
format, the ptune/transformers/tokenizers versions, the renderer's settings, a content fingerprint of the
tokenizer, and the values of the template's fields in every example. Labels are not cached (the caller owns
them). The cache is best effort: an unreadable file is re-rendered and rewritten, a read-only cache folder only
costs re-tokenising, and ``PTUNE_NO_TOKEN_CACHE=1`` turns it off.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import itertools
import json
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import transformers

from .atomic import atomic_write_bytes
from .backbone import cache_base
from .template import SOFT_ID, TemplateRenderer
from .version import __version__

CACHE_FORMAT = "ptune-tokens-1"  # bump when rendering changes in a way the key does not capture
_CHUNK = 16384  # texts per batched tokenizer call: batched, but memory stays bounded on big splits
_VOCAB_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (len, digest)


def cache_enabled() -> bool:
    return os.environ.get("PTUNE_NO_TOKEN_CACHE", "").strip().lower() in ("", "0", "false", "no")


def token_cache_dir() -> Path:
    return cache_base() / "tokens"


def render_split(renderer: TemplateRenderer, examples: list[dict[str, str]]) -> tuple[list[list[int]], list[int]]:
    """Rendered ids and answer positions of ``examples``, from the cache when an entry exists."""
    for ex in examples:
        renderer.check_fields(ex)  # the clear error for a missing field, before hashing reads the fields
    if not cache_enabled() or not examples:
        return render_batched(renderer, examples)
    path = token_cache_dir() / f"{cache_key(renderer, examples)}.npz"
    cached = _read(path, len(examples), len(renderer.tokenizer))
    if cached is not None:
        return cached
    ids, answers = render_batched(renderer, examples)
    _write(path, ids, answers)
    return ids, answers


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Building ~10^5 small lists triggers collections that walk every live object (the whole model): about
    half the time of reading a cached split. Pausing only defers collection; nothing is leaked."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def render_batched(
    renderer: TemplateRenderer, examples: list[dict[str, str]]
) -> tuple[list[list[int]], list[int]]:
    """One tokenizer call per field (per chunk) instead of one per field per example; same ids as ``render``."""
    with _gc_paused():
        return _render_batched(renderer, examples)


def _render_batched(
    renderer: TemplateRenderer, examples: list[dict[str, str]]
) -> tuple[list[list[int]], list[int]]:
    names = renderer.template.field_names
    per_field: dict[str, list[list[int]]] = {}
    for name in names:
        texts = [renderer.field_text(ex, name) for ex in examples]
        per_field[name] = []
        for start in range(0, len(texts), _CHUNK):
            per_field[name].extend(renderer.encode_fields(texts[start : start + _CHUNK]))
    ids, answers = [], []
    for i, ex in enumerate(examples):
        r = renderer.render(ex, field_ids={name: per_field[name][i] for name in names})
        ids.append(r.input_ids)
        answers.append(r.answer_pos)
    return ids, answers


def cache_key(renderer: TemplateRenderer, examples: list[dict[str, str]]) -> str:
    head = {
        "format": CACHE_FORMAT,
        "ptune": __version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "renderer": renderer.cache_settings(),
        "tokenizer": tokenizer_fingerprint(renderer.tokenizer),
    }
    digest = hashlib.sha256(_dumps(head).encode())
    names = renderer.template.field_names
    # only the fields the template reads: other columns cannot change the ids
    digest.update(b"\n" + _dumps([[ex[n] for n in names] for ex in examples]).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tok: Any) -> dict[str, Any]:
    """What identifies a tokenizer's behaviour: class, source, size, special ids, vocab and pipeline."""
    specials = {
        name: getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
    }
    backend = getattr(tok, "backend_tokenizer", None)  # fast tokenizers: normaliser, pre-tokeniser, model
    pipeline = None
    if backend is not None:  # lower-casing, accent stripping etc. change the ids too; these reprs are tiny
        pipeline = [repr(backend.normalizer), repr(backend.pre_tokenizer), type(backend.model).__name__]
    return {
        "class": type(tok).__name__,
        "name_or_path": str(getattr(tok, "name_or_path", "")),
        "len": len(tok),
        "special_ids": specials,
        "all_special_ids": sorted(int(i) for i in tok.all_special_ids),
        "vocab_sha256": _vocab_digest(tok),
        "pipeline": pipeline,
    }


def _vocab_digest(tok: Any) -> str:
    """sha256 of the vocab in id order; remembered per tokenizer object (about 0.4 s for a 262k vocab)."""
    try:
        known = _VOCAB_DIGESTS.get(tok)
    except TypeError:  # not weak-referenceable: just recompute
        known = None
    if known is not None and known[0] == len(tok):
        return known[1]
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    digest = hashlib.sha256(
        json.dumps([[vocab[t] for t in tokens], tokens]).encode()  # ids too: vocabs may have gaps
    ).hexdigest()
    try:
        _VOCAB_DIGESTS[tok] = (len(tok), digest)
    except TypeError:
        pass
    return digest


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _read(path: Path, n: int, vocab_size: int | None = None) -> tuple[list[list[int]], list[int]] | None:
    """The cached entry, or None when it is missing, unreadable or does not fit ``n`` examples.

    With ``vocab_size``, ids outside ``[0, vocab_size)`` (other than the soft-token placeholder) and answer
    positions outside their row also mean a damaged entry: fed to the model, such an id would index past the
    embedding table (an IndexError mid-run, or reading another row's memory on some kernels).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            flat, offsets, answers = z["ids"], z["offsets"], z["answer_pos"]
    except Exception:  # noqa: BLE001  (missing, truncated, not a zip, wrong members: all mean "render again")
        return None
    if (
        flat.dtype.kind != "i"
        or offsets.dtype.kind != "i"
        or answers.dtype.kind != "i"
        or flat.ndim != 1
        or offsets.shape != (n + 1,)
        or answers.shape != (n,)
        or offsets[0] != 0
        or offsets[-1] != len(flat)
        or (np.diff(offsets) < 0).any()
    ):
        return None
    if vocab_size is not None and (
        ((flat >= vocab_size) | ((flat < 0) & (flat != SOFT_ID))).any()
        or ((answers < -1) | (answers >= np.diff(offsets))).any()
    ):
        return None
    with _gc_paused():
        values, bounds = flat.tolist(), offsets.tolist()
        return [values[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)], answers.tolist()


def _write(path: Path, ids: list[list[int]], answers: list[int]) -> None:
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    buf = io.BytesIO()
    np.savez(buf, ids=flat, offsets=offsets, answer_pos=np.asarray(answers, dtype=np.int32))
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError:
        pass  # read-only or full cache: the next run re-tokenises, nothing else changes
