"""Fused frozen projections: same logits and prompt gradients on every family, nothing kept between forwards,
the right numbers when a member is fed another input, and the backbone still frozen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptune.efficiency.frozen import FusedProjection, ProjectionSlice, cast_frozen_linears, fuse_projections

from .helpers import batch, make_cfg, make_task

CASES = [
    ("bert", "ptuning_v2", "mlm"),
    ("bert", "soft_prompt", "mlm"),
    ("llama", "soft_prompt", "causal"),
    ("gemma3", "prefix", "causal"),
    ("t5", "prefix", "seq2seq"),
    ("mt5", "soft_prompt", "seq2seq"),
]


def _forward(task, b, amp: bool):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with ctx:
        return task.model(b["input_ids"], b["attention_mask"], b["answer_pos"]).float()


def _prompt_grads(task, b, amp: bool) -> list[torch.Tensor]:
    task.model.train()
    task.model.zero_grad(set_to_none=True)
    _forward(task, b, amp).logsumexp(-1).sum().backward()
    return [p.grad.clone() for p in task.model.trainable_parameters()]


def _fused_modules(model: nn.Module) -> list[FusedProjection]:
    return [m for m in model.modules() if isinstance(m, FusedProjection)]


@pytest.mark.parametrize("kind,method,family", CASES)
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_fused_projections_keep_logits_and_prompt_gradients(tiny_models, kind, method, family, amp):
    task = make_task(make_cfg(tiny_models[kind], method, family=family))
    _, b = batch(task)
    if amp:
        cast_frozen_linears(task.backbone.model, torch.bfloat16)
    task.model.eval()
    with torch.no_grad():
        before = _forward(task, b, amp)
    grads_before = _prompt_grads(task, b, amp)

    groups = fuse_projections(task.backbone.model)
    layers = task.backbone.model.config.num_hidden_layers
    assert groups >= layers  # at least the self-attention q/k/v of every layer
    task.model.eval()
    with torch.no_grad():
        after = _forward(task, b, amp)
    grads_after = _prompt_grads(task, b, amp)

    # One matmul computes each column from the same row and column: equal to float rounding of the kernel.
    tol = {"atol": 2e-2, "rtol": 2e-2} if amp else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(after, before, **tol)
    for g_after, g_before in zip(grads_after, grads_before, strict=True):
        torch.testing.assert_close(g_after, g_before, **tol)
    assert after.argmax(-1).tolist() == before.argmax(-1).tolist()
    # Still frozen; nothing kept alive between forwards.
    assert all(not p.requires_grad for p in task.backbone.model.parameters())
    assert all(m._input is None and m._parts == () for m in _fused_modules(task.backbone.model))


def test_fusion_skips_cross_attention_and_keeps_weight_views(tiny_models):
    task = make_task(make_cfg(tiny_models["t5"], "prefix", family="seq2seq"))
    model = task.backbone.model
    q_before = model.decoder.block[0].layer[0].SelfAttention.q.weight.clone()
    fuse_projections(model)
    self_attn = model.decoder.block[0].layer[0].SelfAttention
    cross = model.decoder.block[0].layer[1].EncDecAttention
    assert isinstance(self_attn.q, ProjectionSlice)
    assert type(cross.q) is nn.Linear and type(cross.k) is nn.Linear  # q reads the decoder, k/v the encoder
    assert torch.equal(self_attn.q.weight, q_before)
    assert self_attn.q.weight.data_ptr() == self_attn.ptune_fused_q_k_v.weight.data_ptr()  # a view, not a copy
    assert fuse_projections(model) == 0  # idempotent: fused groups are no longer nn.Linear


def test_member_fed_another_input_recomputes():
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(8, 4), nn.Linear(8, 2), nn.Linear(8, 2)
    for p in parent.parameters():
        p.requires_grad_(False)
    ref = {n: getattr(parent, n) for n in ("q_proj", "k_proj", "v_proj")}
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    want = (ref["q_proj"](x), ref["k_proj"](y), ref["v_proj"](y), ref["v_proj"](x))
    assert fuse_projections(parent) == 1
    got = (parent.q_proj(x), parent.k_proj(y), parent.v_proj(y), parent.v_proj(x))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_trainable_linears_are_not_fused():
    parent = nn.Module()
    parent.gate_proj, parent.up_proj = nn.Linear(8, 4), nn.Linear(8, 4)
    parent.up_proj.weight.requires_grad_(False)
    parent.up_proj.bias.requires_grad_(False)
    assert fuse_projections(parent) == 0  # gate_proj trains (a LoRA-style user change): leave both alone
    assert type(parent.gate_proj) is nn.Linear
