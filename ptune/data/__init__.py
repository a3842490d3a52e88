"""Data loading: built-in (sst2, cb, inews) and user (csv, tsv, jsonl) data sets as plain Python lists."""

from ptune.data.safe_pickle import safe_load
from ptune.data.selection import load_train_dev, sample_limit, subsample, training_examples
from ptune.data.sources import VALID_DATASETS, Split, builtin_columns, k_shot, load_split

__all__ = [
    "VALID_DATASETS",
    "Split",
    "builtin_columns",
    "k_shot",
    "load_split",
    "load_train_dev",
    "safe_load",
    "sample_limit",
    "subsample",
    "training_examples",
]
