"""``dataset=hf``: any source the `datasets` library reads, by name/Hub id (online) or a local folder of
parquet/arrow/csv/json files (offline), with the same field mapping and validation as csv/tsv/jsonl.

The splits are ptune's train/dev/test; a folder's files are matched to them by `datasets` (``train.parquet``,
``validation.parquet`` or ``dev.parquet``, ...). A ClassLabel column gives the label names when
``dataset.label_names`` is not set.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import PtuneError, one_line
from .records import build_split, column_mapping

# ptune's split -> the names a `datasets` source may use for it, in order of preference
_SPLIT_NAMES = {"train": ("train",), "dev": ("validation", "dev", "valid"), "test": ("test",)}


def load_hf_split(cfg: Mapping[str, Any], split: str, data_root: str | None):

    source = cfg.get("path")
    if not isinstance(source, str) or not source:
        raise PtuneError("dataset=hf needs dataset.path: a datasets name/Hub id, or a folder of parquet/arrow/csv/json")
    folder = Path(source).expanduser()
    if not folder.is_absolute() and data_root and (Path(data_root).expanduser() / folder).exists():
        folder = Path(data_root).expanduser() / folder
    where = str(folder) if folder.exists() else source
    splits = _open(where, cfg.get("config_name"))
    name = next((n for n in _SPLIT_NAMES[split] if n in splits), None)
    if name is None:
        raise PtuneError(
            f"dataset.path={source!r} has no {split} split (looked for {', '.join(_SPLIT_NAMES[split])}; "
            f"it has {', '.join(splits) or 'none'})"
        )
    table = splits[name]
    label_column = cfg.get("label_column") or "label"
    feature = table.features.get(label_column) if hasattr(table, "features") else None
    fields, label_names, label_column = column_mapping(cfg, getattr(feature, "names", None))
    missing = [c for c in dict.fromkeys([*fields.values(), label_column]) if c not in table.column_names]
    if missing:
        raise PtuneError(
            f"{where} [{name}] has no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
            "map fields with dataset.fields.NAME=COLUMN and the label with dataset.label_column=COLUMN"
        )
    records = ((f"{where} [{name}] row {i + 1}", row) for i, row in enumerate(table))
    return build_split(records, fields, label_column, label_names, f"{where} [{name}]")


def _open(where: str, config_name: Any):
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise PtuneError("dataset=hf needs the datasets package: pip install datasets") from None
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(where, name=config_name or None)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a missing or unreadable source
        raise PtuneError(f"cannot read dataset.path={where!r} with datasets: {one_line(exc, 200)}") from None
