"""The frozen pretrained backbone every tuner wraps: ``load_backbone(name)`` returns a ``Backbone``.

One module per job: ``loading`` (names -> frozen model + tokenizer), ``heads`` (is the MLM/LM head real),
``identity`` (what checkpoints compare, weights sha256), ``packaged`` (models shipped in pip packages), ``gguf``
(GGUF -> safetensors cache) and ``cache`` (the ptune cache folder). The family (encoder / seq2seq / causal) and
what it implies come from ``ptune.families``.
"""

from __future__ import annotations

from ..families import Family, detect_family
from .cache import cache_base
from .loading import Backbone, load_backbone
from .packaged import resolve_packaged

__all__ = ["Backbone", "Family", "cache_base", "detect_family", "load_backbone", "resolve_packaged"]
