"""FSDP2 sharding of the frozen backbone over the ranks of a ``torchrun`` job: ``trainer.shard_backbone=true``.

For a backbone that does not fit one device. Each transformer block (``ptune.blocks``) becomes its own FSDP2 unit
(``torch.distributed.fsdp.fully_shard``): every rank stores 1/N of its weights, gathers the whole block just
before the block runs (in forward, and again in backward to pass the gradient through it to the prompt) and frees
it after. Nothing else is sharded: the prompt, the head, the embeddings and the LM head stay whole on every rank,
as in the data-parallel path (``ptune.distributed``), whose one all-reduce of the trainable gradients and
share-weighted losses are unchanged. No weight gradient exists, so FSDP never reduce-scatters anything.

A gather is a collective: every rank must run every forward of the backbone, in the same order. The training
loop therefore gives a rank with no rows in a global batch one row at weight 0, and evaluation runs on every rank
(rank 0 keeps the numbers). On CUDA the gathers need NCCL: launch with ``PTUNE_DIST_BACKEND=cpu:gloo,cuda:nccl``
(gloo keeps the CPU-side collectives). On CPU, gloo alone works (the tests run that way).

Quantised blocks shard too when torchao's tensor supports FSDP2 (NF4 does: QLoRA's FSDP2 recipe).
"""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import transformer_layers
from ..errors import PtuneError, one_line


def shard_backbone(model: nn.Module, device: torch.device) -> int:
    """Shard every transformer block of ``model`` over the default process group; returns how many blocks.

    Call it after the model reached ``device`` and after the frozen-backbone speed-ups
    (``ptune.efficiency.frozen``), which need whole tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda" and "nccl" not in str(dist.get_backend()).lower():
        raise PtuneError(
            "trainer.shard_backbone=true on CUDA needs NCCL for its gathers: launch torchrun with "
            "PTUNE_DIST_BACKEND=cpu:gloo,cuda:nccl"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = transformer_layers(model, "trainer.shard_backbone")
    for layer in layers:
        try:
            fully_shard(layer, mesh=mesh)
        except Exception as exc:  # a weight type FSDP2 cannot split (e.g. a quantised tensor without FSDP hooks)
            raise PtuneError(
                f"trainer.shard_backbone=true cannot shard {type(layer).__name__} ({one_line(exc, 160)}): "
                "use backbone.quantize=none or nf4, or trainer.shard_backbone=false"
            ) from None
    return len(layers)
