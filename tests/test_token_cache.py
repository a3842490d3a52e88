"""Batched field tokenisation and the on-disk token cache behind ``ptune.build.encode``."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

from ptune import token_cache
from ptune.build import encode
from ptune.errors import PtuneError
from ptune.readouts import Readout
from ptune.template import TemplateRenderer, parse_template

from .helpers import SENTENCES, make_cfg, make_task

LONG = " ".join(f"word{i}" for i in range(40))
TEXTS = [*SENTENCES, "", "   ", LONG, "a [MASK] in the text [SEP] <s>", "😀 naïve café \u2603", "It was great fun"]
EXAMPLES = [{"text_a": t, "text_b": TEXTS[-1 - i], "extra": str(i)} for i, t in enumerate(TEXTS)]


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The token cache switched on (conftest turns it off) inside a private PTUNE_CACHE."""
    monkeypatch.setenv("PTUNE_CACHE", str(tmp_path / "ptune-cache"))
    monkeypatch.delenv("PTUNE_NO_TOKEN_CACHE", raising=False)
    return tmp_path / "ptune-cache" / "tokens"


@pytest.fixture(scope="module")
def bert_tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["bert"])


@pytest.fixture(scope="module")
def bpe_tok(tiny_bpe_gpt2):
    return AutoTokenizer.from_pretrained(tiny_bpe_gpt2)


def _renderer(tok, text: str, mode: str = "mask", max_length: int = 64, prepend: int = 0, side: str = "tail"):
    return TemplateRenderer(parse_template(text), tok, mode, max_length, prepend, side)


def _task(renderer: TemplateRenderer):
    # encode() reads the renderer and lets the readout add its targets: a class readout's (the base Readout.encode)
    # keeps the rendered rows and the labels as they are
    readout = SimpleNamespace(encode=functools.partial(Readout.encode, None))
    return SimpleNamespace(renderer=renderer, model=SimpleNamespace(readout=readout))


def _per_example(renderer: TemplateRenderer, examples) -> tuple[list[list[int]], list[int]]:
    rendered = [renderer.render(ex) for ex in examples]
    return [r.input_ids for r in rendered], [r.answer_pos for r in rendered]


CASES = [
    ("bert", "{text_a} It was {mask}.", "mask", 64, 0, "tail"),
    ("bert", "Premise: {text_a} {soft:2} Hypothesis: {text_b}? {mask}.", "mask", 24, 3, "tail"),
    ("bert", "{text_a} [SEP] {text_b} {mask}", "mask", 16, 0, "head"),
    ("bert", "{text_a} vs {text_a} {mask}", "drop", 20, 0, "tail"),
    ("bpe", "Review: {text_a}\nSentiment: {mask}", "end", 64, 2, "tail"),
    ("bpe", '{soft:"It was"} {text_a} and {text_b} It was {mask}', "end", 20, 0, "head"),
    ("bpe", "{text_a}", "none", 12, 0, "tail"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_batched_encode_equals_per_example_rendering(case, bert_tok, bpe_tok, cache):
    kind, text, mode, max_length, prepend, side = case
    r = _renderer(bert_tok if kind == "bert" else bpe_tok, text, mode, max_length, prepend, side)
    expected_ids, expected_answers = _per_example(r, EXAMPLES)
    assert any(r.render(ex).truncated for ex in EXAMPLES)  # truncation is exercised
    assert token_cache.render_batched(r, EXAMPLES) == (expected_ids, expected_answers)
    labels = list(range(len(EXAMPLES)))
    for _ in range(2):  # fresh (written to the cache), then read back from it
        enc = encode(_task(r), EXAMPLES, labels)
        assert enc.input_ids == expected_ids and enc.answer_pos == expected_answers and enc.labels == labels
    assert len(list(cache.glob("*.npz"))) == 1


def _count_calls(monkeypatch: pytest.MonkeyPatch, obj, name: str) -> list[int]:
    calls = [0]
    original = getattr(obj, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


def test_second_encode_reads_the_cache_without_tokenising(tiny_models, cache, monkeypatch):
    task = make_task(make_cfg(tiny_models["bert"], "soft_prompt", template="{text_a} and {text_b} It was {mask}."))
    tok_cls = type(task.backbone.tokenizer)
    tokenizer_calls = _count_calls(monkeypatch, tok_cls, "__call__")
    render_calls = _count_calls(monkeypatch, task.renderer, "render")
    labels = [i % 2 for i in range(len(EXAMPLES))]

    first = encode(task, EXAMPLES, labels)
    assert tokenizer_calls[0] == 2  # batched: one call per field, not one per field per example
    assert render_calls[0] == len(EXAMPLES)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].endswith(".npz")  # no temp files left behind

    second = encode(task, EXAMPLES, [1 - y for y in labels])
    assert tokenizer_calls[0] == 2 and render_calls[0] == len(EXAMPLES)  # nothing re-tokenised or re-rendered
    assert second.input_ids == first.input_ids and second.answer_pos == first.answer_pos
    assert second.labels == [1 - y for y in labels]  # labels come from the caller, never from the cache


def test_the_key_covers_template_settings_tokenizer_and_data(bert_tok, bpe_tok, cache):
    def key(tok=bert_tok, text="{text_a} It was {mask}.", mode="mask", max_length=64, prepend=0, side="tail", ex=None):
        return token_cache.cache_key(_renderer(tok, text, mode, max_length, prepend, side), ex or EXAMPLES)

    base = key()
    assert key() == base  # deterministic
    assert key(ex=[{**e, "extra": "other", "label": "1"} for e in EXAMPLES]) == base  # unused columns do not count
    variants = [
        key(text="{text_a} It is {mask}."),
        key(mode="drop"),
        key(max_length=32),
        key(prepend=2),
        key(side="head"),
        key(tok=bpe_tok, text="{text_a} It was {mask}", mode="end"),
        key(ex=[{**EXAMPLES[0], "text_a": "changed"}, *EXAMPLES[1:]]),
        key(ex=EXAMPLES[:-1]),
        key(ex=list(reversed(EXAMPLES))),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert key(tok=bpe_tok, text="{text_a} It was {mask}", mode="end") != key(
        tok=bpe_tok, text="{text_a} It was {mask}", mode="end", max_length=63
    )


def test_key_tracks_tokenizer_content(bert_tok, tiny_models, tmp_path):
    other = AutoTokenizer.from_pretrained(tiny_models["bert"])
    assert token_cache.tokenizer_fingerprint(other) == token_cache.tokenizer_fingerprint(bert_tok)
    other.add_tokens(["zzzqqq"])  # the remembered vocab digest must not go stale
    assert token_cache.tokenizer_fingerprint(other)["vocab_sha256"] != _fp(bert_tok)["vocab_sha256"]
    # same size, two ids swapped: only the vocab content differs
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models["bert"] / name, swapped / name)
    data = json.loads((swapped / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    vocab["good"], vocab["bad"] = vocab["bad"], vocab["good"]
    (swapped / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    fa, fb = _fp(bert_tok), _fp(AutoTokenizer.from_pretrained(swapped))
    assert fa["len"] == fb["len"] and fa["special_ids"] == fb["special_ids"]
    assert fa["vocab_sha256"] != fb["vocab_sha256"]


def _fp(tok) -> dict:
    return token_cache.tokenizer_fingerprint(tok)


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "empty", "wrong_shapes", "bad_offsets", "float_ids"],
)
def test_a_corrupt_cache_file_is_ignored_and_rewritten(bert_tok, cache, damage):
    r = _renderer(bert_tok, "{text_a} It was {mask}.")
    expected = _per_example(r, EXAMPLES)
    encode(_task(r), EXAMPLES, [0] * len(EXAMPLES))
    (path,) = cache.glob("*.npz")
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not an npz file at all")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with np.load(path) as z:
            arrays = dict(z)
        if damage == "wrong_shapes":
            arrays["answer_pos"] = arrays["answer_pos"][:-1]
        elif damage == "float_ids":
            arrays["ids"] = arrays["ids"].astype(np.float32)
        else:
            arrays["offsets"][-1] += 5
        with path.open("wb") as fh:
            np.savez(fh, **arrays)
    assert token_cache._read(path, len(EXAMPLES)) is None  # the damage is detected
    enc = encode(_task(r), EXAMPLES, [0] * len(EXAMPLES))
    assert (enc.input_ids, enc.answer_pos) == expected
    assert token_cache._read(path, len(EXAMPLES)) == expected  # rewritten whole
    assert [p.name for p in cache.iterdir()] == [path.name]


def test_an_unwritable_cache_only_skips_caching(bert_tok, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # mkdir under a file fails even for root, unlike chmod
    monkeypatch.setenv("PTUNE_CACHE", str(blocker))
    monkeypatch.delenv("PTUNE_NO_TOKEN_CACHE", raising=False)
    r = _renderer(bert_tok, "{text_a} It was {mask}.")
    enc = encode(_task(r), EXAMPLES, [0] * len(EXAMPLES))
    assert (enc.input_ids, enc.answer_pos) == _per_example(r, EXAMPLES)


def test_ptune_no_token_cache_disables_it(bert_tok, cache, monkeypatch):
    monkeypatch.setenv("PTUNE_NO_TOKEN_CACHE", "1")
    r = _renderer(bert_tok, "{text_a} It was {mask}.")
    enc = encode(_task(r), EXAMPLES, [0] * len(EXAMPLES))
    assert (enc.input_ids, enc.answer_pos) == _per_example(r, EXAMPLES)
    assert not cache.exists()
    monkeypatch.setenv("PTUNE_NO_TOKEN_CACHE", "0")
    encode(_task(r), EXAMPLES, [0] * len(EXAMPLES))
    assert len(list(cache.glob("*.npz"))) == 1


def test_a_missing_field_is_a_clear_error(bert_tok, cache):
    r = _renderer(bert_tok, "{text_a} {text_b} {mask}")
    with pytest.raises(PtuneError, match=r"\{text_b\} is not in the data"):
        encode(_task(r), [{"text_a": "x", "text_b": "y"}, {"text_a": "z"}], [0, 1])
    assert not cache.exists() or not os.listdir(cache)


def test_special_token_strings_stay_text_through_encode(bert_tok, cache):
    r = _renderer(bert_tok, "{text_a} It was {mask}.")
    exs = [{"text_a": "the [MASK] slipped [SEP] into [CLS] the review"}] * 2
    for _ in range(2):  # fresh and cached
        enc = encode(_task(r), exs, [0, 1])
        for ids, pos in zip(enc.input_ids, enc.answer_pos, strict=True):
            assert ids.count(bert_tok.mask_token_id) == 1 and ids[pos] == bert_tok.mask_token_id
            assert ids.count(bert_tok.sep_token_id) == 1 and ids.count(bert_tok.cls_token_id) == 1
