"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class PtuneError(Exception):
    """A problem the user can fix (bad config value, missing file, incompatible checkpoint)."""


def one_line(exc: object, limit: int | None = None) -> str:
    """The first line of an error's message (its type name when the message is empty), cut to ``limit`` characters.

    Library errors (Hydra, transformers, safetensors) often span many lines or embed a traceback; ptune's own
    messages quote them inside one line, so every place that wraps a foreign error trims it the same way.
    """
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if limit is not None and len(line) > limit:
        line = line[: limit - 3] + "..."
    return line
