"""The GGUF conversion check: it must never refuse a correct conversion, and must still refuse a wrong one.

A conversion is refused when the saved folder is not the dequantised model: a tensor differs (bit for bit), the tied
output embedding came untied, or the probe logits moved by more than fp32 rounding allows. Two forwards of the same
fp32 weights may differ in the last bits (oneDNN/MKL pick kernels per call, thread count and alignment included), so
a bit-exact logit comparison failed a correct conversion at random on a loaded machine (issue 32).

The GGUF here is a tiny random Llama (2 layers, width 32, a byte-level vocabulary), written with the ``gguf``
package that transformers reads GGUF with, so the real ``_convert_gguf`` runs in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedModel

from ptune.backbone import gguf as gguf_mod
from ptune.errors import PtuneError

SHA = "cd" * 32


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 single-byte tokens a byte-level BPE vocabulary starts from."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_llama_gguf(path: Path, *, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2) -> Path:
    """A float32 Llama GGUF with random weights and tied embeddings (no output.weight), as llama.cpp writes them."""
    import gguf

    rng = np.random.default_rng(0)
    tokens = [*_byte_tokens(), "Ġt", "he"]
    vocab, ffn, head_dim = len(tokens), 2 * hidden, hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * vocab)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)

    def add(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    add("token_embd.weight", vocab, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    (tmp_path / "gguf").mkdir()
    return write_tiny_llama_gguf(tmp_path / "gguf" / "tiny.gguf")


@pytest.fixture
def alter_reloaded(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[[PreTrainedModel], None]], None]]:
    """Apply a change to the model the conversion reloads from its saved folder (not to the GGUF-loaded one)."""
    original = LlamaForCausalLM.from_pretrained.__func__  # type: ignore[attr-defined]

    def install(change: Callable[[PreTrainedModel], None]) -> None:
        def from_pretrained(cls: type, path: object, *args: object, **kwargs: object) -> PreTrainedModel:
            model = original(cls, path, *args, **kwargs)
            if "gguf_file" not in kwargs:
                change(model)
            return model

        monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", classmethod(from_pretrained))

    yield install


def _nudge_logits_by_one_ulp(model: PreTrainedModel) -> None:
    """What another kernel's reduction order does to a forward: the last bit of the outputs moves."""
    model.get_output_embeddings().register_forward_hook(
        lambda _module, _args, out: torch.nextafter(out, torch.full_like(out, float("inf")))
    )


def _convert(gguf: Path) -> Path:
    return gguf_mod.gguf_cache(gguf, "tiny", SHA, detect=True)


def test_tiny_gguf_converts_and_the_cache_holds_the_dequantised_weights(tiny_gguf: Path) -> None:
    folder = _convert(tiny_gguf)
    assert gguf_mod.cache_complete(folder)
    from_gguf = LlamaForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    cached = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert cached.lm_head.weight is cached.model.embed_tokens.weight
    expected = from_gguf.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in cached.state_dict().items())


def test_logits_that_differ_by_rounding_only_are_accepted(tiny_gguf: Path, alter_reloaded) -> None:
    """Fails on the bit-exact check of issue 32: one ulp of difference in the logits refused the conversion."""
    alter_reloaded(_nudge_logits_by_one_ulp)
    assert gguf_mod.cache_complete(_convert(tiny_gguf))


def test_conversion_check_accepts_another_thread_count(tiny_gguf: Path, alter_reloaded) -> None:
    """The reloaded model runs its probe on one thread, the GGUF one on the session's: still the same model."""
    threads = torch.get_num_threads()

    def one_thread(model: PreTrainedModel) -> None:
        model.register_forward_pre_hook(lambda *_: torch.set_num_threads(1))
        model.register_forward_hook(lambda *_: torch.set_num_threads(threads))

    alter_reloaded(one_thread)
    assert gguf_mod.cache_complete(_convert(tiny_gguf))


def _changed_weight(model: PreTrainedModel) -> None:
    """One element of one weight one ulp away: the logits barely move, the bit-for-bit weight check sees it."""
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))


def _halved_rope_frequencies(model: PreTrainedModel) -> None:
    """What a rope base read wrongly does: every weight is right, the logits move by whole units."""
    model.model.rotary_emb.inv_freq /= 2


def _untied_output_embedding(model: PreTrainedModel) -> None:
    """Same values, separate tensor: fine-tuning the input embedding would no longer reach the output."""
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_changed_weight, "tensor model.layers.1.mlp.down_proj.weight differs after saving"),
        (_halved_rope_frequencies, "probe logits differ by"),
        (_untied_output_embedding, "no longer tied"),
    ],
)
def test_a_wrong_conversion_is_refused_and_not_cached(tiny_gguf: Path, alter_reloaded, change, reason: str) -> None:
    alter_reloaded(change)
    with pytest.raises(PtuneError, match="changed the model") as err:
        _convert(tiny_gguf)
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert list(gguf_mod.models_dir().iterdir()) == []  # nothing published, no temporary left
