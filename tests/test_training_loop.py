"""The training loop's promises, each against an independent computation or a scripted evaluation: early stopping,
best-checkpoint selection on macro-F1, gradient accumulation, learning-rate schedules with warmup, precision=auto
turning bf16 autocast on, k-shot training data, the NaN-loss error (and the sweep job it fails), eval overrides.

Runs are in-process on the tiny random BERT (about 2 s each). The loop's helpers (evaluate, collate,
make_optimizer, pick_amp, lr_lambda) are reached through ``run_training``'s own globals, so the tests patch what the
loop really calls wherever those helpers are defined.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ptune.checkpoint import trainable_state
from ptune.config import compose
from ptune.errors import PtuneError
from ptune.training import run_training

from .conftest import write_csv
from .helpers import SENTENCES
from .test_cli import csv_overrides, ptune

LOOP = run_training.__globals__


def _cfg(tiny_models, tiny_csv, *extra: str):
    cfg = compose(
        [
            *csv_overrides(tiny_models, tiny_csv),
            "trainer.precision=fp32",
            "trainer.device=cpu",
            "trainer.save_every=0",
            *extra,
        ]
    )
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    return cfg


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _scripted(monkeypatch, rows: list[tuple[float, float]]) -> list[dict[str, torch.Tensor]]:
    """The loop's dev evaluation returns the scripted (accuracy, macro_f1) rows in turn; returns the trainable
    weights as they were at each evaluation."""
    seen: list[dict[str, torch.Tensor]] = []

    def evaluate(model, *args, **kwargs):
        seen.append({k: v.clone() for k, v in trainable_state(model).items()})  # a copy: on CPU it aliases
        acc, f1 = rows[len(seen) - 1]
        return {"accuracy": acc, "macro_f1": f1, "eval_examples_per_s": 1.0}

    monkeypatch.setitem(LOOP, "evaluate", evaluate)
    return seen


# ------------------------------------------------------------------------------------ early stopping, best checkpoint


def test_early_stopping_after_patience_evals_without_improvement(tiny_models, tiny_csv, tmp_path, monkeypatch):
    # best at 1 and 3 (step 2's bad eval is forgotten at 3); 4 and 5 make two bad evals in a row (5 only ties 3)
    _scripted(monkeypatch, [(0.5, 0), (0.4, 0), (0.6, 0), (0.5, 0), (0.6, 0), (0.9, 0), (0.9, 0), (0.9, 0)])
    common = ("trainer.max_steps=8", "trainer.eval_every=1")
    cfg = _cfg(tiny_models, tiny_csv, *common, "trainer.early_stopping_patience=2")
    res = run_training(cfg, tmp_path / "run")
    assert (res["steps"], res["best_step"], res["best_metric"]) == (5, 3, 0.6)
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]

    _scripted(monkeypatch, [(0.5, 0), (0.4, 0), (0.6, 0), (0.5, 0), (0.6, 0), (0.9, 0), (0.9, 0), (0.9, 0)])
    res = run_training(_cfg(tiny_models, tiny_csv, *common), tmp_path / "off")  # patience 0: no early stopping
    assert (res["steps"], res["best_step"], res["best_metric"]) == (8, 6, 0.9)


def test_best_checkpoint_is_selected_on_macro_f1(tiny_models, tiny_csv, tmp_path, monkeypatch):
    # accuracy peaks at step 1, macro-F1 at step 3
    seen = _scripted(monkeypatch, [(0.9, 0.3), (0.5, 0.2), (0.6, 0.7), (0.8, 0.5)])
    cfg = _cfg(
        tiny_models, tiny_csv, "trainer.metric=macro_f1", "trainer.max_steps=4", "trainer.eval_every=1",
        "trainer.lr=0.05",
    )
    res = run_training(cfg, tmp_path / "run")
    assert (res["metric"], res["best_step"], res["best_metric"]) == ("macro_f1", 3, 0.7)
    assert res["metrics"] == {"accuracy": 0.6, "macro_f1": 0.7}
    saved = load_file(str(tmp_path / "run" / "checkpoint" / "prompt.safetensors"))
    assert saved.keys() == seen[2].keys()
    for key in saved:
        assert torch.equal(saved[key], seen[2][key]), key
    assert any(not torch.equal(saved[k], seen[0][k]) for k in saved), "the weights did not move between evals"
    assert any(not torch.equal(saved[k], seen[3][k]) for k in saved)


# ------------------------------------------------------------------------------------ gradient accumulation


def _recording(monkeypatch) -> dict:
    """Record the loop's training micro-batches, its parameters before the first step, and (via an optimizer
    pre-step hook) the gradients and learning rates of every step."""
    rec: dict = {"batches": [], "grads": [], "lrs": []}
    collate, make_optimizer = LOOP["collate"], LOOP["make_optimizer"]

    def recording_collate(data, idx, *args):
        rec["batches"].append((data, list(idx), args))
        return collate(data, idx, *args)

    def recording_optimizer(task, *args):
        opt = make_optimizer(task, *args)
        rec["task"] = task
        rec["params"] = [p for g in opt.param_groups for p in g["params"]]
        rec["init"] = [p.detach().clone() for p in rec["params"]]

        def hook(optimizer, *_):
            rec["grads"].append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])
            rec["lrs"].append([g["lr"] for g in optimizer.param_groups])

        opt.register_step_pre_hook(hook)
        return opt

    monkeypatch.setitem(LOOP, "collate", recording_collate)
    monkeypatch.setitem(LOOP, "make_optimizer", recording_optimizer)
    return rec


def test_grad_accum_steps_on_the_mean_of_the_micro_batch_gradients(tiny_models, tiny_csv, tmp_path, monkeypatch):
    collate = LOOP["collate"]
    rec = _recording(monkeypatch)
    cfg = _cfg(
        tiny_models, tiny_csv, "template=sst2_head", "template.head_dropout=0.0", "trainer.grad_accum=3",
        "trainer.batch_size=4", "trainer.max_steps=1", "trainer.eval_every=1", "trainer.grad_clip=0",
    )
    run_training(cfg, tmp_path / "run")
    micro = rec["batches"]
    assert len(micro) == 3 and all(len(idx) == 4 for _, idx, _ in micro)
    assert len({tuple(idx) for _, idx, _ in micro}) == 3  # three different draws
    # the reference: plain autograd from the starting weights, one micro-batch at a time
    model, params = rec["task"].model, rec["params"]
    with torch.no_grad():
        for p, p0 in zip(params, rec["init"], strict=True):
            p.copy_(p0)
    model.train()
    ref = [torch.zeros_like(p) for p in params]
    losses = []
    for data, idx, args in micro:
        b = collate(data, idx, *args)
        loss = torch.nn.functional.cross_entropy(
            model(b["input_ids"], b["attention_mask"], b["answer_pos"]).float(), b["labels"]
        )
        losses.append(loss.item())
        for r, g in zip(ref, torch.autograd.grad(loss, params), strict=True):
            r += g / 3
    (got,) = rec["grads"]
    assert len(got) == len(ref) >= 2  # the deep prompt and the head
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-5)
    assert _metrics(tmp_path / "run")[0]["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)


# ------------------------------------------------------------------------------------ learning-rate schedules


def _expected_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak at step ``warmup``, then linear or cosine decay towards 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    done = (step - warmup) / (total - warmup)
    return {"constant": 1.0, "linear": 1 - done, "cosine": (1 + math.cos(math.pi * done)) / 2}[schedule]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule_with_warmup(schedule):
    f = LOOP["lr_lambda"](SimpleNamespace(max_steps=10, warmup_ratio=0.2, schedule=schedule))
    got = [f(s) for s in range(10)]
    assert got == pytest.approx([_expected_factor(schedule, s, 2, 10) for s in range(10)], abs=1e-12)
    assert got[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warmup reaches the peak at step 2
    if schedule == "linear":
        assert got[-1] == pytest.approx(1 / 8)
    no_warmup = LOOP["lr_lambda"](SimpleNamespace(max_steps=10, warmup_ratio=0.0, schedule=schedule))
    assert no_warmup(0) == 1.0


def test_the_loop_steps_with_the_scheduled_lr_of_each_group(tiny_models, tiny_csv, tmp_path, monkeypatch):
    rec = _recording(monkeypatch)
    cfg = _cfg(
        tiny_models, tiny_csv, "template=sst2_head", "trainer.schedule=cosine", "trainer.warmup_ratio=0.25",
        "trainer.max_steps=8", "trainer.eval_every=8", "trainer.lr=0.02", "trainer.head_lr=0.004",
    )
    run_training(cfg, tmp_path / "run")
    expected = [[base * _expected_factor("cosine", s, 2, 8) for base in (0.02, 0.004)] for s in range(8)]
    assert len(rec["lrs"]) == 8
    for got, want in zip(rec["lrs"], expected, strict=True):
        assert got == pytest.approx(want, rel=1e-9)


# ------------------------------------------------------------------------------------ precision=auto


def test_precision_auto_decision(monkeypatch):
    pick_amp = LOOP["pick_amp"]
    cpu = torch.device("cpu")
    monkeypatch.setitem(pick_amp.__globals__, "cpu_has_fast_bf16", lambda: True)
    assert pick_amp("auto", cpu) is torch.bfloat16
    assert pick_amp("fp32", cpu) is None
    monkeypatch.setitem(pick_amp.__globals__, "cpu_has_fast_bf16", lambda: False)
    assert pick_amp("auto", cpu) is None
    assert pick_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(PtuneError, match="fp16 needs CUDA"):
        pick_amp("fp16", cpu)


@pytest.mark.parametrize(
    ("capability", "cpuinfo", "fast"),
    [
        ("AMX", "flags: fpu", True),
        ("AVX512", "flags: fpu avx512f avx512_bf16", True),
        ("AVX2", "flags: fpu avx2 amx_bf16 amx_tile", True),
        ("AVX512", "flags: fpu avx512f avx512bw", False),
        ("AVX2", None, False),  # /proc/cpuinfo unreadable
    ],
)
def test_cpu_bf16_detection(monkeypatch, capability, cpuinfo, fast):
    detect = LOOP["pick_amp"].__globals__["cpu_has_fast_bf16"]

    class FakePath:
        def __init__(self, path):
            assert str(path) == "/proc/cpuinfo"

        def read_text(self, *args, **kwargs):
            if cpuinfo is None:
                raise OSError("unreadable")
            return cpuinfo

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setitem(detect.__globals__, "Path", FakePath)
    assert detect() is fast


@pytest.mark.parametrize("fast", [True, False])
def test_precision_auto_trains_under_bf16_autocast_where_the_cpu_has_it(tiny_models, tiny_csv, tmp_path, monkeypatch,
                                                                         fast):
    monkeypatch.setitem(LOOP["pick_amp"].__globals__, "cpu_has_fast_bf16", lambda: fast)
    train_dtypes: Counter = Counter()

    def hook(module, args, output):
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point():
            train_dtypes[output.dtype] += 1  # outputs of training forwards (evaluation runs without autograd)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        res = run_training(
            _cfg(tiny_models, tiny_csv, "trainer.precision=auto", "trainer.max_steps=2", "trainer.eval_every=2"),
            tmp_path / "run",
        )
    finally:
        handle.remove()
    assert res["autocast"] == ("bfloat16" if fast else "fp32")
    assert train_dtypes  # the hook saw the training forwards
    if fast:  # the frozen matmuls ran in bf16
        assert train_dtypes[torch.bfloat16] >= 4, train_dtypes
    else:
        assert set(train_dtypes) == {torch.float32}, train_dtypes


# ------------------------------------------------------------------------------------ k-shot training data


def test_k_shot_trains_on_k_examples_per_class(tiny_models, tiny_csv, tmp_path, monkeypatch):
    rec = _recording(monkeypatch)
    cfg = _cfg(tiny_models, tiny_csv, "dataset.k_shot=3", "trainer.max_steps=3", "trainer.eval_every=3")
    res = run_training(cfg, tmp_path / "run")
    assert res["train_examples"] == 6 and res["k_shot"] == 3
    data = rec["batches"][0][0]
    assert len(data) == 6 and Counter(data.labels) == {0: 3, 1: 3}
    assert all(i < 6 for _, idx, _ in rec["batches"] for i in idx)
    assert res["eval_examples"] == 12  # the dev split is not touched


# ------------------------------------------------------------------------------------ NaN loss


def test_nan_loss_stops_with_one_line_and_keeps_the_best_checkpoint(tiny_models, tiny_csv, tmp_path):
    # lr 1e30: AdamW's first step moves the prefixes by ~1e30, so step 2's attention overflows to NaN
    cfg = _cfg(tiny_models, tiny_csv, "trainer.lr=1e30", "trainer.max_steps=4", "trainer.eval_every=1")
    with pytest.raises(PtuneError) as exc:
        run_training(cfg, tmp_path / "run")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "loss became nan at step 2" in msg and "lower trainer.lr" in msg and "(step 1) is kept" in msg
    saved = load_file(str(tmp_path / "run" / "checkpoint" / "prompt.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())
    assert not (tmp_path / "run" / "results.json").exists()


def test_sweep_marks_the_nan_job_failed_and_finishes_the_other(tiny_models, tiny_csv, tmp_path):
    sweep = tmp_path / "sweep"
    args = [a for a in csv_overrides(tiny_models, tiny_csv) if not a.startswith(("trainer.eval_every", "trainer.max"))]
    res = ptune(
        "train", "-m", *args, "trainer.max_steps=2", "trainer.eval_every=1", "trainer.precision=fp32",
        "trainer.lr=0.01,1e30", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    assert res.returncode == 1, res.stderr[-3000:]
    assert "1 of 2 jobs failed" in res.stderr
    ok, bad = sweep / "0", sweep / "1"
    assert (ok / "results.json").is_file() and not (ok / "FAILED").exists()
    assert (bad / "FAILED").is_file() and not (bad / "results.json").exists()
    assert "loss became nan at step 2" in (bad / "FAILED").read_text()
    summary = (sweep / "summary.md").read_text()
    assert "1 finished run(s), 1 failed" in summary and "loss became nan" in summary


# ------------------------------------------------------------------------------------ eval overrides


def test_eval_overrides_choose_the_split_and_the_sample_cap(tiny_models, tiny_csv, tmp_path):
    from ptune.evaluate import metrics_from_logits
    from ptune.inference import evaluate_checkpoint, load_task

    from .helpers import batch, logits, make_cfg
    from .test_serving import save_prompt

    cfg = make_cfg(tiny_models["bert"], "soft_prompt", prompt_length=3)
    run = save_prompt(tmp_path, "run", cfg, seed=2)
    test_rows = [(s, ["positive", "negative"][i % 3 == 0]) for i, s in enumerate(SENTENCES + SENTENCES[:1])]
    test = write_csv(tmp_path / "test.csv", test_rows)
    files = [
        f"dataset.dev_file={tiny_csv['dev']}", f"dataset.test_file={test}", "dataset.label_names=[negative,positive]",
    ]

    out = evaluate_checkpoint(run, [*files, "dataset.eval_split=test"])
    assert (out["split"], out["examples"]) == ("test", 7)
    # the reference: the checkpoint's model over the test rows, scored here
    task, _, _, _ = load_task(run)
    _, b = batch(task, [t for t, _ in test_rows])
    labels = [["negative", "positive"].index(lab) for _, lab in test_rows]
    expected = metrics_from_logits(logits(task, b), labels, 2)
    assert out["accuracy"] == pytest.approx(expected["accuracy"]) and out["macro_f1"] == pytest.approx(
        expected["macro_f1"]
    )
    assert json.loads((run / "eval.json").read_text())["split"] == "test"

    capped = evaluate_checkpoint(run, [*files, "dataset.eval_split=test", "dataset.max_eval_samples=3"])
    assert capped["examples"] == 3
    dev = evaluate_checkpoint(run, files)
    assert (dev["split"], dev["examples"]) == ("dev", 12)


# ------------------------------------------------------------------------------------ speed figures, loss read-back


def test_results_report_setup_first_step_warmup_steady_rate_and_peak_memory(tiny_models, tiny_csv, tmp_path):
    res = run_training(_cfg(tiny_models, tiny_csv, "trainer.max_steps=20", "trainer.eval_every=20"), tmp_path / "r")
    assert res == json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["warmup_steps"] == 2  # the first tenth of the run
    assert 0 < res["first_step_s"] <= res["warmup_s"] and res["setup_s"] > 0
    for key in ("steady_train_examples_per_s", "train_examples_per_s", "peak_memory_bytes"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert res["peak_memory_kind"] == "cpu_peak_rss" and res["peak_memory_bytes"] > 50 * 2**20


def test_steady_rate_is_the_second_half_of_the_run():
    from ptune.resume import LoopState

    loop = LoopState()
    for step in range(1, 21):  # batch 8; steps 1-10 take 1 s each (warming up), steps 11-20 0.1 s each
        loop.step, loop.train_examples = step, 8 * step
        loop.train_time += 1.0 if step <= 10 else 0.1
        LOOP["mark_speed"](loop, 20)
    assert (loop.first_step_s, loop.warmup_s) == (1.0, 2.0)
    assert LOOP["steady_rate"](loop) == pytest.approx(80 / 1.0)  # not the whole run's 160 / 11 s
    assert LOOP["warmup_steps"](20) == 2 and LOOP["warmup_steps"](5) == 1


def test_cuda_reads_losses_back_only_where_they_are_used():
    from ptune.config import TrainerConfig

    def read_steps(device: str, **tr) -> list[int]:
        run = SimpleNamespace(device=torch.device(device), tr=TrainerConfig(**tr))
        return [s for s in range(1, 101) if LOOP["must_read_back"](run, s)]

    tr = {"max_steps": 100, "log_every": 20, "eval_every": 50, "save_every": 30}
    assert read_steps("cuda", **tr) == [1, 10, 20, 30, 40, 50, 60, 80, 90, 100]  # logs, evals, saves, speed marks
    assert read_steps("cpu", **tr) == list(range(1, 101))  # a CPU computes synchronously: nothing to gain


def _deferred_read_back(monkeypatch, every: int) -> list[int]:
    """Read the losses back every ``every`` steps only (and at the last step), as on CUDA, here on the CPU.
    Returns the number of losses each read-back brought."""
    reads, read_back = [], LOOP["read_back_losses"]

    def counted(run):
        reads.append(len(run.pending))
        return read_back(run)

    monkeypatch.setitem(LOOP, "must_read_back", lambda run, step: step % every == 0 or step == run.tr.max_steps)
    monkeypatch.setitem(LOOP, "read_back_losses", counted)
    return reads


def test_deferred_read_back_logs_every_step_loss_unchanged(tiny_models, tiny_csv, tmp_path, monkeypatch):
    common = ("trainer.max_steps=7", "trainer.eval_every=7", "trainer.loggers=[csv]")
    run_training(_cfg(tiny_models, tiny_csv, *common), tmp_path / "each")
    reads = _deferred_read_back(monkeypatch, 3)
    run_training(_cfg(tiny_models, tiny_csv, *common), tmp_path / "deferred")
    assert reads == [3, 3, 1]  # steps 1-3, 4-6 and 7, each in one device-to-host copy
    each, deferred = ((tmp_path / d / "train_log.csv").read_text() for d in ("each", "deferred"))
    assert each == deferred and len(each.splitlines()) == 8  # header + one row per step, same losses


def test_deferred_read_back_still_reports_the_nan_step_and_saves_nothing(tiny_models, tiny_csv, tmp_path, monkeypatch):
    _deferred_read_back(monkeypatch, 4)  # NaN at step 2 (lr 1e30), read back at step 4, before its evaluation
    cfg = _cfg(tiny_models, tiny_csv, "trainer.lr=1e30", "trainer.max_steps=8", "trainer.eval_every=4")
    with pytest.raises(PtuneError) as exc:
        run_training(cfg, tmp_path / "run")
    assert "loss became nan at step 2" in str(exc.value) and "no checkpoint had been saved yet" in str(exc.value)
    assert not (tmp_path / "run" / "checkpoint").exists()


# ------------------------------------------------------------------------------------ class weights


def _imbalanced_csv(tmp_path: Path, positives: int) -> Path:
    negatives = [(s, "negative") for s in (SENTENCES * 3)[: 18 - positives]]
    return write_csv(tmp_path / "imbalanced.csv", negatives + [(s, "positive") for s in SENTENCES[:positives]])


def test_balanced_class_weights_weigh_the_loss_by_inverse_class_frequency(tiny_models, tiny_csv, tmp_path, monkeypatch):
    rec = _recording(monkeypatch)
    train = _imbalanced_csv(tmp_path, positives=3)  # 15 negative, 3 positive: weights 18/30 and 18/6
    cfg = _cfg(
        tiny_models, tiny_csv, f"dataset.train_file={train}", "trainer.class_weights=balanced",
        "trainer.batch_size=18", "trainer.max_steps=1", "trainer.eval_every=1", "trainer.grad_clip=0",
    )
    run_training(cfg, tmp_path / "run")
    ((data, idx, args),) = rec["batches"]
    model, params = rec["task"].model, rec["params"]
    with torch.no_grad():
        for p, p0 in zip(params, rec["init"], strict=True):
            p.copy_(p0)
        b = LOOP["collate"](data, idx, *args)
        nll = torch.nn.functional.cross_entropy(
            model(b["input_ids"], b["attention_mask"], b["answer_pos"]).float(), b["labels"], reduction="none"
        )
    weight = torch.where(b["labels"] == 1, 18 / 6, 18 / 30)
    assert Counter(b["labels"].tolist()) == {0: 15, 1: 3}
    expected = float((weight * nll).sum() / weight.sum())
    assert abs(expected - float(nll.mean())) > 1e-3  # the weighting changes this batch's loss
    assert _metrics(tmp_path / "run")[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_class_weights_refuse_a_class_without_training_examples_and_a_bad_value(tiny_models, tiny_csv, tmp_path):
    only_negative = _imbalanced_csv(tmp_path, positives=0)
    cfg = _cfg(tiny_models, tiny_csv, f"dataset.train_file={only_negative}", "trainer.class_weights=balanced")
    with pytest.raises(PtuneError, match="class 'positive' has no training example") as exc:
        run_training(cfg, tmp_path / "run")
    assert "\n" not in str(exc.value) and not (tmp_path / "run" / "results.json").exists()
    r = ptune("train", *csv_overrides(tiny_models, tiny_csv), "trainer.class_weights=inverse", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "trainer.class_weights='inverse' is not valid: use one of none, balanced" in r.stderr
