#!/usr/bin/env python
"""ptune vs PEFT on the same work: same backbone, SST-2 examples, method, batch size, steps, max length, dtype.

    python scripts/bench.py --setup minilm-ptv2 --precision bf16 --peft-python .venv-bench/bin/python
    python scripts/bench.py --setup smollm2-soft --steps 50 --precision bf16
    python scripts/bench.py --setup smollm2-soft --precision bf16 --seeds 0,1,2
    python scripts/bench.py --setup synthetic-soft --shape tinyllama --device cuda   # 1.1B random-weight Llama
    python scripts/bench.py --check-peft     # does PEFT's prefix tuning run in this interpreter?

Each side trains in its own child process (this script again, with ``--side``), so each child's peak memory is its
own; the parent measures the matmul peak and prints the table.

- ptune: ``ptune.training.run_training`` on the composed experiment (``sst2_ptv2`` or ``sst2_smollm2_soft``).
- PEFT: the plain PyTorch loop of PEFT's docs: ``get_peft_model``, a ``DataLoader`` with
  ``DataCollatorWithPadding`` (pads to the batch's longest), AdamW (ptune's prompt/head learning rates and
  weight decay), a linear schedule with ptune's warmup, gradient clipping at ptune's value, ``model(**batch)``.
  minilm-ptv2: ``PrefixTuningConfig(SEQ_CLS, 20 virtual tokens, prefix_projection=False)`` on
  ``AutoModelForSequenceClassification`` of the same weights; its pooler is swapped for ptune's masked mean
  pooling, so both heads are mean-pool -> dropout 0.1 -> linear. smollm2-soft and synthetic-soft:
  ``PromptTuningConfig(CAUSAL_LM, 20 virtual tokens, TEXT init from the label words)`` with the same template, left
  padding, and the label words' logits at the last position (``logits_to_keep=1``: only that position goes through
  the LM head). The frozen backbone is in train mode there (dropout on, as in PEFT's docs; BERT's dropout is 0.1,
  Llama has none); ptune keeps it in eval mode.
- Both: the backbone loaded in float32 (``--backbone-dtype bfloat16`` for smollm2-soft, as its experiment runs; the
  default of synthetic-soft), ``torch.autocast`` in bf16 with ``--precision bf16``, the same ``--threads``; the same
  training examples (ptune's seeded subsample of steps x batch examples: one epoch, each side in its own shuffled
  order); the full dev set (872) for accuracy and eval speed, eval batch 64.

Devices (``--device cpu|cuda``, default cpu): the PEFT side is the same code on both. On CUDA both sides put the
model and the batches on ``cuda`` (ptune: ``trainer.device=cuda``), autocast is ``torch.autocast("cuda",
bfloat16)`` with ``--precision bf16``, every timing point calls ``torch.cuda.synchronize()`` first, and peak memory
is ``torch.cuda.max_memory_allocated()``, its counter reset after loading, before training. On a CPU peak memory is
the child's peak RSS (``ru_maxrss``: loading included).

Figures, from the same clock on both sides (ptune's come from ``run_training``'s results; PEFT's loop takes a
timestamp after every step and synchronises at the steps that are read): time to the training loop (``setup``:
ptune from ``run_training``'s start, PEFT from the child's start after its imports), the first step alone, the
warm-up (the first N = max(1, steps // 10) steps), steady-state train ex/s (the steps after steps // 2), whole-run
train ex/s, eval ex/s cold (the first pass over dev: ptune's is ``run_training``'s own evaluation) and warm (a second
pass with the same model), peak memory, dev accuracy (real-weight setups only).

Setups (``--setup``):

- ``minilm-ptv2``: P-tuning v2 on the packaged MiniLM (600 steps x 32).
- ``smollm2-soft``: a 20-token soft prompt on the packaged SmolLM2-135M (200 steps x 16).
- ``synthetic-soft``: the same soft prompt (``sst2_smollm2_soft``'s template and verbalizer, 100 steps x 16) on a
  Llama decoder built from a ``LlamaConfig`` with random weights (seeded; bf16 by default), ``save_pretrained`` with
  the tokenizer into a folder that both sides load (ptune as ``backbone=hf backbone.name=FOLDER``). ``--shape``:
  ``tinyllama`` (TinyLlama-1.1B: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads), ``0.1b``
  (SmolLM2-135M's shape) or ``tiny`` (2 layers, hidden 64: seconds on a CPU, for tests). The vocabulary is the
  tokenizer's: ``--tokenizer DIR``, default the SmolLM2 tokenizer (``.gpu-bundle/smollm2-tokenizer`` when present,
  else the packaged model's GGUF). ``--synthetic-dir DIR`` keeps the built decoder and reuses it on the next run
  (default: a temporary folder). Random weights measure speed and memory; accuracy prints as "n/a (random weights)".

``--backbone-dir DIR`` runs minilm-ptv2 or smollm2-soft on a local ``save_pretrained`` folder of that backbone
instead of the packaged model (a GPU host without the packaged models: ``.gpu-bundle/minilm``).

The PEFT side needs a transformers that PEFT 0.21.2's prefix tuning runs on: 5.24 removed ``past_key_values`` from
``BertModel.forward``, and minilm-ptv2's PEFT side then fails with "Model does not support past key values which
are required for prefix tuning" (5.17-5.23 run it; prompt tuning on a causal LM runs on 5.24 too). The ``bench``
extra of pyproject.toml pins a working pair; ``make bench-venv`` installs it into ``.venv-bench`` (the packages of
``.venv`` plus that transformers), and ``--peft-python .venv-bench/bin/python`` runs the PEFT child there while the
ptune child keeps this interpreter. When the PEFT side fails with that error, the bench says so in one line.

Training FLOPs ~= 4 x N x T: per parameter and token, 2 FLOPs (one multiply-add) forward + 2 backward to the
activations (the frozen weights get no gradient); N non-embedding backbone parameters, T real tokens that the
backbone runs (non-padding input tokens plus soft-prompt virtual tokens; ptune's shared prompt prefix on a causal LM
counts once per batch; deep prefixes are not tokens). Attention score FLOPs are left out.
Achieved FLOP/s is divided by the measured peak of a large ``torch.matmul`` in the same dtype (and thread count, on
a CPU) on the same device. The ptune child also times its backbone's matmuls alone at the run's mean token rows per
batch (``matmul_ceiling``): no step can beat that fraction of the peak, whatever the rest of the step costs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import SHAPES as MEMORY_SHAPES  # noqa: E402
from bench_memory import Shape  # noqa: E402

from ptune.runtime import peak_memory  # noqa: E402  (results.json's figure, used for PEFT's side too)
from ptune.training import speed_mark_steps  # noqa: E402  (results.json's first, warm-up and half-way steps)

# Each setup pins the steps and optimiser settings it is measured with (the reference figures), so the
# benchmark does not move when an experiment's own defaults are retuned for accuracy.
SETUPS = {
    "minilm-ptv2": {
        "experiment": "sst2_ptv2",
        "backbone": "minilm",
        "peft": "prefix",
        "steps": 600,
        "trainer": {"lr": 0.01, "head_lr": 0.005, "schedule": "linear"},
        "method": {"prompt_length": 20},  # the recipe's 64 came later; the measured figures use 20
    },
    "smollm2-soft": {
        "experiment": "sst2_smollm2_soft",
        "backbone": "smollm2",
        "peft": "prompt",
        "steps": 200,
        "trainer": {"lr": 0.01, "schedule": "linear"},
    },
    "synthetic-soft": {  # a random-weight Llama decoder built from a config (--shape): speed and memory only
        "experiment": "sst2_smollm2_soft",
        "backbone": None,
        "peft": "prompt",
        "steps": 100,
        "trainer": {"lr": 0.01, "schedule": "linear"},
        "backbone_dtype": "bfloat16",
        "synthetic": True,
    },
}
# Shapes of the synthetic decoder (vocabulary: the tokenizer's). TinyLlama-1.1B and SmolLM2-135M as in
# scripts/bench_memory.py; tiny for a CPU test.
SYNTHETIC_SHAPES: dict[str, Shape] = {
    "tinyllama": MEMORY_SHAPES["1.1B"],
    "0.1b": MEMORY_SHAPES["0.1B"],
    "tiny": Shape(64, 128, 2, 4, 2),
}
WEIGHT_SEED = 0  # the synthetic decoder's weights: the same for every --seed, so --synthetic-dir can be reused
MAX_LENGTH = 64
EVAL_BATCH = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PEFT_PKV_ERROR = "does not support past key values"  # PEFT's prefix tuning on transformers >= 5.24 (BERT)
RANDOM_ACCURACY = "n/a (random weights)"


def seed_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Setups: minilm-ptv2 (P-tuning v2 on MiniLM, 600 x 32), smollm2-soft (soft prompt on SmolLM2-135M, "
        "200 x 16), synthetic-soft (the same soft prompt on a random-weight Llama decoder of --shape: tinyllama = "
        "TinyLlama-1.1B's shape, 0.1b = SmolLM2-135M's, tiny = 2 layers of hidden 64; 100 x 16; accuracy n/a). "
        "PEFT's prefix tuning (minilm-ptv2) needs transformers < 5.24: `make bench-venv`, then --peft-python "
        ".venv-bench/bin/python. Figures and details: this script's docstring and docs/results/speed.md.",
    )
    p.add_argument("--setup", choices=sorted(SETUPS), default="minilm-ptv2")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides train (default cpu)")
    p.add_argument("--steps", type=int, default=0, help="training steps (0: the setup's, 600, 200 or 100)")
    p.add_argument("--batch-size", type=int, default=0, help="0: the experiment's batch size")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument(
        "--backbone-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="frozen backbone weights on both sides (default: bfloat16 for synthetic-soft, else float32; "
        "bfloat16 only for the soft-prompt setups)",
    )
    p.add_argument(
        "--shape",
        choices=sorted(SYNTHETIC_SHAPES),
        default="tinyllama",
        help="synthetic-soft: the decoder's shape (tinyllama ~1.1B, 0.1b, tiny)",
    )
    p.add_argument("--tokenizer", help="synthetic-soft: tokenizer folder (default: the SmolLM2 tokenizer)")
    p.add_argument(
        "--synthetic-dir",
        help="synthetic-soft: build the decoder here and reuse it when it is already there (default: a temp folder)",
    )
    p.add_argument(
        "--backbone-dir",
        help="minilm-ptv2 / smollm2-soft: a local save_pretrained folder of the backbone instead of the packaged one",
    )
    p.add_argument(
        "--peft-python",
        default=sys.executable,
        help="interpreter of the PEFT child (default: this one), e.g. .venv-bench/bin/python (`make bench-venv`)",
    )
    p.add_argument(
        "--check-peft",
        action="store_true",
        help="only check that PEFT's prefix tuning runs in this interpreter (exit 0) or say why not (exit 1)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: all allowed cores)")
    p.add_argument(
        "--matmul-size",
        type=int,
        default=0,
        help="side of the square matmul that measures the peak (0: 2048 on a CPU, 8192 on CUDA)",
    )
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
        help="extra config override (repeatable) for ptune's run, e.g. trainer.cast_frozen_weights=false; the PEFT "
        "side reads the same config (dataset.max_eval_samples=N shortens both evaluations)",
    )
    p.add_argument("--side", choices=("ptune", "peft"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup = SETUPS[args.setup]
    args.backbone_dtype = args.backbone_dtype or setup.get("backbone_dtype", "float32")
    if args.backbone_dtype == "bfloat16" and setup["peft"] != "prompt":
        p.error("--backbone-dtype bfloat16 is for the soft-prompt setups (PEFT's classifier head would train in bf16)")
    if args.backbone_dir and setup.get("synthetic") and not args.side:
        p.error("--backbone-dir is for minilm-ptv2 / smollm2-soft; synthetic-soft builds its own (--synthetic-dir)")
    return args


def compose_cfg(args: argparse.Namespace):
    from omegaconf import open_dict

    from ptune.config import compose

    setup = SETUPS[args.setup]
    exp = setup["experiment"]
    backbone = ["backbone=hf", f"backbone.name={args.backbone_dir}"] if args.backbone_dir else []
    base = compose([f"+experiment={exp}", *backbone])
    steps = args.steps or setup["steps"]
    batch = args.batch_size or int(base.trainer.batch_size)
    cfg = compose(
        [
            f"+experiment={exp}",
            *backbone,
            f"data.root={args.data_root}",
            f"backbone.max_length={MAX_LENGTH}",
            f"backbone.dtype={args.backbone_dtype}",
            f"trainer.device={args.device}",
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
            *(f"method.{k}={v}" for k, v in setup.get("method", {}).items()),
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


def synchronize(device) -> None:
    """Wait for the device's queued work: every timing point on CUDA calls this first."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------------
# step times -> warm-up and steady-state figures (the same split as ptune's results.json)
# ------------------------------------------------------------------------------------------------------------


def timing_points(steps: int) -> tuple[int, ...]:
    """The steps (1-based) whose end times ``step_timing`` reads: only there does a CUDA loop need to synchronise."""
    return tuple(sorted({*speed_mark_steps(steps), steps} - {0}))


def step_timing(start: float, ends: list[float], examples: list[int]) -> dict:
    """Figures of a training loop from its start time, each step's end time and each step's examples.

    first_step_s: step 1 alone (the loop's start to its end); warmup_s: the first N = warmup_steps(steps) steps;
    steady_train_examples_per_s: the examples of the steps after steps // 2 over their time (a 1-step run: its
    whole rate); train_examples_per_s: the whole run's."""
    steps = len(ends)
    if steps == 0 or len(examples) != steps:
        raise ValueError(f"need one end time and one example count per step ({steps} vs {len(examples)})")
    _, n, half = speed_mark_steps(steps)
    half_end = ends[half - 1] if half else start
    return {
        "first_step_s": ends[0] - start,
        "warmup_steps": n,
        "warmup_s": ends[n - 1] - start,
        "steady_train_examples_per_s": sum(examples[half:]) / max(ends[-1] - half_end, 1e-9),
        "train_examples_per_s": sum(examples) / max(ends[-1] - start, 1e-9),
        "train_time_s": ends[-1] - start,
    }


# ------------------------------------------------------------------------------------------------------------
# the synthetic decoder (built once in the parent)
# ------------------------------------------------------------------------------------------------------------


def default_tokenizer() -> tuple[str, str | None]:
    """(folder, GGUF file or None) of the SmolLM2 tokenizer: the GPU bundle's, else the packaged model's GGUF."""
    bundle = REPO / ".gpu-bundle" / "smollm2-tokenizer"
    if (bundle / "tokenizer.json").is_file():
        return str(bundle), None
    try:
        from ptune.backbone import resolve_packaged

        found = resolve_packaged("smollm2")
    except Exception as exc:  # the package is missing or broken
        raise SystemExit(f"bench: no SmolLM2 tokenizer ({exc}): pass --tokenizer DIR") from None
    if found is None:
        raise SystemExit("bench: no SmolLM2 tokenizer: pass --tokenizer DIR")
    return found


def build_synthetic(args, folder: Path) -> Path:
    """A Llama decoder of ``args.shape`` with random weights (seeded), saved with its tokenizer into ``folder``;
    reused when ``folder`` already holds the same build."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = SYNTHETIC_SHAPES[args.shape]
    tok_dir, gguf = (args.tokenizer, None) if args.tokenizer else default_tokenizer()
    spec = {
        "shape": args.shape,
        "dims": asdict(shape),
        "tokenizer": str(Path(tok_dir).resolve()) + (f"/{gguf}" if gguf else ""),
        "dtype": args.backbone_dtype,
        "seed": WEIGHT_SEED,
    }
    marker = folder / "bench_synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"bench: reusing the synthetic decoder in {folder}", file=sys.stderr, flush=True)
        return folder
    if folder.is_dir() and any(folder.iterdir()) and not marker.is_file():
        raise SystemExit(  # it would overwrite config.json and the weights of whatever model lives there
            f"bench: --synthetic-dir {folder} holds files the bench did not write (no {marker.name}): name a new or "
            "empty folder"
        )
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tok_dir, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(tok_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=len(tok),
        tie_word_embeddings=shape.tied,
        max_position_embeddings=2048,
        pad_token_id=pad,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(WEIGHT_SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.backbone_dtype])  # built in its dtype: a bf16 1.1B never exists in fp32
    try:
        with torch.device(args.device):  # random init of a billion weights is fast on a GPU, slow on a CPU
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    marker.write_text(json.dumps(spec))
    n = sum(p.numel() for p in model.parameters())
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    print(
        f"bench: built a {args.shape} Llama decoder ({n / 1e6:.1f}M params, vocab {len(tok)}, {args.backbone_dtype}, "
        f"random weights) in {folder} in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return folder


# ------------------------------------------------------------------------------------------------------------
# the two sides (each in its own child process)
# ------------------------------------------------------------------------------------------------------------


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.executable, "torch": torch.__version__}
    for name in ("transformers", "peft"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def side_ptune(args, cfg) -> dict:
    from ptune import training as T

    seen: dict = {"tokens": 0, "computed": 0}
    build_task, prepare = T.build_task, T.prepare

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

    def keep_run(*a, **k):
        """The run's model and dev data for the warm evaluation; CUDA's peak counter restarts after loading."""
        seen["run"] = run = prepare(*a, **k)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return run

    T.build_task, T.prepare = keep_task, keep_run
    with tempfile.TemporaryDirectory() as out:
        res = T.run_training(cfg, Path(out))
    task, run = seen["task"], seen["run"]
    synchronize(run.device)
    warm = T.evaluate_dev(run)
    train_time = res["steps"] * int(cfg.trainer.batch_size) / res["train_examples_per_s"]
    rows = seen["computed"] // max(1, res["steps"])
    return {
        "setup_s": res["setup_s"],
        "first_step_s": res["first_step_s"],
        "warmup_steps": res["warmup_steps"],
        "warmup_s": res["warmup_s"],
        "steady_train_examples_per_s": res["steady_train_examples_per_s"],
        "peak_memory_bytes": res["peak_memory_bytes"],  # CUDA: since the reset after loading (keep_run)
        "peak_memory_kind": res["peak_memory_kind"],
        "train_examples_per_s": res["train_examples_per_s"],
        "eval_examples_per_s": res["eval_examples_per_s"],
        "eval_warm_examples_per_s": warm["eval_examples_per_s"],
        "accuracy": None if SETUPS[args.setup].get("synthetic") else res["metrics"]["accuracy"],
        "eval_examples": res["eval_examples"],
        "train_tokens": seen["tokens"],
        "computed_tokens": seen["computed"],
        "train_time_s": train_time,
        "trainable_params": res["trainable_params"],
        "non_embedding_params": non_embedding_params(task.backbone.model),
        "threads": torch.get_num_threads(),
        "device": str(run.device),
        "matmul_ceiling_flops": matmul_ceiling(task.model.body, rows, args.precision, run.device),
        "rows_per_batch": rows,
    }


def matmul_ceiling(body: torch.nn.Module, rows: int, dtype_name: str, device="cpu", reps: int = 5) -> float:
    """FLOP/s of a training step's backbone matmuls alone, at this run's shapes: for every projection of the body,
    the forward (rows x in @ in x out) and the activation gradient (rows x out @ out x in), each timed on its own.
    Whatever else a step does (attention, norms, activations, casts, autograd) only lowers the step's figure, so
    this bounds the achievable fraction of the matmul peak for this model at this batch's token count."""
    from ptune.efficiency.frozen import FusedProjection

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    shapes = [
        tuple(m.weight.shape) for m in body.modules() if type(m) is torch.nn.Linear or isinstance(m, FusedProjection)
    ]
    flops, seconds = 0.0, 0.0
    with torch.no_grad():
        for out_f, in_f in shapes:
            w = torch.randn(out_f, in_f, dtype=dtype, device=device)
            x = torch.randn(rows, in_f, dtype=dtype, device=device)
            g = torch.randn(rows, out_f, dtype=dtype, device=device)
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
    import random

    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
    )

    from ptune.backbone import load_backbone, resolve_packaged
    from ptune.config import trainer_config
    from ptune.data import load_train_dev

    t_start = time.perf_counter()
    tr = trainer_config(cfg)
    setup = SETUPS[args.setup]
    device = torch.device(args.device)
    random.seed(tr.seed)
    torch.manual_seed(tr.seed)
    torch.set_num_threads(threads(args))
    train_split, dev_split = load_train_dev(cfg, tr.seed)  # the very examples ptune trains and evaluates on
    num_labels = len(train_split.label_names)
    n_virtual = int(cfg.method.prompt_length)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    if setup["peft"] == "prefix":
        folder = args.backbone_dir or resolve_packaged(setup["backbone"])[0]
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
        if args.backbone_dir:  # a save_pretrained folder (synthetic-soft's decoder): loaded as PEFT's docs do
            tok_path = args.backbone_dir
            tok = AutoTokenizer.from_pretrained(tok_path)
            base = AutoModelForCausalLM.from_pretrained(tok_path, dtype=DTYPES[args.backbone_dtype])
        else:  # the packaged GGUF, converted by ptune's loader (its cache folder holds the tokenizer too)
            bb = load_backbone(setup["backbone"], with_lm_head=True, dtype=args.backbone_dtype)
            base, tok = bb.model, bb.tokenizer
            tok_path = bb.identity.get("cache_path") or setup["backbone"]
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
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
                tokenizer_name_or_path=tok_path,
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
    model.to(device)
    head_params = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    prompt_params = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    groups = [{"params": prompt_params, "lr": tr.lr}] + (
        [{"params": head_params, "lr": tr.head_lr}] if head_params else []
    )
    opt = torch.optim.AdamW(groups, weight_decay=tr.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(tr.warmup_ratio * tr.max_steps), tr.max_steps)
    trainable = sum(p.numel() for p in prompt_params + head_params)

    def forward(batch):
        """(logits, loss) of a batch already on the device."""
        if label_ids is None:
            out = model(**batch)  # SEQ_CLS: the loss comes back with the logits
            return out.logits, out.loss
        labels = batch.pop("labels")
        out = model(**batch, logits_to_keep=1)
        logits = out.logits[:, -1, label_ids].float()
        return logits, torch.nn.functional.cross_entropy(logits, labels)

    def on_device(batch):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # after loading, before training
    model.train()
    step, tokens, computed = 0, 0, 0
    points = set(timing_points(tr.max_steps))
    ends: list[float] = []
    examples: list[int] = []
    synchronize(device)
    start = time.perf_counter()
    setup_s = start - t_start
    while step < tr.max_steps:
        for batch in loader:
            tokens += int(batch["attention_mask"].sum()) + extra_tokens * len(batch["labels"])
            computed += batch["attention_mask"].numel() + extra_tokens * len(batch["labels"])
            examples.append(len(batch["labels"]))
            with amp:
                _, loss = forward(on_device(batch))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prompt_params + head_params, tr.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step in points:
                synchronize(device)
            ends.append(time.perf_counter())
            if step % max(1, tr.max_steps // 10) == 0:
                print(f"peft step {step}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
            if step >= tr.max_steps:
                break
    timing = step_timing(start, ends, examples)

    def evaluate_dev() -> tuple[int, float]:
        """(correct, seconds) of one pass over dev."""
        model.eval()
        correct = 0
        synchronize(device)
        t = time.perf_counter()
        with torch.no_grad(), amp:
            for batch in DataLoader(dev_ds, batch_size=EVAL_BATCH, collate_fn=collator):
                logits, _ = forward(on_device(batch))
                correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
        synchronize(device)
        return correct, time.perf_counter() - t

    correct, cold_s = evaluate_dev()
    peak = peak_memory(device)
    _, warm_s = evaluate_dev()
    return {
        "setup_s": setup_s,
        **timing,
        "eval_examples_per_s": len(dev_ds) / cold_s,
        "eval_warm_examples_per_s": len(dev_ds) / warm_s,
        **peak,
        "accuracy": None if setup.get("synthetic") else correct / len(dev_ds),
        "eval_examples": len(dev_ds),
        "train_tokens": tokens,
        "computed_tokens": computed,
        "trainable_params": trainable,
        "non_embedding_params": body_params,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def check_peft() -> int:
    """Run PEFT's prefix tuning (SEQ_CLS) once on a tiny random BERT in this interpreter: 0 if it runs, else 1
    with the one-line explanation. Needs no files."""
    import warnings

    warnings.filterwarnings("ignore")
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    model = get_peft_model(bert, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=2))
    ids = torch.randint(0, 64, (2, 5))
    try:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1])).loss.backward()
    except ValueError as exc:
        if PEFT_PKV_ERROR not in str(exc):
            raise
        print(peft_hint(versions(), str(exc)), file=sys.stderr)
        return 1
    v = versions()
    print(f"bench: PEFT {v.get('peft')} prefix tuning runs on transformers {v.get('transformers')} ({v['python']})")
    return 0


def peft_hint(v: dict, error: str) -> str:
    return (
        f"bench: PEFT {v.get('peft')}'s prefix tuning does not run on transformers {v.get('transformers')} "
        f"({v['python']}: {error.strip()!r}); run the PEFT side with the bench extra's versions: `make bench-venv`, "
        "then --peft-python .venv-bench/bin/python (docs/results/speed.md)"
    )


# ------------------------------------------------------------------------------------------------------------
# parent: matmul peak, children, table
# ------------------------------------------------------------------------------------------------------------


def matmul_peak(dtype_name: str, n_threads: int, device: str = "cpu", size: int = 0, reps: int = 10) -> float:
    """Best FLOP/s of a square torch.matmul (2 n^3 FLOPs) in the benchmark's dtype and thread count."""
    torch.set_num_threads(n_threads)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    size = size or (8192 if device == "cuda" else 2048)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # a second warm-up for the large product
    peak = 2 * size**3 / matmul_times(a, b, reps)[0]
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return peak


def matmul_times(a: torch.Tensor, b: torch.Tensor, reps: int) -> list[float]:
    """Sorted wall times of ``a @ b`` after one warm-up product (oneDNN builds its kernel on the first call);
    synchronised on CUDA."""
    a @ b
    synchronize(a.device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        synchronize(a.device)
        times.append(time.perf_counter() - t)
    return sorted(times)


def run_child(args, side: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        python = args.peft_python if side == "peft" else sys.executable
        cmd = [python, str(Path(__file__).resolve()), "--side", side, "--out", str(out)]
        cmd += ["--setup", args.setup, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        cmd += ["--precision", args.precision, "--threads", str(args.threads), "--seed", str(args.seed)]
        cmd += ["--backbone-dtype", args.backbone_dtype, "--device", args.device, "--shape", args.shape]
        cmd += ["--data-root", args.data_root]
        if args.backbone_dir:
            cmd += ["--backbone-dir", str(args.backbone_dir)]
        cmd += [f"--ptune-override={o}" for o in args.ptune_override]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        print(f"--- {side} ({python}) ---", file=sys.stderr, flush=True)
        res = subprocess.run(cmd, env=env, stdout=sys.stderr)
        found = json.loads(out.read_text()) if out.is_file() else {}
        if found.get("peft_incompatible"):
            raise SystemExit(peft_hint(found["versions"], found["error"]))
        if res.returncode != 0 or not found:
            raise SystemExit(f"bench: the {side} side failed (exit {res.returncode})")
        return found


def table(args, cfg, peak: float, ptune_res: dict, peft_res: dict) -> str:
    n = ptune_res["non_embedding_params"]
    synthetic = bool(SETUPS[args.setup].get("synthetic"))
    cuda = args.device == "cuda"

    def flops(r):
        return 4 * n * r["train_tokens"] / r["train_time_s"]

    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else spec.format(value)

    def ratio(a, b) -> str:
        return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"

    steps = int(cfg.trainer.max_steps)
    n_warm = ptune_res["warmup_steps"]
    rows = [
        ("setup: start to step 1 (s)", "setup_s", "{:.2f}"),
        ("first step (s)", "first_step_s", "{:.3f}"),
        (f"warm-up: steps 1-{n_warm} (s)", "warmup_s", "{:.3f}"),
        (f"train ex/s, steady ({steps // 2 + 1}-{steps})", "steady_train_examples_per_s", "{:.1f}"),
        ("train ex/s, whole run", "train_examples_per_s", "{:.1f}"),
        ("eval ex/s, cold", "eval_examples_per_s", "{:.1f}"),
        ("eval ex/s, warm", "eval_warm_examples_per_s", "{:.1f}"),
        ("peak GPU memory (MiB)" if cuda else "peak RSS (MiB)", "peak_memory_mib", "{:.0f}"),
    ]
    w = 30
    if synthetic:
        config = json.loads((Path(args.backbone_dir) / "config.json").read_text())
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
        dims = ", ".join(f"{k} {config[k]}" for k in (*keys, "vocab_size"))
        what = f"{args.shape} Llama decoder, random weights: {dims}"
    else:
        what = f"+experiment={SETUPS[args.setup]['experiment']}"
    vp, vf = ptune_res.get("versions", {}), peft_res.get("versions", {})
    lines = [
        f"setup {args.setup} ({what}): {steps} steps x batch {cfg.trainer.batch_size}, max_length {MAX_LENGTH}, "
        f"{args.precision}, backbone {args.backbone_dtype}, device {device_name(args.device)}, "
        f"{ptune_res['threads']} threads; {ptune_res['eval_examples']} dev examples",
        f"ptune: torch {vp.get('torch')}, transformers {vp.get('transformers')}; PEFT: torch {vf.get('torch')}, "
        f"transformers {vf.get('transformers')}, peft {vf.get('peft')} ({vf.get('python')})",
        f"trainable params: ptune {ptune_res['trainable_params']:,}, PEFT {peft_res['trainable_params']:,}; "
        f"N (non-embedding backbone params) = {n:,}",
        f"training FLOPs = 4 x N x real tokens (ptune {ptune_res['train_tokens']:,} tokens, PEFT "
        f"{peft_res['train_tokens']:,}); matmul peak ({args.precision}) {peak / 1e9:.1f} GFLOP/s",
        "",
        f"| {'metric':<{w}} | {'ptune':>10} | {'PEFT':>10} | {'ptune/PEFT':>10} |",
        f"|{'-' * (w + 2)}|{'-' * 11}:|{'-' * 11}:|{'-' * 11}:|",
    ]
    for label, key, spec in rows:
        a, b = ptune_res.get(key), peft_res.get(key)
        lines.append(f"| {label:<{w}} | {fmt(a, spec):>10} | {fmt(b, spec):>10} | {ratio(a, b):>10} |")
    if synthetic:
        lines.append(f"| {'dev accuracy':<{w}} | {RANDOM_ACCURACY} | {RANDOM_ACCURACY} | {'':>10} |")
    else:
        a, b = ptune_res["accuracy"], peft_res["accuracy"]
        lines.append(f"| {'dev accuracy':<{w}} | {a:>10.4f} | {b:>10.4f} | {ratio(a, b):>10} |")
    pa, pb = (r["computed_tokens"] / r["train_tokens"] for r in (ptune_res, peft_res))
    lines.append(f"| {'train tokens computed/real':<{w}} | {pa:>10.2f} | {pb:>10.2f} | {pa / pb:>10.2f} |")
    fa, fb = flops(ptune_res), flops(peft_res)
    lines.append(f"| {'train GFLOP/s':<{w}} | {fa / 1e9:>10.1f} | {fb / 1e9:>10.1f} | {fa / fb:>10.2f} |")
    lines.append(f"| {'fraction of matmul peak':<{w}} | {fa / peak:>10.1%} | {fb / peak:>10.1%} | {fa / fb:>10.2f} |")
    ceiling = ptune_res["matmul_ceiling_flops"]
    lines += [
        "",
        "Times in seconds (lower is better), rates in examples/s; setup runs to step 1 from run_training's start "
        f"(ptune) or the child's start after its imports (PEFT); warm-up is steps 1-{n_warm}; peak memory is "
        + ("max_memory_allocated after loading." if cuda else "the child's peak RSS."),
        f"ptune's backbone matmuls alone, at its {ptune_res['rows_per_batch']} token rows per batch, run at "
        f"{ceiling / 1e9:.1f} GFLOP/s = {ceiling / peak:.1%} of the peak: the ceiling of the training figure "
        "for this model at these shapes.",
    ]
    return "\n".join(lines)


def device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return "cpu"


def child_main(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    cfg = compose_cfg(args)
    try:
        res = (side_ptune if args.side == "ptune" else side_peft)(args, cfg)
    except ValueError as exc:
        if args.side != "peft" or PEFT_PKV_ERROR not in str(exc):
            raise
        found = {"peft_incompatible": True, "error": str(exc), "versions": versions()}
        Path(args.out).write_text(json.dumps(found))
        raise SystemExit(3) from None
    res["peak_rss_mib"] = peak_rss_mib()
    res["peak_memory_mib"] = res["peak_memory_bytes"] / 2**20
    res["versions"] = versions()
    Path(args.out).write_text(json.dumps(res))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.check_peft:
        raise SystemExit(check_peft())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"bench: --device cuda, but this torch ({torch.__version__}) sees no CUDA device; use --device cpu"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side:
        child_main(args)
        return
    if args.peft_python != sys.executable and not Path(args.peft_python).exists():
        raise SystemExit(f"bench: --peft-python {args.peft_python}: no such interpreter (see `make bench-venv`)")
    with contextlib.ExitStack() as stack:
        if SETUPS[args.setup].get("synthetic"):
            folder = args.synthetic_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-synthetic-"))
            args.backbone_dir = str(build_synthetic(args, Path(folder).resolve()))
        run_all(args)


def run_all(args) -> None:
    cfg = compose_cfg(args)
    args.steps, args.batch_size = int(cfg.trainer.max_steps), int(cfg.trainer.batch_size)
    peak = matmul_peak(args.precision, threads(args), args.device, args.matmul_size)
    seeds = args.seeds or [args.seed]
    runs = []
    for seed in seeds:
        args.seed = seed
        ptune_res = run_child(args, "ptune")
        peft_res = run_child(args, "peft")
        print(f"seed {seed}\n" + table(args, cfg, peak, ptune_res, peft_res) + "\n", flush=True)
        runs.append({"seed": seed, "ptune": ptune_res, "peft": peft_res})
    if len(runs) > 1 and all(r[s]["accuracy"] is not None for r in runs for s in ("ptune", "peft")):
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
