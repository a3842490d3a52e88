#!/usr/bin/env python
"""ptune vs PEFT on the same work: same backbone, SST-2 examples, method, batch size, steps, max length, dtype.

    python scripts/bench.py --setup minilm-ptv2 --precision bf16
    python scripts/bench.py --setup smollm2-soft --steps 50 --precision bf16
    python scripts/bench.py --setup smollm2-soft --precision bf16 --seeds 0,1,2

Each side trains in its own child process (this script again, with ``--side``), so each child's peak RSS
(``ru_maxrss``) is its own; the parent measures the matmul peak and prints the table.

- ptune: ``ptune.train.run_training`` on the composed experiment (``sst2_ptv2`` or ``sst2_smollm2_soft``).
- PEFT: the plain PyTorch loop of PEFT's docs: ``get_peft_model``, a ``DataLoader`` with
  ``DataCollatorWithPadding`` (pads to the batch's longest), AdamW (ptune's prompt/head learning rates and
  weight decay), a linear schedule with ptune's warmup, gradient clipping at ptune's value, ``model(**batch)``.
  minilm-ptv2: ``PrefixTuningConfig(SEQ_CLS, 20 virtual tokens, prefix_projection=False)`` on
  ``AutoModelForSequenceClassification`` of the same weights; its pooler is swapped for ptune's masked mean
  pooling, so both heads are mean-pool -> dropout 0.1 -> linear. smollm2-soft: ``PromptTuningConfig(CAUSAL_LM,
  20 virtual tokens, TEXT init from the label words)`` with the same template, left padding, and the label
  words' logits at the last position (``logits_to_keep=1``: only that position goes through the LM head).
  The frozen backbone is in train mode there (dropout on, as in PEFT's docs; BERT's dropout is 0.1, Llama has
  none); ptune keeps it in eval mode.
- Both: the backbone loaded in float32 (or ``--backbone-dtype bfloat16`` for smollm2-soft, as its experiment runs),
  ``torch.autocast`` in bf16 with ``--precision bf16``, the same
  ``--threads``; the same training examples (ptune's seeded subsample of steps x batch examples: one epoch,
  each side in its own shuffled order); the full dev set (872) for accuracy and eval speed, eval batch 64.

Training FLOPs ~= 4 x N x T: per parameter and token, 2 FLOPs (one multiply-add) forward + 2 backward to the
activations (the frozen weights get no gradient); N non-embedding backbone parameters, T real tokens that the
backbone runs (non-padding input tokens plus soft-prompt virtual tokens; ptune's shared prompt prefix on a causal LM
counts once per batch; deep prefixes are not tokens). Attention score FLOPs are left out.
Achieved FLOP/s is divided by the measured peak of a large ``torch.matmul`` in the same dtype and thread count.
The ptune child also times its backbone's matmuls alone at the run's mean token rows per batch (``matmul_ceiling``):
no step can beat that fraction of the peak, whatever the rest of the step costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Each setup pins the steps and optimiser settings it is measured with (the reference figures), so the
# benchmark does not move when an experiment's own defaults are retuned for accuracy.
SETUPS = {
    "minilm-ptv2": {
        "experiment": "sst2_ptv2",
        "backbone": "minilm",
        "peft": "prefix",
        "steps": 600,
        "trainer": {"lr": 0.01, "head_lr": 0.005, "schedule": "linear"},
    },
    "smollm2-soft": {
        "experiment": "sst2_smollm2_soft",
        "backbone": "smollm2",
        "peft": "prompt",
        "steps": 200,
        "trainer": {"lr": 0.01, "schedule": "linear"},
    },
}
MAX_LENGTH = 64
EVAL_BATCH = 64


def seed_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", choices=sorted(SETUPS), default="minilm-ptv2")
    p.add_argument("--steps", type=int, default=0, help="training steps (0: the setup's, 600 or 200)")
    p.add_argument("--batch-size", type=int, default=0, help="0: the experiment's batch size")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument(
        "--backbone-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="frozen backbone weights on both sides (bfloat16: smollm2-soft only, as its experiment runs)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: all allowed cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        type=seed_list,
        default=[],
        help="comma-separated seeds (e.g. 0,1,2): one table per seed, then dev accuracy mean and std over them",
    )
    p.add_argument("--data-root", default=os.environ.get("PTUNE_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument(
        "--ptune-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra ptune config override (repeatable), e.g. trainer.cast_frozen_weights=false",
    )
    p.add_argument("--side", choices=("ptune", "peft"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def compose_cfg(args: argparse.Namespace):
    from omegaconf import open_dict

    from ptune.cli import compose

    setup = SETUPS[args.setup]
    exp = setup["experiment"]
    base = compose([f"+experiment={exp}"])
    steps = args.steps or setup["steps"]
    batch = args.batch_size or int(base.trainer.batch_size)
    cfg = compose(
        [
            f"+experiment={exp}",
            f"data.root={args.data_root}",
            f"backbone.max_length={MAX_LENGTH}",
            f"backbone.dtype={args.backbone_dtype}",
            f"trainer.max_steps={steps}",
            f"trainer.batch_size={batch}",
            f"trainer.eval_every={steps}",
            f"trainer.eval_batch_size={EVAL_BATCH}",
            f"trainer.log_every={max(1, steps // 10)}",
            "trainer.save_every=0",
            f"trainer.precision={args.precision}",
            f"trainer.num_threads={args.threads}",
            f"trainer.seed={args.seed}",
            f"dataset.max_train_samples={steps * batch}",
            *(f"trainer.{k}={v}" for k, v in setup["trainer"].items()),
            *args.ptune_override,
        ]
    )
    with open_dict(cfg):
        del cfg["hydra"]  # Hydra's own node does not resolve outside a Hydra run
    return cfg


def threads(args) -> int:
    from ptune.runtime import cpu_cores

    return args.threads or cpu_cores()


def non_embedding_params(hf_model) -> int:
    """Parameters of the transformer body that every token goes through: no embedding tables, no pooler/heads."""
    body = hf_model.base_model
    n = 0
    for name, m in body.named_modules():
        if isinstance(m, torch.nn.Embedding) or name.split(".")[0] == "pooler":
            continue
        n += sum(p.numel() for p in m.parameters(recurse=False))
    return n


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------------------
# the two sides (each in its own child process)
# ------------------------------------------------------------------------------------------------------------


def side_ptune(args, cfg) -> dict:
    from ptune import train as T

    seen: dict = {"tokens": 0, "computed": 0}
    build_task = T.build_task

    def count_tokens(_module, _args, kwargs) -> None:
        """Tokens the backbone body really runs in training: a causal LM's shared prompt prefix once per batch."""
        if seen["task"].model.training:
            mask = kwargs["attention_mask"]
            seen["tokens"] += int(mask.sum())
            seen["computed"] += mask.numel()

    def keep_task(*a, **k):
        seen["task"] = build_task(*a, **k)
        seen["task"].model.body.register_forward_pre_hook(count_tokens, with_kwargs=True)
        return seen["task"]

    T.build_task = keep_task
    with tempfile.TemporaryDirectory() as out:
        res = T.run_training(cfg, Path(out))
    task = seen["task"]
    train_time = res["steps"] * int(cfg.trainer.batch_size) / res["train_examples_per_s"]
    rows = seen["computed"] // max(1, res["steps"])
    return {
        "train_examples_per_s": res["train_examples_per_s"],
        "eval_examples_per_s": res["eval_examples_per_s"],
        "accuracy": res["metrics"]["accuracy"],
        "eval_examples": res["eval_examples"],
        "train_tokens": seen["tokens"],
        "computed_tokens": seen["computed"],
        "train_time_s": train_time,
        "trainable_params": res["trainable_params"],
        "non_embedding_params": non_embedding_params(task.backbone.model),
        "threads": torch.get_num_threads(),
        "matmul_ceiling_flops": matmul_ceiling(task.model.body, rows, args.precision),
        "rows_per_batch": rows,
    }


def matmul_ceiling(body: torch.nn.Module, rows: int, dtype_name: str, reps: int = 5) -> float:
    """FLOP/s of a training step's backbone matmuls alone, at this run's shapes: for every projection of the body,
    the forward (rows x in @ in x out) and the activation gradient (rows x out @ out x in), each timed on its own.
    Whatever else a step does (attention, norms, activations, casts, autograd) only lowers the step's figure, so
    this bounds the achievable fraction of the matmul peak for this model at this batch's token count."""
    from ptune.frozen import FusedProjection

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    shapes = [
        tuple(m.weight.shape) for m in body.modules() if type(m) is torch.nn.Linear or isinstance(m, FusedProjection)
    ]
    flops, seconds = 0.0, 0.0
    with torch.no_grad():
        for out_f, in_f in shapes:
            w = torch.randn(out_f, in_f, dtype=dtype)
            x, g = torch.randn(rows, in_f, dtype=dtype), torch.randn(rows, out_f, dtype=dtype)
            for a, b in ((x, w.t()), (g, w)):
                seconds += matmul_times(a, b, reps)[reps // 2]
                flops += 2 * rows * in_f * out_f
    return flops / seconds


class MaskedMeanPooler(torch.nn.Module):
    """Stands in for BertPooler: the mean of the real tokens' hidden states, as ptune's ``pooling: mean`` head.

    BertModel calls its pooler without the mask, so a forward pre-hook on the BertModel hands it over."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.mask: torch.Tensor | None = None
        bert.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, module, args, kwargs) -> None:
        self.mask = kwargs["attention_mask"]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        m = self.mask[:, -hidden.shape[1] :].unsqueeze(-1).to(hidden.dtype)  # PEFT prepends the prefix's ones
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def side_peft(args, cfg) -> dict:
    import contextlib
    import random

    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
    )

    from ptune.backbone import load_backbone, resolve_packaged
    from ptune.config import trainer_config
    from ptune.data import load_train_dev

    tr = trainer_config(cfg)
    setup = SETUPS[args.setup]
    random.seed(tr.seed)
    torch.manual_seed(tr.seed)
    torch.set_num_threads(threads(args))
    train_split, dev_split = load_train_dev(cfg, tr.seed)  # the very examples ptune trains and evaluates on
    num_labels = len(train_split.label_names)
    n_virtual = int(cfg.method.prompt_length)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    if setup["peft"] == "prefix":
        folder = resolve_packaged(setup["backbone"])[0]
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, dtype=torch.float32)
        model.bert.pooler = MaskedMeanPooler(model.bert)
        body_params = non_embedding_params(model)
        model = get_peft_model(
            model, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=n_virtual, prefix_projection=False)
        )

        def encode(ex):
            return tok(ex["text_a"], truncation=True, max_length=MAX_LENGTH)

        extra_tokens = 0
        label_ids = None
    else:
        bb = load_backbone(setup["backbone"], with_lm_head=True, dtype=args.backbone_dtype)
        base, tok = bb.model, bb.tokenizer
        tok.padding_side = "left"
        body_params = non_embedding_params(base)
        words = [str(cfg.template.label_words[name][0]) for name in train_split.label_names]
        label_ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
        model = get_peft_model(
            base,
            PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM,
                num_virtual_tokens=n_virtual,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text="".join(" " + w for w in words),  # ptune's init=labels
                tokenizer_name_or_path=bb.identity.get("cache_path") or setup["backbone"],
            ),
        )
        template = str(cfg.template.text)
        head, tail = template.split("{text_a}")
        tail = tail.replace("{mask}", "").rstrip()
        n_tail = len(tok(tail, add_special_tokens=False)["input_ids"])
        budget = MAX_LENGTH - n_virtual

        def encode(ex):
            enc = tok(head + ex["text_a"] + tail)
            if len(enc["input_ids"]) > budget:  # cut the review, keep "\nSentiment:"
                keep = budget - n_tail
                enc = {k: v[:keep] + v[-n_tail:] for k, v in enc.items()}
            return enc

        extra_tokens = n_virtual

    def dataset(split):
        return [dict(encode(ex), labels=y) for ex, y in zip(split.examples, split.labels, strict=True)]

    train_ds, dev_ds = dataset(train_split), dataset(dev_split)
    collator = DataCollatorWithPadding(tok)
    loader = DataLoader(
        train_ds,
        batch_size=tr.batch_size,
        shuffle=True,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(tr.seed),
    )
    head_params = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    prompt_params = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    groups = [{"params": prompt_params, "lr": tr.lr}] + (
        [{"params": head_params, "lr": tr.head_lr}] if head_params else []
    )
    opt = torch.optim.AdamW(groups, weight_decay=tr.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(tr.warmup_ratio * tr.max_steps), tr.max_steps)
    trainable = sum(p.numel() for p in prompt_params + head_params)

    def forward(batch):
        if label_ids is None:
            return model(**batch)  # SEQ_CLS: the loss comes back with the logits
        labels = batch.pop("labels")
        out = model(**batch, logits_to_keep=1)
        logits = out.logits[:, -1, label_ids].float()
        return logits, torch.nn.functional.cross_entropy(logits, labels)

    model.train()
    step, tokens, computed, examples = 0, 0, 0, 0
    start = time.perf_counter()
    while step < tr.max_steps:
        for batch in loader:
            tokens += int(batch["attention_mask"].sum()) + extra_tokens * len(batch["labels"])
            computed += batch["attention_mask"].numel() + extra_tokens * len(batch["labels"])
            examples += len(batch["labels"])
            with amp:
                out = forward(batch)
            loss = out.loss if label_ids is None else out[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prompt_params + head_params, tr.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % max(1, tr.max_steps // 10) == 0:
                print(f"peft step {step}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
            if step >= tr.max_steps:
                break
    train_time = time.perf_counter() - start

    model.eval()
    correct = 0
    start = time.perf_counter()
    with torch.no_grad(), amp:
        for batch in DataLoader(dev_ds, batch_size=EVAL_BATCH, collate_fn=collator):
            labels = batch["labels"]
            logits = forward(batch).logits if label_ids is None else forward(batch)[0]
            correct += int((logits.argmax(-1) == labels).sum())
    eval_time = time.perf_counter() - start
    return {
        "train_examples_per_s": examples / train_time,
        "eval_examples_per_s": len(dev_ds) / eval_time,
        "accuracy": correct / len(dev_ds),
        "eval_examples": len(dev_ds),
        "train_tokens": tokens,
        "computed_tokens": computed,
        "train_time_s": train_time,
        "trainable_params": trainable,
        "non_embedding_params": body_params,
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------------------------
# parent: matmul peak, children, table
# ------------------------------------------------------------------------------------------------------------


def matmul_peak(dtype_name: str, n_threads: int, size: int = 2048, reps: int = 10) -> float:
    """Best FLOP/s of a square torch.matmul (2 n^3 FLOPs) in the benchmark's dtype and thread count."""
    torch.set_num_threads(n_threads)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # a second warm-up for the large product
    return 2 * size**3 / matmul_times(a, b, reps)[0]


def matmul_times(a: torch.Tensor, b: torch.Tensor, reps: int) -> list[float]:
    """Sorted wall times of ``a @ b`` after one warm-up product (oneDNN builds its kernel on the first call)."""
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return sorted(times)


def run_child(args, side: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--out", str(out)]
        cmd += ["--setup", args.setup, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        cmd += ["--precision", args.precision, "--threads", str(args.threads), "--seed", str(args.seed)]
        cmd += ["--backbone-dtype", args.backbone_dtype]
        cmd += ["--data-root", args.data_root]
        cmd += [f"--ptune-override={o}" for o in args.ptune_override]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        print(f"--- {side} ---", file=sys.stderr, flush=True)
        res = subprocess.run(cmd, env=env, stdout=sys.stderr)
        if res.returncode != 0 or not out.is_file():
            raise SystemExit(f"bench: the {side} side failed (exit {res.returncode})")
        return json.loads(out.read_text())


def table(args, cfg, peak: float, ptune_res: dict, peft_res: dict) -> str:
    n = ptune_res["non_embedding_params"]

    def flops(r):
        return 4 * n * r["train_tokens"] / r["train_time_s"]

    rows = [
        ("train examples/s", "train_examples_per_s", "{:.1f}"),
        ("eval examples/s", "eval_examples_per_s", "{:.1f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
        ("dev accuracy", "accuracy", "{:.4f}"),
    ]
    lines = [
        f"setup {args.setup} (+experiment={SETUPS[args.setup]['experiment']}): {cfg.trainer.max_steps} steps x batch "
        f"{cfg.trainer.batch_size}, max_length {MAX_LENGTH}, {args.precision}, {ptune_res['threads']} threads; "
        f"{ptune_res['eval_examples']} dev examples",
        f"trainable params: ptune {ptune_res['trainable_params']:,}, PEFT {peft_res['trainable_params']:,}; "
        f"N (non-embedding backbone params) = {n:,}",
        f"training FLOPs = 4 x N x real tokens (ptune {ptune_res['train_tokens']:,} tokens, PEFT "
        f"{peft_res['train_tokens']:,}); matmul peak ({args.precision}) {peak / 1e9:.1f} GFLOP/s",
        "",
        f"| {'metric':<26} | {'ptune':>10} | {'PEFT':>10} | {'ptune/PEFT':>10} |",
        f"|{'-' * 28}|{'-' * 11}:|{'-' * 11}:|{'-' * 11}:|",
    ]
    for label, key, fmt in rows:
        a, b = ptune_res[key], peft_res[key]
        lines.append(f"| {label:<26} | {fmt.format(a):>10} | {fmt.format(b):>10} | {a / b:>10.2f} |")
    pa, pb = (r["computed_tokens"] / r["train_tokens"] for r in (ptune_res, peft_res))
    lines.append(f"| {'train tokens computed/real':<26} | {pa:>10.2f} | {pb:>10.2f} | {pa / pb:>10.2f} |")
    fa, fb = flops(ptune_res), flops(peft_res)
    lines.append(f"| {'train GFLOP/s':<26} | {fa / 1e9:>10.1f} | {fb / 1e9:>10.1f} | {fa / fb:>10.2f} |")
    lines.append(f"| {'fraction of matmul peak':<26} | {fa / peak:>10.1%} | {fb / peak:>10.1%} | {fa / fb:>10.2f} |")
    ceiling = ptune_res["matmul_ceiling_flops"]
    lines += [
        "",
        f"ptune's backbone matmuls alone, at its {ptune_res['rows_per_batch']} token rows per batch, run at "
        f"{ceiling / 1e9:.1f} GFLOP/s = {ceiling / peak:.1%} of the peak: the ceiling of the training figure "
        "for this model at these shapes.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.backbone_dtype == "bfloat16" and args.setup != "smollm2-soft":
        raise SystemExit(
            "bench: --backbone-dtype bfloat16 is for --setup smollm2-soft (PEFT's classifier head would train in bf16)"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg(args)
    args.steps, args.batch_size = int(cfg.trainer.max_steps), int(cfg.trainer.batch_size)
    if args.side:
        import warnings

        warnings.filterwarnings("ignore")
        res = (side_ptune if args.side == "ptune" else side_peft)(args, cfg)
        res["peak_rss_mib"] = peak_rss_mib()
        Path(args.out).write_text(json.dumps(res))
        return
    peak = matmul_peak(args.precision, threads(args))
    seeds = args.seeds or [args.seed]
    runs = []
    for seed in seeds:
        args.seed = seed
        ptune_res = run_child(args, "ptune")
        peft_res = run_child(args, "peft")
        print(f"seed {seed}\n" + table(args, cfg, peak, ptune_res, peft_res) + "\n", flush=True)
        runs.append({"seed": seed, "ptune": ptune_res, "peft": peft_res})
    if len(runs) > 1:
        print(seed_summary(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "matmul_peak_flops": peak, "runs": runs}, indent=2))


def seed_summary(runs: list[dict]) -> str:
    """Dev accuracy over seeds: a 0.5-point comparison on 872 examples needs more than one seed."""
    import statistics

    def stat(side: str) -> tuple[float, float]:
        acc = [r[side]["accuracy"] for r in runs]
        return statistics.mean(acc), statistics.stdev(acc)

    (pm, ps), (fm, fs) = stat("ptune"), stat("peft")
    per_seed = ", ".join(f"{r['seed']}: {r['ptune']['accuracy']:.4f} vs {r['peft']['accuracy']:.4f}" for r in runs)
    return (
        f"dev accuracy over {len(runs)} seeds (ptune vs PEFT: {per_seed}): ptune {pm:.4f} +- {ps:.4f}, "
        f"PEFT {fm:.4f} +- {fs:.4f}, difference {100 * (pm - fm):+.2f} points"
    )


if __name__ == "__main__":
    main()
