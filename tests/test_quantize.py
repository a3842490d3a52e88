"""backbone.quantize=int8|nf4 (torchao): the transformer blocks' frozen projections are stored quantised, the forward
computes exactly what the dequantised weights give, logits stay close to the unquantised model's, and only the
prompt (and head) trains, in full precision."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ptune.blocks import transformer_layers
from ptune.config import BackboneConfig
from ptune.efficiency.quantize import dequantize, is_quantized, quantize_backbone
from ptune.errors import PtuneError

from .helpers import amp_context, batch, close, logits, make_cfg, make_task

FAMILIES = {"bert": "mlm", "t5": "seq2seq", "gpt2": "causal", "llama": "causal", "gemma3": "causal"}
# Relative error bounds. Per weight: int8 per-row absmax scales, NF4 4-bit blocks of 64 (about 0.09 on Gaussian
# weights). End to end on tiny random models, which amplify weight noise far more than trained models do (measured:
# int8 <= 0.034, nf4 <= 0.51, the worst being T5 with deep prompts): loose, but a transposed or mis-scaled weight
# gives 1 or more, and the exact comparison with the dequantised weights below pins the forward down.
WEIGHT_TOL = {"int8": 0.01, "nf4": 0.12}
LOGIT_TOL = {"int8": 0.06, "nf4": 0.65}


def _was_conv1d(task, name: str) -> bool:
    return isinstance(task.model.backbone.get_submodule(name.rsplit(".", 1)[0]), Conv1D)


def _as_linear(task, name: str, w: torch.Tensor) -> torch.Tensor:
    """A plain backbone's weight as the quantised one stores it (GPT-2's Conv1D [in, out] became a Linear)."""
    return w.t() if _was_conv1d(task, name) else w


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _reference(tiny_models, kind: str, method: str):
    return make_task(make_cfg(tiny_models[kind], method, family=FAMILIES[kind], prompt_length=3))


def _quantized(tiny_models, kind: str, method: str, mode: str, ref):
    cfg = make_cfg(tiny_models[kind], method, family=FAMILIES[kind], prompt_length=3)
    cfg.backbone.quantize = mode
    task = make_task(cfg)
    task.model.tuner.load_state_dict(ref.model.tuner.state_dict())  # deep prompts start from real-token keys
    return task


# Every family, soft and deep prompts (both reach the same quantised projections; one method per family).
CASES = [("bert", "ptuning_v2"), ("t5", "ptuning_v2"), ("gpt2", "soft_prompt"), ("llama", "prefix"),
         ("gemma3", "ptuning_v2")]


@pytest.mark.parametrize("kind,method", CASES)
def test_quantized_backbone_matches_its_dequantized_weights(tiny_models, kind, method, amp):
    ref = _reference(tiny_models, kind, method)
    _, b = batch(ref)
    expected = logits(ref, b, amp)
    plain = {n: p.detach().clone() for n, p in ref.model.backbone.named_parameters()}
    for mode in ("int8", "nf4"):
        task = _quantized(tiny_models, kind, method, mode, ref)
        quantized = {n: p for n, p in task.model.backbone.named_parameters() if is_quantized(p)}
        block_linears = [
            m for layer in transformer_layers(task.model.backbone, "test") for m in layer.modules()
            if isinstance(m, nn.Linear)
        ]
        assert block_linears and all(is_quantized(m.weight) for m in block_linears), "a block projection is plain"
        assert len(quantized) == len(block_linears)  # embeddings, LM/MLM head and pooler stay as loaded
        assert not is_quantized(task.model.backbone.get_input_embeddings().weight)
        for name, p in quantized.items():
            assert _rel(dequantize(p), _as_linear(ref, name, plain[name])) < WEIGHT_TOL[mode], (mode, name)

        got = logits(task, b, amp)
        assert _rel(got, expected) < LOGIT_TOL[mode], mode
        assert not torch.equal(got, expected)  # the quantised weights are really used
        # The forward is exactly the dequantised model's: put those weights into the plain backbone.
        with torch.no_grad():
            for name, p in quantized.items():
                deq = dequantize(p).to(plain[name].dtype)
                ref.model.backbone.get_parameter(name).copy_(deq.t() if _was_conv1d(ref, name) else deq)
        # Under bf16 the quantised and the plain matmul round in different places: a few bf16 steps apart.
        tol = 1e-4 if amp is None else 4 * close(amp, 0)
        torch.testing.assert_close(got, logits(ref, b, amp), rtol=tol, atol=tol)
        with torch.no_grad():
            for name, p in ref.model.backbone.named_parameters():
                p.copy_(plain[name])


@pytest.mark.parametrize("mode", ["int8", "nf4"])
@pytest.mark.parametrize("method,kind", [("soft_prompt", "llama"), ("ptuning_v2", "t5"), ("prefix", "gpt2")])
def test_only_the_full_precision_prompt_trains(tiny_models, kind, method, mode):
    cfg = make_cfg(tiny_models[kind], method, family=FAMILIES[kind], prompt_length=3)
    cfg.backbone.quantize = mode
    task = make_task(cfg)
    model = task.model
    frozen = {n: dequantize(p).clone() for n, p in model.backbone.named_parameters() if is_quantized(p)}
    trainable = model.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 and not is_quantized(p) for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    _, b = batch(task)
    model.train()
    losses = []
    for _ in range(3):
        out = model(b["input_ids"], b["attention_mask"], b["answer_pos"])
        loss = torch.nn.functional.cross_entropy(out, b["labels"])
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        assert all(p.grad is None for p in model.backbone.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.backbone.named_parameters():
        if n in frozen:
            assert is_quantized(p) and torch.equal(dequantize(p), frozen[n]), n


def _saved_activation_bytes(task, b) -> int:
    """Bytes of plain tensors autograd keeps from forward to backward (quantised weights are stored anyway)."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not is_quantized(t) and not isinstance(t, nn.Parameter):
            saved[0] += t.numel() * t.element_size()
        return t

    task.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = task.model(b["input_ids"], b["attention_mask"], b["answer_pos"])
    torch.nn.functional.cross_entropy(out, b["labels"]).backward()
    return saved[0]


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_backward_keeps_no_dequantized_weights(tiny_models, kind):
    """Training memory is activations plus quantised weights: no layer keeps a dequantised copy of its weight
    for backward (torchao's own int8 linear would)."""
    ref = _reference(tiny_models, kind, "soft_prompt")
    _, b = batch(ref)
    plain = _saved_activation_bytes(ref, b)
    for mode in ("int8", "nf4"):
        task = _quantized(tiny_models, kind, "soft_prompt", mode, ref)
        assert _saved_activation_bytes(task, b) <= plain, mode


def test_bad_values_and_missing_torchao_are_one_line_errors(monkeypatch):
    with pytest.raises(PtuneError, match=r"backbone.quantize='fp8' is not valid: use one of none, int8, nf4"):
        BackboneConfig(name="minilm", quantize="fp8")
    with pytest.raises(PtuneError, match="no transformer blocks|has none"):
        quantize_backbone(nn.Sequential(nn.Linear(64, 64)), "int8")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(PtuneError, match="needs torchao: pip install torchao"):
        quantize_backbone(nn.Sequential(nn.Linear(64, 64)), "nf4")


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_linear_backward_is_the_dequantized_matmul(tiny_models, mode, amp):
    """The input gradient of a quantised projection is exactly grad @ W (W dequantised), as a plain linear layer
    with the dequantised weight computes it, in fp32 and under bf16 autocast (its custom backward is not autograd's:
    a scaled or transposed gradient would otherwise pass, the forward being checked alone)."""
    from ptune.efficiency.quantize import QuantizedLinear

    cfg = make_cfg(tiny_models["llama"], "soft_prompt", family="causal")
    cfg.backbone.quantize = mode
    task = make_task(cfg)
    layer = next(m for m in task.model.backbone.modules() if isinstance(m, QuantizedLinear))
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        plain.weight.copy_(dequantize(layer.weight).float())
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, layer.in_features, generator=g)
    upstream = torch.randn(3, 5, layer.out_features, generator=g)
    grads, outs = [], []
    for module in (layer, plain):
        xi = x.clone().requires_grad_(True)
        with amp_context(amp):
            out = module(xi)
        out.float().backward(upstream)
        grads.append(xi.grad)
        outs.append(out.float())
    tol = 1e-5 if amp is None else 4 * close(amp, 0)
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol)
    assert grads[0].dtype == torch.float32
