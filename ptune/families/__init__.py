"""Backbone families (encoder, seq2seq, causal): one class each, and detection from a transformers config."""

from __future__ import annotations

from transformers import PretrainedConfig

from .base import Family, position_ids
from .causal import CausalFamily
from .encoder import EncoderFamily
from .seq2seq import Seq2SeqFamily

SEQ2SEQ, CAUSAL, ENCODER = Seq2SeqFamily(), CausalFamily(), EncoderFamily()
FAMILIES: tuple[Family, ...] = (SEQ2SEQ, CAUSAL, ENCODER)
"""In detection order: the first family whose ``matches`` accepts a config wins (the encoder accepts all)."""


def detect_family(config: PretrainedConfig) -> Family:
    """Classify a config as encoder / seq2seq / causal: it decides prompt placement and the LM head class."""
    return next(f for f in FAMILIES if f.matches(config))


__all__ = [
    "CAUSAL",
    "ENCODER",
    "FAMILIES",
    "SEQ2SEQ",
    "CausalFamily",
    "EncoderFamily",
    "Family",
    "Seq2SeqFamily",
    "detect_family",
    "position_ids",
]
