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
