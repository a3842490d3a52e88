"""Quantised frozen weights: ``backbone.quantize=none|int8|nf4``, with torchao.

The projections of the transformer blocks (``ptune.blocks``), nearly all of a backbone's weights, are
stored as int8 (per-output-channel scales, torchao's ``Int8Tensor``) or as NF4 (4-bit NormalFloat in blocks of 64
with double-quantised scales, torchao's ``NF4Tensor``: what QLoRA and torchtune use). A quantised weight is
dequantised to the activation's dtype inside each matmul, in forward and again for the input gradient in backward;
no weight gradient exists. Everything that trains stays in full precision (prompts, prompt encoders, heads), and so
do the embeddings, the LM/MLM head and the pooler: they sit outside the blocks, are small next to them, and the
verbalizer reads LM head rows by index.

torchao runs the same code on CPU and CUDA, so this path is tested on CPU. It is optional: installed with ptune's
``dev`` extra (``pip install torchao`` otherwise), imported only when a backbone is quantised.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..blocks import transformer_layers
from ..errors import PtuneError

MODES = ("none", "int8", "nf4")
NF4_BLOCK = 64  # weights per 4-bit block (one scale each): QLoRA's value
NF4_MAX_SCALER_BLOCK = 256  # blocks per double-quantisation group of the scales: QLoRA's value
NF4_SHARDABLE = 8  # scale groups per weight come in multiples of this: FSDP2 can shard over 2, 4 or 8 ranks


def is_quantized(tensor: torch.Tensor) -> bool:
    """A weight stored by torchao (a tensor subclass): it cannot be cast, concatenated or indexed like a plain
    tensor, so the frozen-backbone speed-ups (``ptune.efficiency.frozen``) leave it alone."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    return type(data).__module__.startswith("torchao.")


def quantize_backbone(model: nn.Module, mode: str, work_device: torch.device | None = None) -> int:
    """Quantise the frozen ``nn.Linear`` weights inside ``model``'s transformer blocks in place; returns how many.

    A weight NF4 cannot split into whole blocks (fewer than 64 values per block row) stays as loaded. Weights shared
    with another module (tied) are left alone too: the other user may need the plain tensor.

    Each weight is quantised on ``work_device`` (default: the GPU when there is one: NF4's nearest-level search
    takes minutes for a 7B model on a CPU, seconds on a GPU) one at a time, and stored back where it was, so the
    model's memory only shrinks and where it lives does not change.
    """
    check_available(mode)
    if mode == "none":
        return 0
    quantize = _quantizer(mode)
    if work_device is None:
        work_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    layers = transformer_layers(model, f"backbone.quantize={mode}")
    for layer in layers:
        _conv1d_to_linear(layer)
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    done = 0
    for layer in layers:
        for module in layer.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, nn.Linear) or not isinstance(weight, nn.Parameter):
                continue
            if weight.requires_grad or owners[id(weight)] > 1 or is_quantized(weight) or weight.dim() != 2:
                continue
            q = quantize(weight.detach().to(work_device))
            if q is not None:
                q = q.to(weight.device)
                module.weight = nn.Parameter(q, requires_grad=False)
                module.__class__ = QuantizedLinear  # in place: hooks, names and the parent stay as they were
                done += 1
    return done


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A quantised weight as a plain tensor of its dtype."""
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    return data.get_original_weight() if hasattr(data, "get_original_weight") else data.dequantize()


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is quantised; backward keeps nothing but that weight.

    Through torchao's own ``F.linear`` of an int8 weight, autograd would save a dequantised copy of the weight for
    every layer until backward (measured on the 0.1B shape: activations 2.1 GiB instead of 1.2), which undoes the
    saving. Here the forward runs torchao's matmul without a graph, and backward dequantises the weight again to
    pass the gradient to the input: the same arithmetic QLoRA's NF4 linear uses.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _FrozenQuantizedMatmul.apply(x, self.weight)
        return out if self.bias is None else out + self.bias


class _FrozenQuantizedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        with torch.no_grad():
            return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return (grad @ dequantize(weight).to(grad.dtype)).to(ctx.x_dtype), None


def _conv1d_to_linear(layer: nn.Module) -> None:
    """GPT-2's ``Conv1D`` is a linear layer with its weight stored transposed ([in, out]); as an ``nn.Linear``
    (same numbers) its weight quantises per output row like every other projection."""
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D) and not child.weight.requires_grad:
                linear = nn.Linear(child.nx, child.nf, device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                linear.requires_grad_(False)
                setattr(parent, name, linear)


def _quantizer(mode: str):
    ao = _torchao()
    if mode == "int8":
        return lambda w: ao.Int8Tensor.from_hp(w.contiguous(), granularity=ao.PerRow())

    def nf4(w: torch.Tensor) -> torch.Tensor | None:
        if w.numel() % NF4_BLOCK:
            return None
        blocks = w.numel() // NF4_BLOCK
        scaler_block = NF4_MAX_SCALER_BLOCK
        # Scales are grouped in a power of two that divides their count, into a multiple of NF4_SHARDABLE groups
        # where the weight allows: FSDP2 splits every part of an NF4 tensor evenly over the ranks.
        while scaler_block > 1 and (blocks % scaler_block or (blocks // scaler_block) % NF4_SHARDABLE):
            scaler_block //= 2
        return ao.to_nf4(w.contiguous(), NF4_BLOCK, scaler_block)

    return nf4


def check_available(mode: str) -> None:
    """Refuse a bad mode, or a missing torchao, before a backbone is loaded (which may take minutes)."""
    if mode not in MODES:
        raise PtuneError(f"backbone.quantize={mode!r} is not valid: use one of {', '.join(MODES)}")
    if mode != "none":
        _torchao()


def _torchao():
    try:
        import torchao.quantization as ao
    except ImportError:
        raise PtuneError("backbone.quantize needs torchao: pip install torchao (or backbone.quantize=none)") from None
    return ao
