"""Data-parallel training across processes started by ``torchrun`` (gloo; ``PTUNE_DIST_BACKEND`` to change).

Only the prompt and head train, so there is no DistributedDataParallel wrapper around the frozen backbone: every
rank builds the same task and the same global batch order (same seed), runs its contiguous shard of each global
batch, and the few trainable gradients are summed in one flat all-reduce. Each rank scales its loss by its share
of the global batch (``n_rank / n_global``) before backward, so the sum is the gradient of the global-batch mean
even when shards are uneven (a batch of 5 on 2 ranks: 3 + 2). Evaluation, checkpoints and every file write
happen on rank 0; the other ranks wait for its decision (continue or stop early).

Launch (all ranks must share one run folder; without ``hydra.run.dir`` rank 0's timestamped folder is used)::

    torchrun --standalone --nproc_per_node=2 -m ptune train +experiment=sst2_ptv2 hydra.run.dir=outputs/runs/ddp
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from .errors import PtuneError

TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("PTUNE_DIST_TIMEOUT_MIN", "60")))


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise PtuneError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init() -> Dist:
    """Join the process group when launched with WORLD_SIZE > 1 (idempotent); a single process otherwise.

    gloo on CPU and CUDA alike: what crosses ranks is a few hundred thousand gradient values per step."""
    world = env_world_size()
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_available():
        raise PtuneError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        dist.init_process_group(backend=os.environ.get("PTUNE_DIST_BACKEND", "gloo"), timeout=TIMEOUT)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), local_world)


def shard(batch: list[int], rank: int, world_size: int) -> list[int]:
    """Rank's contiguous slice of a global batch; sizes differ by at most one (the first ranks get the extra)."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (1 if rank < extra else 0)]


def all_reduce_grads(params: list[torch.nn.Parameter], loss: float) -> float:
    """Sum every rank's (already share-weighted) gradients in place, in one flat all-reduce; returns the summed
    loss. Parameters without a gradient on this rank (an empty shard) contribute zeros."""
    import torch.distributed as dist

    flat = torch.cat(
        [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
        + [torch.tensor([loss], dtype=params[0].dtype, device=params[0].device)]
    ).float()
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n
    return float(flat[-1])


def broadcast_params(params: list[torch.nn.Parameter]) -> None:
    """Start every rank from rank 0's values (the seeded init already agrees; this makes it certain)."""
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def broadcast_flag(value: bool, device: torch.device) -> bool:
    """Rank 0's decision, to every rank; also the point where the others wait while rank 0 evaluates."""
    import torch.distributed as dist

    t = torch.tensor([1 if value else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_object(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def hydra_overrides(argv: list[str]) -> list[str]:
    """Under torchrun: all ranks get rank 0's run folder (unless ``hydra.run.dir`` is given) and only rank 0
    writes into it before training: Hydra's ``.hydra/`` bookkeeping and its log file. The other ranks log to their
    stdout, because rank 0 checks the folder for files a new run would overwrite (Hydra's job log among them) and may
    do so after another rank's Hydra has started: that rank's log file was refused as a user's."""
    if env_world_size() <= 1:
        return argv
    if any(a in ("-m", "--multirun") for a in argv):
        raise PtuneError("multirun sweeps (-m) cannot run under torchrun: launch one torchrun per run")
    d = init()
    out = list(argv)
    if not any(a.startswith(("hydra.run.dir=", "++hydra.run.dir=")) for a in argv):
        stamp = broadcast_object(datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S") if d.is_main else None)
        out.append(f"hydra.run.dir=outputs/runs/${{experiment_name}}/{stamp}")
    if not d.is_main:
        out += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return out


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
