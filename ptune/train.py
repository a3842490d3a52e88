"""The training loop: explicit and short (nanoGPT style). AdamW on the prompt (and head) only, warmup then
linear/cosine decay, gradient clipping and accumulation, periodic evaluation, best-checkpoint keeping and
early stopping. CUDA with autocast when present; on CPU, bf16 autocast where the processor has it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import calibration, distributed, resume
from .batching import collate, train_batches
from .build import Task, build_task, encode
from .checkpoint import atomic_write_json, atomic_write_text, load_trainable_state, save_checkpoint
from .checkpoint import read_checkpoint as read_ckpt
from .data import Split, k_shot, load_split
from .errors import PtuneError
from .evaluate import autocast, evaluate
from .frozen import prepare_frozen_backbone
from .resume import LoopState


@dataclass
class TrainerConfig:
    max_steps: int = 300
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-2
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 100
    early_stopping_patience: int = 0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_threads: int = 0
    bucketed: bool = True
    log_every: int = 20
    metric: str = "accuracy"
    tensorboard: bool = False  # log loss, lr and dev metrics under <run folder>/tensorboard
    save_every: int = 100  # resumable state every N steps (0: never)
    resume: bool = False  # continue from the run folder's resumable state, if any
    compile: bool = False  # torch.compile the backbone body (dynamic shapes); pays off on long runs only
    cast_frozen_weights: bool = True  # under bf16/fp16 autocast, keep frozen Linear weights in that dtype
    fuse_projections: bool = True  # one matmul for frozen q/k/v (and gate/up) projections of the same input
    attention_kernel: str = "auto"  # SDPA kernel for training steps: auto | default | math

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "eval_batch_size", "grad_accum", "eval_every", "log_every"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise PtuneError(f"trainer.{key}={v!r} must be an integer > 0")
        for key in ("lr", "head_lr"):
            v = getattr(self, key)
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise PtuneError(f"trainer.{key}={v!r} must be a number > 0")
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise PtuneError(f"trainer.save_every={self.save_every!r} must be an integer >= 0 (0: never)")
        if not 0 <= self.warmup_ratio < 1:
            raise PtuneError(f"trainer.warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        if (
            self.weight_decay < 0
            or self.grad_clip < 0
            or self.early_stopping_patience < 0
            or self.num_threads < 0
        ):
            raise PtuneError(
                "trainer.weight_decay, grad_clip, early_stopping_patience and num_threads must be >= 0"
            )
        choices = {
            "schedule": ("linear", "cosine", "constant"),
            "device": ("auto", "cpu", "cuda"),
            "precision": ("auto", "fp32", "bf16", "fp16"),
            "metric": ("accuracy", "macro_f1"),
            "tensorboard": (True, False),
            "resume": (True, False),
            "compile": (True, False),
            "cast_frozen_weights": (True, False),
            "fuse_projections": (True, False),
            "attention_kernel": ("auto", "default", "math"),
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise PtuneError(
                    f"trainer.{key}={getattr(self, key)!r} is not valid: use one of "
                    + ", ".join(str(v).lower() if isinstance(v, bool) else v for v in valid)
                )


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    raw = OmegaConf.to_container(cfg.trainer, resolve=True)
    known = set(TrainerConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PtuneError(f"trainer.{unknown[0]} is not a trainer option: valid are {sorted(known)}")
    return TrainerConfig(**raw)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PtuneError(
            "trainer.device=cuda but no CUDA device is available: use trainer.device=auto or cpu"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    if "AMX" in cap.upper():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_amp(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. fp16 autocast needs a GradScaler and is CUDA-only."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise PtuneError("trainer.precision=fp16 needs CUDA: use bf16 or fp32 on CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask: a container or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def configure_threads(requested: int, local_world_size: int = 1) -> int:
    """Intra-op threads: ``trainer.num_threads``, else every allowed core shared among the ranks on this machine.

    One inter-op thread: the loop runs no independent ops side by side, and a pool per rank would only
    oversubscribe the cores. PyTorch allows setting it once, before any inter-op work, so later calls keep it.
    """
    n = requested or max(1, cpu_cores() // max(1, local_world_size))
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return n


MATH_ATTENTION_MAX_LEN = 256


def attention_kernel(kind: str, device: torch.device, amp: torch.dtype | None, width: int):
    """The SDPA kernel for one training forward. ``auto``: the math kernel for bf16/fp16 on CPU up to
    MATH_ATTENTION_MAX_LEN tokens (PyTorch's CPU flash kernel computes its bf16 backward 3-5x slower than the math
    path on short sequences; the math path keeps the full attention matrix, hence the length cap)."""
    if kind == "auto":
        short = width <= MATH_ATTENTION_MAX_LEN
        kind = "math" if device.type == "cpu" and amp is not None and short else "default"
    if kind == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def compile_backbone(model) -> None:
    """torch.compile (in place, so state-dict names stay) the part of the backbone the forward calls."""
    target = model.backbone if model.family == "seq2seq" else model._body
    target.compile(dynamic=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def subsample(split: Split, n: int | None, seed: int) -> Split:
    if n is None or n <= 0 or n >= len(split.labels):
        return split
    idx = sorted(random.Random(seed).sample(range(len(split.labels)), n))
    return Split(
        [split.examples[i] for i in idx], [split.labels[i] for i in idx], split.label_names, split.source
    )


def load_data(cfg: DictConfig, seed: int) -> tuple[Split, Split]:
    root = cfg.data.get("root")
    ds = cfg.dataset
    train = load_split(ds, "train", root)
    dev = load_split(ds, str(ds.get("eval_split", "dev")), root)
    if ds.get("k_shot"):
        train = k_shot(train, int(ds.k_shot), seed)
    train = subsample(train, ds.get("max_train_samples"), seed)
    dev = subsample(dev, ds.get("max_eval_samples"), 0)
    return train, dev


def lr_lambda(tr: TrainerConfig):
    warmup = int(tr.warmup_ratio * tr.max_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if tr.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, tr.max_steps - warmup)
        if tr.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1 - progress)

    return f


def make_optimizer(task: Task, tr: TrainerConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = [
        {"params": [p for p in task.model.tuner.parameters() if p.requires_grad], "lr": tr.lr},
        {"params": [p for p in task.model.readout.parameters() if p.requires_grad], "lr": tr.head_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise PtuneError("nothing to train: the method has no parameters (prompt_length 0) and no head")
    fused = device.type == "cuda" or hasattr(torch.optim.AdamW, "_fused")
    try:
        return torch.optim.AdamW(groups, weight_decay=tr.weight_decay, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, weight_decay=tr.weight_decay)


def checkpoint_meta(task: Task, cfg: DictConfig) -> dict:
    return {
        "backbone": task.backbone.identity,
        "family": task.backbone.family,
        "label_names": task.label_names,
        "method": task.method.name,
        "num_soft_tokens": task.renderer.num_soft,
        "template": task.renderer.template.source,
    }


class Reporter:
    """A rich progress bar on a terminal; periodic plain lines otherwise (CI logs, files)."""

    def __init__(self, total: int, enabled: bool):
        self.live = enabled and sys.stderr.isatty()
        self.progress = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total, info="")
            self.progress.start()

    def update(self, step: int, info: str, log: bool) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif log:
            print(f"step {step}: {info}", flush=True)

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class SilentReporter(Reporter):
    """Ranks other than 0 of a distributed run: rank 0 reports for all."""

    def __init__(self) -> None:
        self.live, self.progress = False, None

    def update(self, step: int, info: str, log: bool) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def tensorboard_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PtuneError("trainer.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def run_training(cfg: DictConfig, out_dir: Path) -> dict:
    tr = trainer_config(cfg)
    d = distributed.init()  # a single process unless torchrun set WORLD_SIZE > 1
    seed_everything(tr.seed)
    configure_threads(tr.num_threads, d.local_world_size)
    device = pick_device(tr.device)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    amp = pick_amp(tr.precision, device)
    start = time.perf_counter()
    train_split, dev_split = load_data(cfg, tr.seed)
    task = build_task(cfg, train_split.label_names, tr.seed)
    model = task.model.to(device)
    train_data = encode(task, train_split.examples, train_split.labels)
    dev_data = encode(task, dev_split.examples, dev_split.labels)
    num_classes = len(task.label_names)
    opt = make_optimizer(task, tr, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tr))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    params = [p for g in opt.param_groups for p in g["params"]]
    trainable = sum(p.numel() for p in params)
    total = trainable + sum(p.numel() for p in task.backbone.model.parameters())
    if d.enabled:
        distributed.broadcast_params(params)
    # Compiled code would not see the fused projections' bookkeeping: fuse only in eager mode.
    fuse = tr.fuse_projections and not tr.compile
    prepare_frozen_backbone(task.backbone.model, amp, tr.cast_frozen_weights, fuse)
    if tr.compile:
        compile_backbone(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoint"
    meta = checkpoint_meta(task, cfg)
    rng = random.Random(tr.seed)
    lengths = [len(x) for x in train_data.input_ids]
    loop = LoopState()
    if tr.resume and resume.has_state(out_dir):
        loop = resume.load_state(out_dir, model, opt, sched, scaler, rng)
    reporter = Reporter(tr.max_steps, enabled=True) if d.is_main else SilentReporter()
    tb = tensorboard_writer(out_dir) if tr.tensorboard and d.is_main else None
    reporter.message(
        f"training {task.method.name} on {cfg.backbone.name} ({task.backbone.family}), "
        f"{trainable:,} trainable of {total:,} params; {len(train_data)} train / {len(dev_data)} eval examples; "
        f"device {device}, autocast {amp}" + (f", {d.world_size} ranks" if d.enabled else "")
    )
    if loop.step:
        reporter.message(f"resuming from step {loop.step}")
    model.train()
    history = loop.history
    step = loop.step
    try:
        while loop.step < tr.max_steps:
            t0 = time.perf_counter()
            loss_sum, n_ex = 0.0, 0
            for _ in range(tr.grad_accum):
                if not loop.batches:
                    loop.batches = train_batches(lengths, tr.batch_size, rng, tr.bucketed)
                idx = loop.batches.pop()
                n_ex += len(idx)
                share = 1.0
                if d.enabled:  # this rank's slice of the global batch, weighted by its share of the examples
                    local = distributed.shard(idx, d.rank, d.world_size)
                    share, idx = len(local) / len(idx), local
                    if not idx:
                        continue
                b = collate(train_data, idx, model.pad_id, task.left_pad)
                kernel = attention_kernel(tr.attention_kernel, device, amp, b["input_ids"].shape[1])
                with autocast(device, amp), kernel:
                    logits = model(
                        b["input_ids"].to(device), b["attention_mask"].to(device), b["answer_pos"].to(device)
                    )
                loss = torch.nn.functional.cross_entropy(logits.float(), b["labels"].to(device))
                if not d.enabled and not torch.isfinite(loss):
                    raise PtuneError(
                        f"loss became {loss.item()} at step {loop.step + 1}: lower trainer.lr (now {tr.lr}); "
                        "the last good checkpoint is kept"
                    )
                scaler.scale(loss / tr.grad_accum if share == 1.0 else loss * share / tr.grad_accum).backward()
                loss_sum += loss.item() * share / tr.grad_accum
            if d.enabled:
                loss_sum = distributed.all_reduce_grads(params, loss_sum)
                if not math.isfinite(loss_sum):
                    raise PtuneError(
                        f"loss became {loss_sum} at step {loop.step + 1}: lower trainer.lr (now {tr.lr}); "
                        "the last good checkpoint is kept"
                    )
            if tr.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            loop.step += 1
            step = loop.step
            loop.train_time += time.perf_counter() - t0
            loop.train_examples += n_ex
            reporter.update(
                step,
                f"loss {loss_sum:.4f} lr {sched.get_last_lr()[0]:.2e} {loop.train_examples / loop.train_time:.1f} ex/s",
                log=step % tr.log_every == 0,
            )
            if tb is not None:
                tb.add_scalar("train/loss", loss_sum, step)
                tb.add_scalar("train/lr", sched.get_last_lr()[0], step)
            if (step % tr.eval_every == 0 or step == tr.max_steps) and not d.is_main:
                if distributed.broadcast_flag(False, device):  # rank 0 evaluates and decides
                    break
            elif step % tr.eval_every == 0 or step == tr.max_steps:
                if cfg.template.get("calibrate"):  # before the eval that decides the save: both see this offset
                    calibration.calibrate(task, device, amp)
                res = evaluate(model, dev_data, tr.eval_batch_size, device, amp, task.left_pad, num_classes)
                row = {"step": step, "loss": loss_sum, **res}
                history.append(row)
                if tb is not None:
                    for key in ("accuracy", "macro_f1"):
                        tb.add_scalar(f"dev/{key}", res[key], step)
                atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
                reporter.message(
                    f"eval step {step}: accuracy {res['accuracy']:.4f} macro_f1 {res['macro_f1']:.4f}"
                )
                stop = False
                if res[tr.metric] > loop.best:
                    loop.best, loop.best_step, loop.bad_evals = res[tr.metric], step, 0
                    loop.ckpt_bytes = save_checkpoint(ckpt_dir, model, cfg, meta)
                else:
                    loop.bad_evals += 1
                    stop = bool(tr.early_stopping_patience and loop.bad_evals >= tr.early_stopping_patience)
                if cfg.template.get("calibrate"):
                    calibration.reset(task)  # the prompt trains on raw scores; the next eval recalibrates
                if d.enabled:
                    distributed.broadcast_flag(stop, device)
                if stop:
                    reporter.message(f"early stopping at step {step}: no improvement in {loop.bad_evals} evals")
                    break
            if tr.save_every and step % tr.save_every == 0 and step < tr.max_steps and d.is_main:
                resume.save_state(out_dir, model, opt, sched, scaler, rng, loop)
    finally:
        reporter.close()
        if tb is not None:
            tb.close()
    if not d.is_main:
        return distributed.broadcast_object(None)  # rank 0's results
    best_row = max(history, key=lambda h: h[tr.metric])
    final = best_row
    if task.method.name in ("ptuning_v1", "prefix"):
        # Their checkpoint holds the folded reparameterisation: report what `ptune eval` will reproduce.
        _, _, state = read_ckpt(ckpt_dir)
        load_trainable_state(model, state)
        final = evaluate(model, dev_data, tr.eval_batch_size, device, amp, task.left_pad, num_classes)
    results = {
        "best_metric": final[tr.metric],
        "metric": tr.metric,
        "best_step": loop.best_step,
        "metrics": {"accuracy": final["accuracy"], "macro_f1": final["macro_f1"]},
        "steps": loop.step,
        "trainable_params": trainable,
        "total_params": total,
        "checkpoint_bytes": loop.ckpt_bytes,
        "train_examples": len(train_data),
        "eval_examples": len(dev_data),
        "k_shot": cfg.dataset.get("k_shot"),
        "train_examples_per_s": loop.train_examples / max(loop.train_time, 1e-9),
        "eval_examples_per_s": final["eval_examples_per_s"],
        "wall_s": time.perf_counter() - start,
        "device": str(device),
        "autocast": str(amp).replace("torch.", "") if amp else "fp32",
        "method": task.method.name,
        "backbone": str(cfg.backbone.name),
        "dataset": str(cfg.dataset.name),
    }
    if d.enabled:
        results["world_size"] = d.world_size
    atomic_write_json(out_dir / "results.json", results)
    resume.clear_state(out_dir)  # finished: a later resume=true has nothing left to redo
    if d.enabled:
        distributed.broadcast_object(results)
    return results
