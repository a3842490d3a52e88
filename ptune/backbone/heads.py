"""Whether a loaded model really carries an MLM/LM head: verbalizer-style tuning reads label words through it, so a
randomly initialised head (a bare encoder checkpoint loaded with a head class) must be detected, not used.

Shared by loading (``Backbone.has_lm_head``) and the GGUF conversion (tied-embedding check after the reload).
"""

from __future__ import annotations

from transformers import PreTrainedModel


def is_lm_model(model: PreTrainedModel) -> bool:
    """True when the loaded class carries an output projection (MLM / LM head)."""
    try:
        return model.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


def missing_head_keys(model: PreTrainedModel, missing: set[str]) -> set[str]:
    """Missing checkpoint keys that belong to the head (so the head is randomly initialised).

    With a base-model prefix attribute (``bert`` in BertForMaskedLM) everything outside it is head;
    otherwise (T5, ...) the head is the output-embedding module (``lm_head``).
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and getattr(model, prefix, None) is not None and model.base_model is not model:
        return {k for k in missing if not k.startswith(prefix + ".")}
    out = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if out is not None and m is out]
    return {k for k in missing if any(k.startswith(n + ".") for n in names)}
