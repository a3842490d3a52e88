"""trainer.gradient_checkpointing: every method on every family gives the same loss and the same prompt gradients
with and without it, under fp32 and under bf16 and fp16 autocast (forced on, whatever the CPU: the training step's
own autocast and SDPA-kernel contexts), alone and with the other features that wrap the forward (fused frozen
projections, int8/nf4 quantised blocks), and the layers really are recomputed in backward."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.checkpoint import CheckpointError

from ptune.efficiency.activation_checkpointing import enable_gradient_checkpointing
from ptune.efficiency.frozen import prepare_frozen_backbone
from ptune.runtime import attention_kernel, autocast
from ptune.tuners import METHODS as METHOD_REGISTRY
from ptune.tuners import deep_attention as da

from .helpers import batch, make_cfg, make_task

FAMILIES = {"bert": "mlm", "bert-head": "mlm", "t5": "seq2seq", "gpt2": "causal", "llama": "causal", "gemma3": "causal"}
METHODS = list(METHOD_REGISTRY)  # every registered method: a new one is tested without editing this file
CPU = torch.device("cpu")
# Autocast dtypes, forced on. fp16 autocast runs on CPU in torch (ptune itself refuses trainer.precision=fp16 there:
# its GradScaler is CUDA-only), so the recomputation is checked under it here too.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The recomputation runs the same kernels on the same inputs, so the numbers agree to the rounding of one
# reduction order at most: a few units of each dtype's last place, relative to the largest gradient.
TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 4e-3}


def _task(tiny_models, method: str, kind: str, quantize: str = "none"):
    if kind == "bert-head":
        cfg = make_cfg(tiny_models["bert"], method, readout="head", prompt_length=3)
    else:
        cfg = make_cfg(tiny_models[kind], method, family=FAMILIES[kind], prompt_length=3)
    cfg.backbone.quantize = quantize
    task = make_task(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a prompt away from its init, so that a prompt-less recomputation would show
        for p in task.model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return task


def _loss_and_grads(task, b, amp: torch.dtype | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss and gradients, computed as ``train_step`` does: the forward under the run's autocast
    and SDPA-kernel contexts (the math kernel under CPU bf16/fp16), backward after both have exited."""
    model = task.model
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast(CPU, amp), attention_kernel("auto", CPU, amp, b["input_ids"].shape[1]):
        out = model(b["input_ids"], b["attention_mask"], b["answer_pos"])
        loss = torch.nn.functional.cross_entropy(out.float(), b["labels"])
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


def _assert_same(loss, grads, loss_ckpt, grads_ckpt, precision: str) -> None:
    tol = TOL[precision]
    torch.testing.assert_close(loss_ckpt, loss, rtol=tol, atol=tol)
    assert grads_ckpt.keys() == grads.keys()
    for k in grads:
        scale = float(grads[k].abs().max())
        torch.testing.assert_close(grads_ckpt[k], grads[k], rtol=tol, atol=tol * scale, msg=k)


def _method_precisions() -> list[tuple[str, str]]:
    """Every method x precision but P-tuning v1 under fp16 on CPU: oneDNN has no fp16 LSTM (its prompt encoder)
    ("could not create a primitive descriptor for the LSTM forward"), and ptune refuses fp16 on CPU anyway."""
    return [(m, p) for m in METHODS for p in PRECISIONS if not (m == "ptuning_v1" and p == "fp16")]


@pytest.mark.parametrize("method,precision", _method_precisions())
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_checkpointing_keeps_loss_and_prompt_gradients(tiny_models, method, kind, precision):
    amp = PRECISIONS[precision]
    task = _task(tiny_models, method, kind)
    _, b = batch(task)
    calls = _count_attention_calls(task.model.backbone)
    loss, grads = _loss_and_grads(task, b, amp)
    plain_calls = calls[0]
    plain_eval_calls = _eval_calls(task, b, calls)
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    assert enable_gradient_checkpointing(task.model.backbone) >= 2
    calls[0] = 0
    loss_ckpt, grads_ckpt = _loss_and_grads(task, b, amp)
    assert calls[0] == 2 * plain_calls, "the checkpointed layer was not recomputed in backward"
    _assert_same(loss, grads, loss_ckpt, grads_ckpt, precision)
    assert _eval_calls(task, b, calls) == plain_eval_calls  # no recomputation without autograd


# The other features that wrap the forward, each with checkpointing on top, as the training run applies them:
# fused projections (and frozen weights cast to the autocast dtype) by prepare_frozen_backbone, quantised blocks
# at load. (trainer.compile refuses checkpointing: memory.check_combination; FSDP2 sharding with checkpointing runs
# on two gloo ranks in tests/test_sharding.py.)
FEATURES = ["fused", "int8", "nf4"]


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("method,kind", [("ptuning_v2", "bert"), ("prefix", "t5"), ("soft_prompt", "llama"),
                                         ("ptuning_v2", "gemma3")])
def test_checkpointing_with_other_forward_features_keeps_gradients(tiny_models, method, kind, feature, precision):
    amp = PRECISIONS[precision]
    task = _task(tiny_models, method, kind, quantize=feature if feature != "fused" else "none")
    if feature == "fused":
        prepare_frozen_backbone(task.backbone.model, amp, cast=True, fuse=True)
    _, b = batch(task)
    loss, grads = _loss_and_grads(task, b, amp)
    enable_gradient_checkpointing(task.model.backbone)
    loss_ckpt, grads_ckpt = _loss_and_grads(task, b, amp)
    _assert_same(loss, grads, loss_ckpt, grads_ckpt, precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpointed_training_run_saves_the_same_prompt(tiny_models, tiny_csv, tmp_path, precision):
    """The run of issue 30 at tiny scale: ``trainer.gradient_checkpointing=true`` under bf16 autocast (what
    ``precision=auto`` picks on CPUs with bf16 instructions and on GPUs) trains, and to the same prompt."""
    from safetensors.torch import load_file

    from ptune.training import run_training

    from .test_training_loop import _cfg

    saved = {}
    for ckpt in ("false", "true"):
        cfg = _cfg(tiny_models, tiny_csv, "method=ptuning_v2", f"trainer.precision={precision}",
                   f"trainer.gradient_checkpointing={ckpt}", "trainer.max_steps=3", "trainer.eval_every=3")
        res = run_training(cfg, tmp_path / ckpt)
        assert res["autocast"] == ("bfloat16" if precision == "bf16" else "fp32")
        saved[ckpt] = load_file(tmp_path / ckpt / "checkpoint" / "prompt.safetensors")
    assert saved["true"].keys() == saved["false"].keys()
    for k, v in saved["false"].items():
        torch.testing.assert_close(saved["true"][k], v, rtol=TOL[precision], atol=TOL[precision], msg=k)


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
