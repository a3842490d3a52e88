"""The repeated transformer blocks of a backbone: the unit that memory features act on.

Gradient checkpointing recomputes them, quantisation stores their projections in 8 or 4 bits, and FSDP2 shards
them over ranks. They hold nearly all of a model's weights (a 7B Llama: 6.5B of 6.7B) and all its activations;
the rest (token embeddings, final norm, LM/MLM head, pooler) is small, is read outside the blocks' forward (the
verbalizer indexes LM head rows, ``PromptModel.embed`` calls the embedding table), and so stays as loaded.

transformers 5 marks these blocks itself: every architecture's layer class (BertLayer, T5Block, GPT2Block,
LlamaDecoderLayer, Gemma3DecoderLayer, ...) derives from ``GradientCheckpointingLayer``.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .errors import PtuneError


def transformer_layers(model: nn.Module, feature: str) -> list[nn.Module]:
    """The outermost transformer blocks of ``model`` in model order; ``feature`` (a config key) names what needs
    them in the error raised when there are none."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    if not found:
        raise PtuneError(
            f"{feature} needs transformer blocks that transformers marks as GradientCheckpointingLayer, and "
            f"{type(model).__name__} has none: turn {feature} off for this backbone"
        )
    return [m for _, m in found]
