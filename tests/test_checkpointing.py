"""trainer.gradient_checkpointing: every method on every family gives the same loss and the same prompt gradients
with and without it, and the layers really are recomputed in backward."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.checkpoint import CheckpointError

from ptune.checkpointing import enable_gradient_checkpointing
from ptune.tuners import deep_attention as da

from .helpers import batch, make_cfg, make_task

FAMILIES = {"bert": "mlm", "bert-head": "mlm", "t5": "seq2seq", "gpt2": "causal", "llama": "causal", "gemma3": "causal"}
METHODS = ["soft_prompt", "ptuning_v1", "ptuning_v2", "prefix"]


def _task(tiny_models, method: str, kind: str):
    if kind == "bert-head":
        cfg = make_cfg(tiny_models["bert"], method, readout="head", prompt_length=3)
    else:
        cfg = make_cfg(tiny_models[kind], method, family=FAMILIES[kind], prompt_length=3)
    task = make_task(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a prompt away from its init, so that a prompt-less recomputation would show
        for p in task.model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return task


def _loss_and_grads(task, b) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = task.model
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(b["input_ids"], b["attention_mask"], b["answer_pos"])
    loss = torch.nn.functional.cross_entropy(out, b["labels"])
    loss.backward()
    named = dict(model.tuner.named_parameters()) | {f"readout.{k}": v for k, v in model.readout.named_parameters()}
    return loss.detach(), {k: p.grad.clone() for k, p in named.items() if p.requires_grad}


def _count_attention_calls(model: torch.nn.Module) -> list[int]:
    """How often the first attention module runs: once per forward, once more per backward when checkpointed."""
    calls = [0]
    first = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    first.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _eval_calls(task, b, calls: list[int]) -> int:
    calls[0] = 0
    with torch.no_grad():
        task.model.eval()(b["input_ids"], b["attention_mask"], b["answer_pos"])
    return calls[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_checkpointing_keeps_loss_and_prompt_gradients(tiny_models, method, kind):
    task = _task(tiny_models, method, kind)
    _, b = batch(task)
    calls = _count_attention_calls(task.model.backbone)
    loss, grads = _loss_and_grads(task, b)
    plain_calls = calls[0]
    plain_eval_calls = _eval_calls(task, b, calls)
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    assert enable_gradient_checkpointing(task.model.backbone) >= 2
    calls[0] = 0
    loss_ckpt, grads_ckpt = _loss_and_grads(task, b)
    assert calls[0] == 2 * plain_calls, "the checkpointed layer was not recomputed in backward"
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    for k in grads:
        torch.testing.assert_close(grads_ckpt[k], grads[k], rtol=1e-5, atol=1e-6, msg=k)
    assert _eval_calls(task, b, calls) == plain_eval_calls  # no recomputation without autograd


@pytest.mark.parametrize("kind", ["bert", "t5", "llama"])
def test_recomputation_without_the_prefixes_is_caught(tiny_models, kind, monkeypatch):
    """The check above is sharp enough: a recomputation without the deep prompts (the context not restored) fails,
    through torch's check that recomputed tensors keep their shapes or else through differing gradients."""
    task = _task(tiny_models, "ptuning_v2", kind)
    _, b = batch(task)
    _, grads = _loss_and_grads(task, b)
    monkeypatch.setattr(da, "recomputation_contexts", lambda: (contextlib.nullcontext(), contextlib.nullcontext()))
    enable_gradient_checkpointing(task.model.backbone)
    try:
        _, broken = _loss_and_grads(task, b)
    except CheckpointError:  # torch noticed that the recomputed tensors have other shapes: caught either way
        return
    assert any(not torch.allclose(broken[k], grads[k], rtol=1e-5, atol=1e-6) for k in grads)
