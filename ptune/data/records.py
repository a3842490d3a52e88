"""Raw rows -> a validated ``Split`` of plain lists: what every data source shares (the built-in and user files of
sources.py, the ``datasets`` sources of hf.py), so that neither imports the other's internals."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ptune.errors import PtuneError


@dataclass
class Split:
    """One split as plain lists, so tuners can index, subsample and batch without a datasets dependency."""

    examples: list[dict[str, str]]  # text fields by name, no label key
    labels: list[int]  # class index into label_names
    label_names: list[str]
    source: str  # human-readable origin, for logs and error messages

    def __post_init__(self) -> None:
        if len(self.examples) != len(self.labels):
            raise ValueError(f"{len(self.examples)} examples but {len(self.labels)} labels in {self.source}")

    def __len__(self) -> int:
        return len(self.examples)


def short(value: object, limit: int = 80) -> str:
    """repr() clipped to one short line, so offending values can be quoted in messages safely."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label_lookup(label_names: list[str]) -> dict[str, int]:
    lookup = {str(i): i for i in range(len(label_names))}
    lookup.update({n: i for i, n in enumerate(label_names)})  # a name wins over an index ("1".."5" stars)
    return lookup


def build_split(
    records: Iterable[tuple[str, Mapping[str, object]]],
    fields: Mapping[str, str],
    label_column: str,
    label_names: list[str],
    source: str,
    allow_empty: bool = False,
) -> Split:
    """Turn (location, raw row) pairs into a Split, validating labels and text row by row."""
    lookup = _label_lookup(label_names)
    examples: list[dict[str, str]] = []
    labels: list[int] = []
    for loc, row in records:
        raw = row[label_column]
        key = raw.strip() if isinstance(raw, str) else raw
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        label = lookup.get(key) if isinstance(key, str) else None
        if label is None:
            raise PtuneError(
                f"{loc}: unknown label {short(raw)} in column {label_column!r}; valid labels: "
                f"{', '.join(label_names)} (or indices 0..{len(label_names) - 1})"
            )
        example: dict[str, str] = {}
        for field, column in fields.items():
            value = row[column]
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise PtuneError(
                    f"{loc}: column {column!r} must hold text, got {type(value).__name__} {short(value)}"
                )
            example[field] = value.strip()
        if not any(example.values()):
            shown = ", ".join(f"{c}={row[c]!r}" for c in dict.fromkeys(fields.values()))
            raise PtuneError(
                f"{loc}: text is empty in every mapped column ({shown}); each example needs text"
            )
        examples.append(example)
        labels.append(label)
    if not examples and not allow_empty:
        raise PtuneError(f"{source}: no data rows")
    return Split(examples=examples, labels=labels, label_names=list(label_names), source=source)


def column_mapping(cfg: Mapping[str, Any], label_names_found: list[str] | None = None) -> tuple[dict, list, str]:
    """(fields, label names, label column) of a user data set, checked: the same rules for csv/tsv/jsonl and hf.
    ``label_names_found``: names the data itself declares (a datasets ClassLabel), used when none are set."""
    fields = cfg.get("fields")
    if isinstance(fields, Mapping):  # a field set to null (text_b: null ships in the schema) is not read
        fields = {k: v for k, v in fields.items() if v is not None}
    if (
        not isinstance(fields, Mapping)
        or not fields
        or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in fields.items())
    ):
        raise PtuneError(
            "dataset.fields must map template field names to column names, e.g. {text_a: review}; "
            f"got {short(fields)}"
        )
    label_names = cfg.get("label_names") or label_names_found
    if (
        not isinstance(label_names, (list, tuple))
        or not label_names
        or not all(isinstance(n, str) and n for n in label_names)
        or len(set(label_names)) != len(label_names)
    ):
        raise PtuneError(
            f"dataset.label_names must be a non-empty list of distinct strings; got {short(label_names)}"
        )
    label_column = cfg.get("label_column") or "label"
    if not isinstance(label_column, str):
        raise PtuneError(f"dataset.label_column must be a column name, got {short(label_column)}")
    return dict(fields), list(label_names), label_column
