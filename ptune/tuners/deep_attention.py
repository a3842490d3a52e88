"""Deep-prompt injection through transformers' attention-function registry.

Every architecture of transformers 5.x (BERT, T5/MT5, GPT-2, Llama, Gemma 3, ...) calls a registered
attention function with the already-projected (and, for rotary models, already-rotated) query/key/value.
We register one wrapper, ``ptune_sdpa``, that prepends the active key/value prefixes of that attention site
and widens the mask (and T5's relative-position bias) to match, then calls the stock SDPA kernel. This
avoids the cache API, which keeps changing across 5.x releases, and needs no per-architecture class.
Prefixes are per-row tensors, so one batch may mix prompts (multi-prompt serving).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

IMPLEMENTATION = "ptune_sdpa"


@dataclass
class _State:
    prefixes: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per site: key, value [B, H, P, D]
    prefix_mask: torch.Tensor | None = None  # [B, P] or [B, L, P] bool, False = a slot this row/token skips
    record: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # site -> (key, value) seen
    keep_grad: bool = False  # recorded keys/values stay in the autograd graph (shared-prefix forward)


_ACTIVE: contextvars.ContextVar[_State | None] = contextvars.ContextVar("ptune_deep_prompt", default=None)


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    state = _ACTIVE.get()
    site = getattr(module, "_ptune_site", None)
    if state is not None and site is not None:
        if state.record is not None:
            state.record[site] = (key, value) if state.keep_grad else (key.detach(), value.detach())
        if state.prefixes is not None:
            pk, pv = state.prefixes[site]
            key, value, attention_mask, kwargs = _extend(
                module, query, key, value, pk, pv, attention_mask, kwargs, state.prefix_mask
            )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _extend(module, query, key, value, pk, pv, mask, kwargs, keep=None):
    p = pk.shape[-2]
    b = key.shape[0]
    key = torch.cat([pk.to(key.dtype).expand(b, -1, -1, -1), key], dim=2)
    value = torch.cat([pv.to(value.dtype).expand(b, -1, -1, -1), value], dim=2)
    q_len, k_len = query.shape[2], key.shape[2] - p
    if mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", False) if causal is None else causal
        if causal and q_len > 1 and keep is None and kwargs.get("position_bias") is None and lower_right_causal(key):
            # No padding and one prefix length: "every prefix slot, then causal" is causal attention aligned to
            # the bottom-right corner, which the flash kernel runs without any mask tensor.
            return key, value, causal_lower_right(q_len, k_len + p), kwargs
        if causal and q_len > 1:
            rows = torch.arange(q_len, device=key.device)[:, None] + (k_len - q_len)
            mask = (rows >= torch.arange(k_len, device=key.device)[None, :]).view(1, 1, q_len, k_len)
    if keep is not None:  # per-row prefix lengths: hide each row's padding slots
        if mask is None:
            mask = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=key.device)
        mask = mask.expand(b, mask.shape[1], q_len, k_len)
        keep = keep.to(key.device)
        if mask.dtype != torch.bool:
            keep = torch.zeros(keep.shape, dtype=mask.dtype, device=key.device).masked_fill(
                ~keep, torch.finfo(mask.dtype).min)
        left = keep[:, None] if keep.dim() == 3 else keep[:, None, None, :]  # per query (packed rows) or per row
        mask = torch.cat([left.expand(b, mask.shape[1], q_len, p), mask], dim=-1)
    elif mask is not None:
        mask = F.pad(mask, (p, 0), value=True if mask.dtype == torch.bool else 0.0)
    bias = kwargs.get("position_bias")
    if bias is not None:
        kwargs = {**kwargs, "position_bias": F.pad(bias, (p, 0), value=0.0)}
    return key, value, mask, kwargs


LOWER_RIGHT_DEVICES = {"cuda"}  # where a lower-right CausalBias beats a mask tensor (a CPU would materialise it)


def lower_right_causal(key: torch.Tensor) -> bool:
    return key.device.type in LOWER_RIGHT_DEVICES


ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def is_cross_attention(name: str, mod: nn.Module, modules: dict[str, nn.Module]) -> bool:
    """Whether the attention module ``name`` (``modules``: the model's named modules) attends to another sequence
    (T5's EncDecAttention, BERT's BertCrossAttention, BART's encoder_attn)."""
    parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
    return (
        "Cross" in type(mod).__name__
        or (parent is not None and "Cross" in type(parent).__name__)
        or bool(getattr(mod, "is_cross_attention", False))
        or name.endswith("crossattention")
        or name.endswith("encoder_attn")
    )


def mark_attention_sites(model: nn.Module) -> None:
    """Number the innermost modules named *Attention (the ones that call the attention function) in model order:
    a module's ``_ptune_site`` indexes the prefixes it gets."""
    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    innermost = [m for m in attention if not any(c in attention for c in m.modules() if c is not m)]
    for i, mod in enumerate(innermost):
        mod._ptune_site = i


def enable(model: nn.Module) -> None:
    """Route the model's attention through the prefix-aware wrapper and number its attention sites."""
    if model.config._attn_implementation != IMPLEMENTATION:
        model.set_attn_implementation(IMPLEMENTATION)
    mark_attention_sites(model)


@contextlib.contextmanager
def _activated(state: _State | None) -> Iterator[None]:
    token = _ACTIVE.set(state)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def prefixes(
    per_site: list[tuple[torch.Tensor, torch.Tensor]] | None, mask: torch.Tensor | None = None
) -> Iterator[None]:
    """``mask`` (optional, bool): which prefix slots each row attends to: [B, P] for rows whose prompts have
    different prefix lengths padded to the longest, [B, L, P] per token where one sequence packs several rows
    (``ptune.packing``)."""
    with _activated(_State(prefixes=per_site, prefix_mask=mask)):
        yield


@contextlib.contextmanager
def recording(keep_grad: bool = False) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Capture every site's key/value: to size prefixes and initialise them from real tokens, and (with
    ``keep_grad``) to reuse a shared prompt prefix's keys/values across a batch."""
    record: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with _activated(_State(record=record, keep_grad=keep_grad)):
        yield record


def recomputation_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """The deep-prompt part of ``checkpointing.recomputation_contexts``: (forward context, recomputation context).

    A checkpointed layer is run again in backward, after ``prefixes()`` has exited (and, on CUDA, on autograd's
    own thread, which never saw the context variable), so the recomputation would attend without the prefixes
    and silently give other activations and gradients. Called as the checkpointed forward starts, this captures
    the state active then and re-activates it around the recomputation. Recording is left out: the forward
    already handed its keys/values out, and a second recording would overwrite them.
    """
    state = _ACTIVE.get()
    replay = None if state is None else replace(state, record=None)
    return contextlib.nullcontext(), _activated(replay)
