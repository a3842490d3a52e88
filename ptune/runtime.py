"""Where and how a run computes: device, autocast precision, CPU threads, SDPA kernel, seeds, torch.compile.

Shared by training, evaluation, serving and show-template, so that all of them pick the same device and precision
for the same config.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from .errors import PtuneError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PtuneError("trainer.device=cuda but no CUDA device is available: use trainer.device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_bf16_feature() -> str | None:
    """The CPU instructions that run bf16 matmuls natively (``AMX`` or ``AVX512-BF16``), or None: there PyTorch
    emulates bf16: the default job ran ~12x slower in bf16 than in fp32 there (555 s vs 44 s for 3 steps, issue 27).
    ``torch.backends.cpu.get_cpu_capability()`` names only the vector width (AVX2, AVX512, ...), not the bf16
    extensions, so the kernel's ``/proc/cpuinfo`` flags decide (Linux; elsewhere None)."""
    cap = torch.backends.cpu.get_cpu_capability()
    if "AMX" in cap.upper():
        return "AMX"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX512-BF16" if "avx512_bf16" in flags else None


def cpu_has_fast_bf16() -> bool:
    return cpu_bf16_feature() is not None


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


AUTO_DTYPE = "auto"


def resolve_dtype(precision: str, device: torch.device) -> tuple[str, str]:
    """What ``backbone.dtype=auto`` stores the frozen weights in on ``device``: (``bfloat16`` | ``float32``, why).

    bf16 where the hardware computes it natively (a CUDA device with bf16, a CPU with AMX or AVX512-BF16) and the
    run computes in it; else fp32: bf16 weights on a CPU without those instructions make every matmul emulated.
    ``trainer.precision=fp32`` (or fp16) asks for another compute dtype, so the weights stay fp32 there too."""
    if precision in ("fp32", "fp16"):
        return "float32", f"trainer.precision={precision}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "the CUDA device supports bf16"
        return "float32", "the CUDA device has no bf16"
    feature = cpu_bf16_feature()
    if feature is not None:
        return "bfloat16", f"CPU has {feature}"
    return "float32", "CPU has neither AMX nor AVX512-BF16: bf16 would be emulated, many times slower"


def settle_backbone_dtype(cfg, device: torch.device | None = None) -> str:
    """Replace ``backbone.dtype=auto`` in ``cfg`` by what it resolves to on ``device`` (default: the one
    ``trainer.device`` picks) and return the line that says so. The resolved value is what the run saves in its
    checkpoint (``config.yaml``), so ``ptune eval``/``predict`` load the weights in the same dtype on any
    machine. A dtype already set is kept (the line says it was set)."""
    dtype = str(cfg.backbone.get("dtype", "float32"))
    if dtype != AUTO_DTYPE:
        return f"backbone.dtype={dtype}"
    trainer = cfg.get("trainer") or {}
    device = device or pick_device(str(trainer.get("device", "auto")))
    resolved, why = resolve_dtype(str(trainer.get("precision", "auto")), device)
    cfg.backbone.dtype = resolved
    return f"backbone.dtype=auto -> {resolved} ({why})"


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
    target = model.family.compile_target(model.backbone)
    target.compile(dynamic=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory(device: torch.device) -> dict:
    """The run's peak memory for results.json: what CUDA's allocator handed out on a GPU (the figure PEFT's and
    torch's own benchmarks quote), the process's peak resident set on a CPU (weights, activations, Python)."""
    if device.type == "cuda":
        return {
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device),
            "peak_memory_kind": "cuda_max_memory_allocated",
        }
    import resource

    return {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory_kind": "cpu_peak_rss",
    }


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; nothing when ``dtype`` is None (fp32, as ``pick_amp`` says)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
