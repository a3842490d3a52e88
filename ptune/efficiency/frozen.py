"""Speed-ups that are only sound because the backbone is frozen.

- Frozen ``nn.Linear`` weights stored once in the autocast dtype (autocast would convert them again in every
  forward).
- Projections that read the same input (query/key/value, a gated MLP's gate/up) fused into one matmul: the
  activation is cast to the autocast dtype once instead of once per projection, the matmul is wider (better use
  of AMX tiles and GPU SMs), and backward runs one activation-gradient matmul instead of three.

Neither changes the numbers: autocast runs linear layers in its dtype on both operands anyway, and a fused
matmul computes each output column from the same row and column as the separate ones.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tuners.deep_attention import is_cross_attention
from .quantize import is_quantized

# Sibling projections that read the same input in the families we support (BERT, Llama/Gemma/SmolLM, T5/mT5).
FUSABLE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q", "k", "v"),
    ("gate_proj", "up_proj"),
    ("wi_0", "wi_1"),
)


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store frozen ``nn.Linear`` weights in the autocast dtype once; returns how many tensors were cast.

    Autocast caches its casts only for leaves that require grad, so every frozen weight is otherwise converted
    again in every forward (and in every evaluation batch). Autocast runs linear layers in ``dtype`` on both
    inputs anyway, so the numbers are the same. Weights shared with another module (an LM head tied to the
    embedding table, whose lookup autocast leaves in fp32) are left alone.

    Quantised weights (``backbone.quantize``) are left as they are: casting one would dequantise it.

    Loaded weights are views of the memory-mapped safetensors file, which stays mapped (and resident) while any
    of them lives; the other frozen tensors are copied out of it so the fp32 originals are really released.
    """
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    cast: set[int] = set()
    for m in model.modules():
        if not isinstance(m, nn.Linear):
            continue
        for p in m.parameters(recurse=False):
            if not p.requires_grad and p.dtype == torch.float32 and owners[id(p)] == 1 and not is_quantized(p):
                p.data = p.data.to(dtype)
                cast.add(id(p))
    if cast:
        with torch.no_grad():
            for p in model.parameters():
                if id(p) not in cast and not p.requires_grad and not is_quantized(p):
                    p.data = p.data.clone()
            for m in model.modules():
                for name, b in m._buffers.items():
                    if b is not None:
                        m._buffers[name] = b.clone()
    return len(cast)


class FusedProjection(nn.Module):
    """One matmul for several frozen projections of the same input; each member reads its slice.

    The result is kept until every member has read it, then dropped (an evaluation forward would otherwise keep
    one activation per layer alive). A member called with another input than the kept one recomputes, so a
    module that feeds its projections different tensors still gets the right numbers, only without the saving.
    """

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        with torch.no_grad():
            weight = torch.cat([m.weight for m in linears])
            bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.sizes = [m.out_features for m in linears]
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._unread: set[int] = set()

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input or index not in self._unread:
            self._parts = torch.nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
            self._input, self._unread = x, set(range(len(self.sizes)))
        out = self._parts[index]
        self._unread.discard(index)
        if not self._unread:
            self._input, self._parts = None, ()
        return out


class ProjectionSlice(nn.Module):
    """Stands where one of the fused ``nn.Linear`` layers stood; ``weight``/``bias`` are views of its rows."""

    def __init__(self, fused: FusedProjection, index: int, in_features: int):
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: the parent owns it once
        self.index = index
        self.in_features = in_features
        self.out_features = fused.sizes[index]
        self._start = sum(fused.sizes[:index])

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self._start : self._start + self.out_features]

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.fused.bias
        return None if b is None else b[self._start : self._start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(self.index, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused"


def _fusable(linears: list[nn.Module]) -> bool:
    if not all(type(m) is nn.Linear and not is_quantized(m.weight) for m in linears):
        return False
    first = linears[0]
    return all(
        not m.weight.requires_grad
        and m.in_features == first.in_features
        and m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device
        and (m.bias is None) == (first.bias is None)
        and (m.bias is None or not m.bias.requires_grad)
        for m in linears
    )


def fuse_projections(model: nn.Module) -> int:
    """Fuse each frozen group of FUSABLE_GROUPS in place; returns how many groups were fused.

    Call it after the model reached its device and dtype: the members' weights become views of the fused one.
    """
    fused = 0
    modules = dict(model.named_modules())
    for path, parent in modules.items():  # a snapshot: fusing adds modules
        if is_cross_attention(path, parent, modules):  # q reads another sequence than k/v: each would run on both
            continue
        children = dict(parent.named_children())
        for names in FUSABLE_GROUPS:
            if not all(n in children for n in names):
                continue
            linears = [children[n] for n in names]
            if not _fusable(linears):
                continue
            projection = FusedProjection(linears)
            parent.add_module("ptune_fused_" + "_".join(names), projection)
            for i, n in enumerate(names):
                setattr(parent, n, ProjectionSlice(projection, i, linears[i].in_features))
            fused += 1
    return fused


def prepare_frozen_backbone(model: nn.Module, amp: torch.dtype | None, cast: bool, fuse: bool) -> None:
    """The speed-ups above, as configured (``trainer.cast_frozen_weights``, ``trainer.fuse_projections``)."""
    if amp is not None and cast:
        cast_frozen_linears(model, amp)
    if fuse:
        fuse_projections(model)
