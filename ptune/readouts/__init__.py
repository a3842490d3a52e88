"""Readouts (verbalizer, linear head, generate): one ``Readout`` subclass each, selected by ``template.readout``."""

from __future__ import annotations

from ..errors import PtuneError
from .base import Readout
from .generate import GenerateReadout
from .head import HeadReadout
from .verbalizer import Verbalizer, VerbalizerReadout, build_verbalizer

READOUTS: dict[str, type[Readout]] = {r.name: r for r in (VerbalizerReadout, HeadReadout, GenerateReadout)}


def readout_class(name: str) -> type[Readout]:
    """The readout that ``template.readout=name`` selects."""
    if name not in READOUTS:
        raise PtuneError(f"template.readout={name!r} is not valid: use one of {', '.join(READOUTS)}")
    return READOUTS[name]


def selectable(readout: str) -> tuple[str, ...]:
    """The ``trainer.metric`` values a ``template.readout`` produces at every evaluation."""
    return readout_class(readout).metrics


__all__ = [
    "READOUTS",
    "GenerateReadout",
    "HeadReadout",
    "Readout",
    "Verbalizer",
    "VerbalizerReadout",
    "build_verbalizer",
    "readout_class",
    "selectable",
]
