"""Data loading: built-in (sst2, cb, inews) and user (csv, tsv, jsonl) data sets as plain Python lists."""

from ptune.data.safe_pickle import safe_load
from ptune.data.sources import VALID_DATASETS, Split, k_shot, load_split

__all__ = ["VALID_DATASETS", "Split", "k_shot", "load_split", "safe_load"]
