"""dataset=hf: a local folder of parquet or JSON files read through `datasets`, mapped and validated like csv."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptune.config import compose, validate
from ptune.data import load_split
from ptune.errors import PtuneError

ROWS = {
    "train": [("a fine film", 1), ("dull and long", 0), ("great fun", 1)],
    "validation": [("not good", 0), ("lovely", 1)],
}


@pytest.fixture()
def parquet_folder(tmp_path: Path) -> Path:
    import datasets

    folder = tmp_path / "reviews"
    folder.mkdir()
    features = datasets.Features(
        {"review": datasets.Value("string"), "stars": datasets.ClassLabel(names=["bad", "good"])}
    )
    for split, rows in ROWS.items():
        ds = datasets.Dataset.from_dict({"review": [t for t, _ in rows], "stars": [y for _, y in rows]}, features)
        ds.to_parquet(str(folder / f"{split}.parquet"))
    return folder


def _cfg(folder: Path, **extra) -> dict:
    return {"name": "hf", "path": str(folder), "fields": {"text_a": "review", "text_b": None},
            "label_column": "stars", **extra}


def test_parquet_folder_with_class_labels(parquet_folder):
    train = load_split(_cfg(parquet_folder), "train", None)
    assert [e["text_a"] for e in train.examples] == [t for t, _ in ROWS["train"]]
    assert train.labels == [y for _, y in ROWS["train"]]
    assert train.label_names == ["bad", "good"], "names come from the ClassLabel feature"
    dev = load_split(_cfg(parquet_folder), "dev", None)
    assert dev.labels == [0, 1] and dev.examples[0]["text_a"] == "not good"


def test_json_folder_with_label_names_given(tmp_path):
    folder = tmp_path / "j"
    folder.mkdir()
    (folder / "train.json").write_text('{"t": "ok film", "y": "pos"}\n{"t": "bad film", "y": "neg"}\n')
    split = load_split(
        {"name": "hf", "path": str(folder), "fields": {"text_a": "t"}, "label_column": "y",
         "label_names": ["neg", "pos"]},
        "train",
        None,
    )
    assert split.labels == [1, 0]


def test_hf_errors_are_one_line(parquet_folder, tmp_path):
    with pytest.raises(PtuneError, match="no column 'text'"):
        load_split({**_cfg(parquet_folder), "fields": {"text_a": "text"}}, "train", None)
    with pytest.raises(PtuneError, match="has no test split"):
        load_split(_cfg(parquet_folder), "test", None)
    with pytest.raises(PtuneError, match="cannot read dataset.path"):
        load_split(_cfg(tmp_path / "nowhere"), "train", None)
    with pytest.raises(PtuneError, match="unknown label"):
        load_split({**_cfg(parquet_folder), "label_names": ["x", "y", "z"], "label_column": "review"}, "train", None)


def test_dataset_hf_group_composes(parquet_folder):
    cfg = compose(["dataset=hf", f"dataset.path={parquet_folder}", "dataset.fields.text_a=review"])
    validate(cfg)
    assert cfg.dataset.fields.text_b is None
