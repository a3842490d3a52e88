"""The training loop: explicit and short (nanoGPT style). AdamW on the prompt (and head) only, warmup then
linear/cosine decay, gradient clipping and accumulation, periodic evaluation, best-checkpoint keeping and
early stopping. ``run_training`` reads top to bottom; each step it takes is one function below it.

Where it runs (device, precision, threads, kernels) is ptune/runtime.py; which examples it sees is
ptune/data/selection.py; the run folder's lock and resume state are ptune/runfolder.py and ptune/resume.py.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import calibration, distributed, resume, runfolder, tracking
from .atomic import atomic_write_json, atomic_write_text
from .batching import Encoded, collate, train_batches
from .build import Task, build_task, encode
from .checkpoint import load_trainable_state, read_checkpoint, save_checkpoint
from .config import TrainerConfig, trainer_config
from .data import load_train_dev
from .efficiency.frozen import prepare_frozen_backbone
from .efficiency.memory import apply_memory_features, check_combination
from .errors import PtuneError
from .evaluate import evaluate
from .metrics import plot_confusion
from .progress import Reporter, SilentReporter
from .resume import LoopState
from .runtime import (
    attention_kernel,
    autocast,
    compile_backbone,
    configure_threads,
    peak_memory,
    pick_amp,
    pick_device,
    seed_everything,
    settle_backbone_dtype,
)

# Called on rank 0 after each evaluation with (step, value of trainer.metric, training examples seen so far, whether
# it is the run's last evaluation); returning True stops the run there, as early stopping does (``ptune search``
# prunes trials through it). At the last evaluation the run ends anyway: the hook is told so that it can record the
# value without stopping what has already finished.
EvalHook = Callable[[int, float, int, bool], bool]


def run_training(cfg: DictConfig, out_dir: Path, on_eval: EvalHook | None = None) -> dict:
    """Train one prompt into ``out_dir``; returns (and writes) results.json's content. ``on_eval`` may stop the
    run after any evaluation (see ``EvalHook``): the best checkpoint so far and results.json are written as usual."""
    tr = trainer_config(cfg)
    d = distributed.init()  # a single process unless torchrun set WORLD_SIZE > 1
    start = time.perf_counter()
    changed = claim_run_folder(cfg, tr, d, out_dir)
    run = prepare(cfg, tr, d, out_dir)
    run.on_eval = on_eval
    loop = LoopState()
    if changed is not None:
        loop = resume.load_state(out_dir, run.model, run.opt, run.sched, run.scaler, run.rng)
    run.announce(loop, changed)
    run.model.train()
    run.setup_s = time.perf_counter() - start
    try:
        while loop.step < tr.max_steps:
            loss = train_step(run, loop)
            if loop.step % tr.eval_every == 0 or loop.step == tr.max_steps:
                if evaluate_and_keep_best(run, loop, loss):
                    break
            if tr.save_every and loop.step % tr.save_every == 0 and loop.step < tr.max_steps and d.is_main:
                run.tracker.flush()  # the logs hold every step the resume state holds (a kill loses neither)
                resume.save_state(out_dir, run.model, run.opt, run.sched, run.scaler, run.rng, loop, cfg)
    finally:
        run.close()
    if not d.is_main:
        if run.sharded and run.task.model.tuner.folds_at_save:
            follow_evaluation(run)  # rank 0's final evaluation of the folded checkpoint (see finish)
        return distributed.broadcast_object(None)  # rank 0's results
    results = finish(run, loop, time.perf_counter() - start)
    if d.enabled:
        distributed.broadcast_object(results)
    return results


def claim_run_folder(cfg: DictConfig, tr: TrainerConfig, d: distributed.Dist, out_dir: Path) -> list[str] | None:
    """Lock the run folder (rank 0) and decide whether this run resumes. Returns None for a fresh start, else the
    settings that changed and take effect (a finished run, or other changed settings, are refused)."""
    if d.is_main:
        runfolder.acquire(out_dir)  # one writer per run folder; sweeps what killed saves left behind
    if not tr.resume:
        return None
    if not resume.has_state(out_dir):
        if (out_dir / "results.json").is_file():
            raise PtuneError(f"run {str(out_dir)!r} is finished (results.json): nothing to resume, nothing changed")
        return None
    return resume.check_same_config(out_dir, cfg)


@dataclass
class Run:
    """Everything one training run works with, built once by ``prepare``."""

    cfg: DictConfig
    tr: TrainerConfig
    d: distributed.Dist
    out_dir: Path
    device: torch.device
    amp: torch.dtype | None
    task: Task
    train_data: Encoded
    dev_data: Encoded
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    reporter: Reporter
    tracker: object = field(default_factory=tracking.NullTracker)  # trainer.loggers and curves.png
    rng: random.Random = field(default_factory=random.Random)
    class_weight: torch.Tensor | None = None  # trainer.class_weights, on the device (None: unweighted)
    lengths: list[int] = field(default_factory=list)
    # Losses stay on the device until read back together (see read_back_losses): (step, loss, lr) per step.
    pending: list[tuple[int, torch.Tensor, float]] = field(default_factory=list)
    last_loss: float = float("nan")
    setup_s: float = 0.0  # run start to the first step: loading, tokenising, preparing the backbone
    weights: str = ""  # how backbone.dtype was settled (runtime.settle_backbone_dtype), for the first line
    on_eval: EvalHook | None = None  # run_training's hook, asked after each evaluation whether to stop

    @property
    def model(self):
        return self.task.model

    @property
    def sharded(self) -> bool:
        """The backbone's blocks are FSDP2-sharded over the ranks: every rank must run every forward of it."""
        return self.tr.shard_backbone and self.d.enabled

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def announce(self, loop: LoopState, changed: list[str] | None) -> None:
        trainable = sum(p.numel() for p in self.params)
        total = trainable + sum(p.numel() for p in self.task.backbone.model.parameters())
        autocast_name = str(self.amp).removeprefix("torch.") if self.amp else "none (fp32)"
        self.reporter.message(f"precision: {self.weights}; autocast {autocast_name} "
                              f"(trainer.precision={self.tr.precision})")
        self.reporter.message(
            f"training {self.task.method.name} on {self.cfg.backbone.name} ({self.task.backbone.family}), "
            f"{trainable:,} trainable of {total:,} params; {len(self.train_data)} train / {len(self.dev_data)} "
            f"eval examples; device {self.device}, autocast {self.amp}"
            + (f", {self.d.world_size} ranks" if self.d.enabled else "")
        )
        if loop.step:
            self.reporter.message(
                f"resuming from step {loop.step}" + (f"; changed: {', '.join(changed)}" if changed else "")
            )

    def close(self) -> None:
        self.reporter.close()
        self.tracker.close(failed=sys.exc_info()[0] is not None)  # called from run_training's `finally`


def prepare(cfg: DictConfig, tr: TrainerConfig, d: distributed.Dist, out_dir: Path) -> Run:
    """Seeds, threads, device and precision; data; the task (backbone + method + readout); the optimizer."""
    seed_everything(tr.seed)
    configure_threads(tr.num_threads, d.local_world_size)
    device = pick_device(tr.device)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    amp = pick_amp(tr.precision, device)
    weights = settle_backbone_dtype(cfg, device)  # before the task is built and the config saved with it
    check_combination(tr, str(cfg.backbone.get("quantize", "none")), d.world_size)
    train_split, dev_split = load_train_dev(cfg, tr.seed)
    task = build_task(cfg, train_split.label_names, tr.seed)
    task.model.to(device)
    train_data = encode(task, train_split.examples, train_split.labels)
    dev_data = encode(task, dev_split.examples, dev_split.labels)
    train_data.width_multiple = dev_data.width_multiple = tr.pad_to_multiple_of
    opt = make_optimizer(task, tr, device)
    if d.enabled:
        distributed.broadcast_params([p for g in opt.param_groups for p in g["params"]])
    # Compiled code would not see the fused projections' bookkeeping: fuse only in eager mode.
    prepare_frozen_backbone(task.backbone.model, amp, tr.cast_frozen_weights, tr.fuse_projections and not tr.compile)
    apply_memory_features(task, tr, d.world_size, device)  # gradient checkpointing, FSDP2 sharding
    if tr.compile:
        compile_backbone(task.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    return Run(
        cfg, tr, d, out_dir, device, amp, task, train_data, dev_data, opt,
        sched=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tr)),
        scaler=torch.amp.GradScaler("cuda", enabled=amp == torch.float16),
        reporter=Reporter(tr.max_steps, enabled=True) if d.is_main else SilentReporter(),
        tracker=tracking.open_tracker(cfg, tr, out_dir) if d.is_main else tracking.NullTracker(),
        rng=random.Random(tr.seed),
        class_weight=class_weights(tr, task, train_split.labels, device),
        lengths=[len(x) for x in train_data.input_ids],
        weights=weights,
    )  # fmt: skip


def train_step(run: Run, loop: LoopState) -> float:
    """One optimizer step over ``grad_accum`` batches (this rank's share of each under DDP); returns the latest
    loss read back from the device (this step's whenever it is logged, evaluated or saved)."""
    tr, d, model, device = run.tr, run.d, run.model, run.device
    t0 = time.perf_counter()
    loss_sum, n_ex = torch.zeros((), device=device), 0
    for _ in range(tr.grad_accum):
        if not loop.batches:
            loop.batches = train_batches(run.lengths, tr.batch_size, run.rng, tr.bucketed)
        idx = loop.batches.pop()
        n_ex += len(idx)
        share = 1.0
        if d.enabled:  # this rank's slice of the global batch, weighted by its share of the examples
            local = distributed.shard(idx, d.rank, d.world_size)
            # Sharded blocks need this rank in every forward: a rank without rows runs one at weight 0.
            share, idx = len(local) / len(idx), local or (idx[:1] if run.sharded else [])
            if not idx:
                continue
        b = collate(run.train_data, idx, model.pad_id, run.task.left_pad)
        kernel = attention_kernel(tr.attention_kernel, device, run.amp, b["input_ids"].shape[1])
        with autocast(device, run.amp), kernel:
            loss = model.readout.loss(model, run.train_data, idx, b, device, run.class_weight)
        run.scaler.scale(loss * share / tr.grad_accum).backward()
        loss_sum += loss.detach().float() * share / tr.grad_accum
    if d.enabled:  # the all-reduce is a host sync anyway: check here, before the update
        value = distributed.all_reduce_grads(run.params, float(loss_sum))
        if not math.isfinite(value):
            raise PtuneError(non_finite_loss(value, loop.step + 1, loop, tr))
        loss_sum = torch.tensor(value)
    if tr.grad_clip > 0:
        run.scaler.unscale_(run.opt)
        torch.nn.utils.clip_grad_norm_(run.params, tr.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    run.sched.step()
    loop.step += 1
    loop.train_examples += n_ex
    run.pending.append((loop.step, loss_sum, run.sched.get_last_lr()[0]))
    losses = read_back_losses(run) if must_read_back(run, loop.step) else []
    loop.train_time += time.perf_counter() - t0  # exact whenever the losses were read back (a device sync)
    mark_speed(loop, tr.max_steps)
    for step, value, lr in losses:
        if not math.isfinite(value):
            raise PtuneError(non_finite_loss(value, step, loop, tr))
        info = f"loss {value:.4f} lr {lr:.2e} {loop.train_examples / loop.train_time:.1f} ex/s"
        run.reporter.update(step, info, log=step % tr.log_every == 0)
        run.tracker.step(step, value, lr)
        run.last_loss = value
    return run.last_loss


def class_weights(tr: TrainerConfig, task: Task, labels: list[int], device: torch.device) -> torch.Tensor | None:
    """The classifier loss's class weights: n / (C * count_c) over the training labels for ``balanced`` (each
    class then carries the same total weight, as with scikit-learn's ``class_weight="balanced"``), None for
    ``none``. A weighted cross-entropy is still a mean over the batch (PyTorch divides by the summed weights)."""
    if tr.class_weights == "none":
        return None
    task.model.readout.check_class_weights()
    label_names = task.label_names
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=len(label_names)).double()
    missing = [name for name, c in zip(label_names, counts.tolist(), strict=True) if c == 0]
    if missing:
        raise PtuneError(
            f"trainer.class_weights=balanced: class {missing[0]!r} has no training example, so it has no weight; "
            "use trainer.class_weights=none or training data with every class"
        )
    return (counts.sum() / (len(label_names) * counts)).float().to(device)


def must_read_back(run: Run, step: int) -> bool:
    """Whether this step reads its losses back from the device. Reading a CUDA tensor waits for every queued
    kernel, so doing it each step (a ``loss.item()`` or a finite check) keeps the GPU idle while Python queues the
    next step. On CUDA the losses are read every ``log_every`` steps and wherever a number or the prompt is
    used: evaluations, saves, the last step, and the steps whose times results.json reports (``mark_speed``).
    A CPU computes synchronously, so there every step is read at once, as before. A non-finite loss is reported
    with its own step either way, and no checkpoint or resumable state is ever written before that check."""
    tr = run.tr
    if run.device.type != "cuda":
        return True
    return (
        step % tr.log_every == 0
        or step % tr.eval_every == 0
        or step == tr.max_steps
        or bool(tr.save_every and step % tr.save_every == 0)
        or step in speed_mark_steps(tr.max_steps)
    )


def read_back_losses(run: Run) -> list[tuple[int, float, float]]:
    """One device-to-host copy for every loss since the last read: [(step, loss, lr)]."""
    values = torch.stack([loss for _, loss, _ in run.pending]).tolist()
    losses = [(step, value, lr) for (step, _, lr), value in zip(run.pending, values, strict=True)]
    run.pending.clear()
    return losses


def speed_mark_steps(max_steps: int) -> tuple[int, int, int]:
    """Steps after which results.json takes the time: the first step, the end of the warm-up window (the first
    tenth of the run), and half-way (the steady-state rate is the second half's)."""
    return 1, warmup_steps(max_steps), max_steps // 2


def warmup_steps(max_steps: int) -> int:
    return max(1, max_steps // 10)


def mark_speed(loop: LoopState, max_steps: int) -> None:
    first, warm, half = speed_mark_steps(max_steps)
    if loop.step == first:
        loop.first_step_s = loop.train_time
    if loop.step == warm:
        loop.warmup_s = loop.train_time
    if loop.step == half:
        loop.half_time, loop.half_examples = loop.train_time, loop.train_examples


def steady_rate(loop: LoopState) -> float:
    """Training examples per second after half-way: kernel selection, allocator growth and other first-use costs
    are behind the run by then (a run of one step has no second half: its whole rate)."""
    seconds = loop.train_time - loop.half_time
    return (loop.train_examples - loop.half_examples) / max(seconds, 1e-9)


def evaluate_and_keep_best(run: Run, loop: LoopState, loss: float) -> bool:
    """Rank 0 evaluates, appends to metrics.jsonl and saves the checkpoint when the metric improves; every rank
    learns whether to stop early. Returns True to stop."""
    tr, task = run.tr, run.task
    if not run.d.is_main:
        if run.sharded:  # the sharded blocks need every rank in every forward: evaluate alongside rank 0
            follow_evaluation(run)
        return distributed.broadcast_flag(False, run.device)  # rank 0 evaluates and decides
    calibrate = bool(run.cfg.template.get("calibrate"))
    if calibrate:  # before the eval that decides the save: both see this offset
        calibration.calibrate(task, run.device, run.amp)
    res = evaluate_dev(run)
    loop.history.append({"step": loop.step, "loss": loss, **res})
    run.tracker.evaluation(loop.step, res)
    atomic_write_text(run.out_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in loop.history))
    shown = " ".join(f"{k} {res[k]:.4f}" for k in ("accuracy", "macro_f1", "rouge_l", "bleu") if k in res)
    run.reporter.message(f"eval step {loop.step}: {shown}")
    stop = False
    if res[tr.metric] > loop.best:
        loop.best, loop.best_step, loop.bad_evals = res[tr.metric], loop.step, 0
        loop.ckpt_bytes = save_checkpoint(run.out_dir / "checkpoint", run.model, run.cfg, checkpoint_meta(task))
    else:
        loop.bad_evals += 1
        stop = bool(tr.early_stopping_patience and loop.bad_evals >= tr.early_stopping_patience)
    stopped_by_hook = not stop and run.on_eval is not None and run.on_eval(
        loop.step, res[tr.metric], loop.train_examples, loop.step >= tr.max_steps)
    if calibrate:
        calibration.reset(task)  # the prompt trains on raw scores; the next eval recalibrates
    if run.d.enabled:
        distributed.broadcast_flag(stop or stopped_by_hook, run.device)
    if stop:
        run.reporter.message(f"early stopping at step {loop.step}: no improvement in {loop.bad_evals} evals")
    elif stopped_by_hook:
        run.reporter.message(f"stopped at step {loop.step} by the caller (e.g. a search's pruner)")
    return stop or stopped_by_hook


def follow_evaluation(run: Run) -> None:
    """A rank other than 0 of a sharded backbone runs the forwards of rank 0's evaluation (calibration included)
    and drops the numbers."""
    task = run.task
    calibrate = bool(run.cfg.template.get("calibrate"))
    if calibrate:
        calibration.calibrate(task, run.device, run.amp)
    evaluate_dev(run)
    if calibrate:
        calibration.reset(task)


def evaluate_dev(run: Run) -> dict:
    """The evaluation split, on the run's device and precision and with its family's padding side."""
    task = run.task
    return evaluate(
        run.model, run.dev_data, run.tr.eval_batch_size, run.device, run.amp, task.left_pad, len(task.label_names),
        task.label_names,
    )  # fmt: skip


def finish(run: Run, loop: LoopState, wall_s: float) -> dict:
    """Results of the best checkpoint, written to results.json; the resumable state is no longer needed."""
    tr, task, cfg = run.tr, run.task, run.cfg
    final = max(loop.history, key=lambda h: h[tr.metric])
    if task.model.tuner.folds_at_save:
        # The checkpoint holds the folded reparameterisation: report what `ptune eval` will reproduce.
        _, _, state = read_checkpoint(run.out_dir / "checkpoint")
        load_trainable_state(run.model, state)
        final = evaluate_dev(run)
    trainable = sum(p.numel() for p in run.params)
    results = {
        "best_metric": final[tr.metric],
        "metric": tr.metric,
        "best_step": loop.best_step,
        "metrics": {k: v for k, v in final.items() if k not in ("step", "loss", "eval_examples_per_s")},
        "steps": loop.step,
        "examples_seen": loop.train_examples,  # training examples of every step taken (train_examples: the split)
        "trainable_params": trainable,
        "total_params": trainable + sum(p.numel() for p in task.backbone.model.parameters()),
        "checkpoint_bytes": loop.ckpt_bytes,
        "train_examples": len(run.train_data),
        "eval_examples": len(run.dev_data),
        "k_shot": cfg.dataset.get("k_shot"),
        "train_examples_per_s": loop.train_examples / max(loop.train_time, 1e-9),
        "steady_train_examples_per_s": steady_rate(loop),
        "eval_examples_per_s": final["eval_examples_per_s"],
        "setup_s": run.setup_s,
        "first_step_s": loop.first_step_s,
        "warmup_steps": warmup_steps(tr.max_steps),
        "warmup_s": loop.warmup_s,
        **peak_memory(run.device),
        "wall_s": wall_s,
        "device": str(run.device),
        "autocast": str(run.amp).replace("torch.", "") if run.amp else "fp32",
        "method": task.method.name,
        "backbone": str(cfg.backbone.name),
        "dataset": str(cfg.dataset.name),
    }
    if run.d.enabled:
        results["world_size"] = run.d.world_size
    atomic_write_json(run.out_dir / "results.json", results)
    if "confusion" in final:
        plot_confusion(run.out_dir / "confusion.png", final["confusion"], f"{cfg.dataset.name}, step {loop.best_step}")
    run.tracker.finish(results, loop.history)  # curves.png; the trackers' final metrics and checkpoint artifact
    resume.clear_state(run.out_dir)  # finished: a later resume=true has nothing left to redo
    return results


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


def checkpoint_meta(task: Task, cfg: DictConfig | None = None) -> dict:
    """meta.json of a checkpoint: what `ptune eval`, predict and serving check a checkpoint against."""
    return {
        "backbone": task.backbone.identity,
        "family": task.backbone.family.name,
        "label_names": task.label_names,
        "method": task.method.name,
        "num_soft_tokens": task.renderer.num_soft,
        "template": task.renderer.template.source,
    }


def non_finite_loss(value: float, step: int, loop: LoopState, tr: TrainerConfig) -> str:
    kept = (
        f"the best checkpoint so far (step {loop.best_step}) is kept"
        if loop.best_step
        else "no checkpoint had been saved yet"
    )
    return f"loss became {value} at step {step}: lower trainer.lr (now {tr.lr}); {kept}"
