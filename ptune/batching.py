"""Pre-tokenised examples, dynamic padding and length-bucketed batch order.

Inputs are rendered once into token ids; each batch pads only to its own longest row. Training batches are
drawn from buckets of similar length (shuffled), evaluation runs sorted by length, which on short-text
tasks removes most of the padding a plain loader would compute on.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Encoded:
    input_ids: list[list[int]]
    answer_pos: list[int]
    labels: list[int]
    width_multiple: int = field(default=1, kw_only=True)  # trainer.pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def longest(self) -> int:
        return max((len(r) for r in self.input_ids), default=0)


def batch_width(longest_row: int, multiple: int, cap: int) -> int:
    """The width a batch pads to: its longest row rounded up to ``multiple``, so that batches of similar lengths
    share one shape (on a GPU each new shape can pick and tune new kernels; on a CPU oneDNN builds new ones).
    Never wider than ``cap``, the longest row of the whole data set: rows were cut to fit the model's
    positions, and padding past them could run out of positions."""
    return min(-(-longest_row // multiple) * multiple, max(cap, longest_row))


def collate(data: Encoded, idx: list[int], pad_id: int, left_pad: bool) -> dict[str, torch.Tensor]:
    """Pad in Python lists and convert once per field (a tensor op per row costs more than the rows)."""
    rows = [data.input_ids[i] for i in idx]
    width = max(len(r) for r in rows)
    if data.width_multiple > 1:
        width = batch_width(width, data.width_multiple, data.longest)
    offs = [width - len(r) if left_pad else 0 for r in rows]
    if left_pad:
        ids = [[pad_id] * o + r for r, o in zip(rows, offs, strict=True)]
        mask = [[0] * o + [1] * len(r) for r, o in zip(rows, offs, strict=True)]
    else:
        ids = [r + [pad_id] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "answer_pos": torch.tensor([max(data.answer_pos[i], 0) + o for i, o in zip(idx, offs, strict=True)]),
        "labels": torch.tensor([data.labels[i] for i in idx], dtype=torch.long),
    }


def train_batches(lengths: list[int], batch_size: int, rng: random.Random, bucketed: bool) -> list[list[int]]:
    """One epoch of batches. Bucketed: sort within windows of 50 batches, then shuffle the batch order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if bucketed:
        window = batch_size * 50
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        order = [i for c in chunks for i in sorted(c, key=lambda k: lengths[k])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if bucketed:
        rng.shuffle(batches)
    return batches


def eval_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]
