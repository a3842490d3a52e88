"""The memory features for large frozen backbones, together: which combinations work, and applying them in order.

``backbone.quantize`` (quantize.py) happens when the backbone loads; ``trainer.gradient_checkpointing``
(activation_checkpointing.py) and ``trainer.shard_backbone`` (sharding.py) are applied here, to a task already on
its device and after the frozen-backbone speed-ups (frozen.py), which need whole, plain tensors.
"""

from __future__ import annotations

import torch

from ..build import Task
from ..config import TrainerConfig
from ..errors import PtuneError
from .activation_checkpointing import enable_gradient_checkpointing
from .sharding import shard_backbone


def check_combination(tr: TrainerConfig, quantize: str, world_size: int) -> None:
    """Refuse, in one line and before anything loads, a combination that does not work."""
    if tr.compile:
        # Not tested together: Dynamo would have to trace a checkpoint with a context_fn, FSDP2's hooks and torchao's
        # tensor subclasses. Refused rather than risk a graph break or a silent eager fallback.
        for key, on in (
            ("trainer.gradient_checkpointing=true", tr.gradient_checkpointing),
            ("trainer.shard_backbone=true", tr.shard_backbone),
            (f"backbone.quantize={quantize}", quantize != "none"),
        ):
            if on:
                raise PtuneError(f"trainer.compile=true does not combine with {key}: set trainer.compile=false")
    if tr.shard_backbone and world_size > 1 and quantize == "int8":
        raise PtuneError(
            "backbone.quantize=int8 cannot be sharded (torchao's Int8Tensor has no FSDP2 support): "
            "use backbone.quantize=nf4 or none with trainer.shard_backbone=true"
        )


def apply_memory_features(task: Task, tr: TrainerConfig, world_size: int, device: torch.device) -> list[str]:
    """Checkpoint and/or shard the task's backbone as configured; returns what was done, for the start message.

    Sharding only means something with several ranks; one process keeps the whole backbone. Under sharding the
    shared-prefix shortcut of causal soft prompts (``PromptModel.share_prefix``, exact either way) is turned off:
    its prefix keys/values leave the blocks through a side channel that FSDP2's backward hooks never see, so
    backward would reach them after their block's gathered weights were freed."""
    done: list[str] = []
    model = task.backbone.model
    if tr.gradient_checkpointing:
        done.append(f"gradient checkpointing of {enable_gradient_checkpointing(model)} blocks")
    if tr.shard_backbone and world_size > 1:
        task.model.share_prefix = False
        done.append(f"{shard_backbone(model, device)} blocks sharded over {world_size} ranks")
    return done
