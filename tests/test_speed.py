"""Training-speed options keep the numbers: frozen weights cast once, per-site prefix views, batched collate,
the CPU attention-kernel choice, thread settings and the optional torch.compile."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ptune.batching import Encoded, collate
from ptune.config import compose
from ptune.efficiency.frozen import cast_frozen_linears
from ptune.runtime import attention_kernel, compile_backbone, configure_threads, cpu_cores
from ptune.training import run_training
from ptune.tuners.base import split_sites

from .helpers import batch, make_cfg, make_task
from .test_cli import csv_overrides


@pytest.mark.parametrize(
    "kind,method,family",
    [("bert", "ptuning_v2", "mlm"), ("llama", "soft_prompt", "causal"), ("t5", "prefix", "seq2seq")],
)
def test_cast_frozen_linears_gives_the_same_autocast_logits(tiny_models, kind, method, family):
    task = make_task(make_cfg(tiny_models[kind], method, family=family))
    _, b = batch(task)
    model = task.model.eval()

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(b["input_ids"], b["attention_mask"], b["answer_pos"]).float()

    before = run()
    assert cast_frozen_linears(task.backbone.model, torch.bfloat16) > 0
    torch.testing.assert_close(run(), before, atol=0, rtol=0)
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    assert task.backbone.model.get_input_embeddings().weight.dtype == torch.float32


def test_cast_frozen_linears_leaves_tied_heads(tiny_models):
    task = make_task(make_cfg(tiny_models["bert"], "soft_prompt"))
    head = task.backbone.model.get_output_embeddings()
    assert head.weight is task.backbone.model.get_input_embeddings().weight  # tied in the tiny BERT
    cast_frozen_linears(task.backbone.model, torch.bfloat16)
    assert head.weight.dtype == torch.float32


def _indexed_sites(prefix):  # the previous implementation
    return [(prefix[i, 0].unsqueeze(0), prefix[i, 1].unsqueeze(0)) for i in range(prefix.shape[0])]


def test_split_sites_matches_indexing_and_casts_once_under_autocast():
    prefix = torch.randn(3, 2, 4, 5, 8, requires_grad=True)
    weights = torch.randn(3, 2, 1, 4, 5, 8)
    grads = []
    for fn in (split_sites, _indexed_sites):
        sites = fn(prefix)
        for (k, v), (rk, rv) in zip(sites, _indexed_sites(prefix.detach()), strict=True):
            assert k.shape == rk.shape == (1, 4, 5, 8) and torch.equal(k, rk) and torch.equal(v, rv)
        loss = sum((k * weights[i, 0]).sum() + (v * weights[i, 1]).sum() for i, (k, v) in enumerate(sites))
        (g,) = torch.autograd.grad(loss, prefix)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k, v = split_sites(prefix)[0]
    assert k.dtype == v.dtype == torch.bfloat16 and torch.equal(k, prefix[0, 0:1].detach().to(torch.bfloat16))


def _per_row_collate(data, idx, pad_id, left_pad):  # the previous implementation
    rows = [data.input_ids[i] for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    answer = torch.zeros(len(rows), dtype=torch.long)
    for j, (i, r) in enumerate(zip(idx, rows, strict=True)):
        off = width - len(r) if left_pad else 0
        ids[j, off : off + len(r)] = torch.tensor(r)
        mask[j, off : off + len(r)] = 1
        answer[j] = max(data.answer_pos[i], 0) + off
    labels = torch.tensor([data.labels[i] for i in idx], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "answer_pos": answer, "labels": labels}


@pytest.mark.parametrize("left_pad", [False, True])
def test_collate_matches_per_row_padding(left_pad):
    rng = random.Random(0)
    rows = [[rng.randrange(-100, 1000) for _ in range(rng.randrange(1, 30))] for _ in range(60)]
    data = Encoded(rows, [rng.randrange(-1, len(r)) for r in rows], [rng.randrange(3) for _ in rows])
    for _ in range(30):
        idx = rng.sample(range(60), rng.randrange(1, 20))
        got, want = collate(data, idx, 7, left_pad), _per_row_collate(data, idx, 7, left_pad)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_attention_kernel_choice():
    cpu = torch.device("cpu")
    assert torch.backends.cuda.flash_sdp_enabled()
    with attention_kernel("auto", cpu, torch.bfloat16, 40):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    for kind, amp, width in (("auto", None, 40), ("auto", torch.bfloat16, 1000), ("default", torch.bfloat16, 40)):
        with attention_kernel(kind, cpu, amp, width):
            assert torch.backends.cuda.flash_sdp_enabled()
    with attention_kernel("math", cpu, None, 40):
        assert not torch.backends.cuda.flash_sdp_enabled()


def test_configure_threads():
    before = torch.get_num_threads()
    try:
        assert configure_threads(0) == cpu_cores() == torch.get_num_threads()
        assert configure_threads(0, local_world_size=cpu_cores() * 2) == 1
        assert configure_threads(3, local_world_size=2) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_compile_backbone_compiles_the_called_module(tiny_models, monkeypatch):
    calls = []
    for kind, method, family in (("bert", "ptuning_v2", "mlm"), ("t5", "soft_prompt", "seq2seq")):
        task = make_task(make_cfg(tiny_models[kind], method, family=family))
        expected = task.model.backbone if family == "seq2seq" else task.model.body
        monkeypatch.setattr(type(expected), "compile", lambda self, **kw: calls.append((self, kw)), raising=False)
        compile_backbone(task.model)
        assert calls[-1] == (expected, {"dynamic": True})


def _train(tiny_models, tiny_csv, out, extra):
    overrides = [*csv_overrides(tiny_models, tiny_csv), "trainer.precision=bf16", "trainer.eval_every=4", *extra]
    cfg = compose(overrides)
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    run_training(cfg, out)
    return load_file(str(out / "checkpoint" / "prompt.safetensors"))


def test_cast_frozen_weights_trains_the_same_prompt(tiny_models, tiny_csv, tmp_path):
    a = _train(tiny_models, tiny_csv, tmp_path / "cast", ["trainer.cast_frozen_weights=true"])
    b = _train(tiny_models, tiny_csv, tmp_path / "plain", ["trainer.cast_frozen_weights=false"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


@pytest.mark.slow
def test_compile_true_trains(tiny_models, tiny_csv, tmp_path):
    state = _train(tiny_models, tiny_csv, tmp_path / "compiled", ["trainer.compile=true", "trainer.max_steps=2"])
    assert all(torch.isfinite(v).all() for v in state.values())


def test_batch_width_rounds_up_within_the_longest_row():
    from ptune.batching import batch_width

    assert [batch_width(w, 8, 100) for w in (1, 5, 8, 9, 17)] == [8, 8, 8, 16, 24]
    assert batch_width(9, 8, 12) == 12  # never wider than the data set's longest row (positions)
    assert batch_width(13, 8, 12) == 13 and batch_width(13, 1, 12) == 13  # never narrower than the batch


@pytest.mark.parametrize("left_pad", [False, True])
def test_rounded_collate_only_adds_padding(left_pad):
    rows = [[5, 6, 7], [8, 9], list(range(1, 31))]
    plain = Encoded(rows, [2, 1, 29], [0, 1, 0])
    rounded = Encoded(rows, [2, 1, 29], [0, 1, 0], width_multiple=8)
    a, b = collate(plain, [0, 1], 0, left_pad), collate(rounded, [0, 1], 0, left_pad)
    assert a["input_ids"].shape[1] == 3 and b["input_ids"].shape[1] == 8
    cut = slice(5, None) if left_pad else slice(0, 3)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(b[key][:, cut], a[key]) and int(b[key].sum()) == int(a[key].sum())
    assert torch.equal(b["answer_pos"], a["answer_pos"] + (5 if left_pad else 0)) and torch.equal(
        b["labels"], a["labels"]
    )
