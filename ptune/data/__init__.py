"""Data loading: the registered data sets (``DATASETS``: built-in sst2, cb, inews; the user's csv, tsv, jsonl; any
`datasets` source, hf) as plain Python lists."""

from ptune.data.safe_pickle import safe_load
from ptune.data.selection import load_train_dev, sample_limit, subsample, training_examples
from ptune.data.sources import DATASETS, VALID_DATASETS, DatasetSource, Split, input_columns, k_shot, load_split

__all__ = [
    "DATASETS",
    "VALID_DATASETS",
    "DatasetSource",
    "Split",
    "input_columns",
    "k_shot",
    "load_split",
    "load_train_dev",
    "safe_load",
    "sample_limit",
    "subsample",
    "training_examples",
]
