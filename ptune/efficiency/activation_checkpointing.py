"""Gradient (activation) checkpointing of the frozen backbone: ``trainer.gradient_checkpointing=true``.

Only the prompt trains, but backward still runs through every layer to reach it, so every layer's activations
are normally kept from forward to backward: at batch 64 that, not the weights, sets peak memory. A checkpointed
layer keeps only its input and runs its forward again in backward.

We wrap the blocks ourselves instead of calling ``model.gradient_checkpointing_enable()``: transformers
checkpoints a layer only in training mode, and ptune keeps the frozen backbone in eval mode (no dropout), and its
recomputation would not see the deep prompts (``deep_attention.recomputation_contexts``). The non-reentrant
``torch.utils.checkpoint`` is the one that works here: deep prefixes reach a layer through a context variable,
not through its arguments, and only the non-reentrant variant follows gradients into tensors a region did not
take as inputs. Same numbers as without it: the recomputation runs the same frozen weights on the same inputs,
under the same computation settings as the forward (``recomputation_contexts``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.attention import _cur_sdpa_kernel_backends, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ..blocks import transformer_layers
from ..tuners import deep_attention as da

# Layer keyword arguments that carry a KV cache: a recomputation would append its keys and values a second time
# (and a cache keeps every layer's keys/values alive, which checkpointing is there to avoid). transformers drops
# them the same way when it checkpoints.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Checkpoint every transformer block of ``model`` (idempotent); returns how many blocks are checkpointed."""
    layers = transformer_layers(model, "trainer.gradient_checkpointing")
    for layer in layers:
        if not getattr(layer, "_ptune_checkpointed", False):
            layer.forward = _checkpointed(layer.forward)  # an instance attribute: FSDP2's hooks stay outside
            layer._ptune_checkpointed = True
    return len(layers)


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return forward(*args, **kwargs)
        args, kwargs = _without_cache(signature, args, kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=recomputation_contexts, **kwargs)

    return run


def recomputation_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: (forward context, recomputation context).

    The recomputation runs in backward, after the training step's contexts have exited. torch restores autocast
    and the RNG itself, but not two settings that choose what a layer computes, so both are captured here as the
    checkpointed forward starts and re-activated around its recomputation:

    - the deep prompts (``deep_attention.recomputation_contexts``): without them the layer attends without its
      prefixes;
    - the SDPA kernels allowed (``runtime.attention_kernel``: the training step picks the math kernel for bf16/fp16
      on CPU). Recomputed with another kernel, the layer saves other tensors for backward (the math kernel's fp32
      attention matrix, the flash kernel's bf16 output and log-sum-exp), and torch stops with "Recomputed values
      for the following tensors have different metadata than during the forward pass" (issue 30).
    """
    _, prompts = da.recomputation_contexts()
    return contextlib.nullcontext(), _recomputing(prompts, _cur_sdpa_kernel_backends(with_priority=False))


@contextlib.contextmanager
def _recomputing(prompts: contextlib.AbstractContextManager, kernels: list) -> Iterator[None]:
    with prompts, sdpa_kernel(kernels):
        yield


def _without_cache(signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with any KV cache dropped, whether passed by keyword or by position (GPT-2's blocks
    get theirs positionally)."""
    bound = signature.bind(*args, **kwargs)
    named = bound.arguments
    extra = next((named.get(p.name, {}) for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), {})
    for where in (named, extra):
        for key in _CACHE_KWARGS:
            if where.get(key) is not None:
                where[key] = None
        if where.get("use_cache"):
            where["use_cache"] = False
    return bound.args, bound.kwargs
