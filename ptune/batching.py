"""Pre-tokenised examples, dynamic padding and length-bucketed batch order.

Inputs are rendered once into token ids; each batch pads only to its own longest row. Training batches are
drawn from buckets of similar length (shuffled), evaluation runs sorted by length, which on short-text
tasks removes most of the padding a plain loader would compute on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    input_ids: list[list[int]]
    answer_pos: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def collate(data: Encoded, idx: list[int], pad_id: int, left_pad: bool) -> dict[str, torch.Tensor]:
    rows = [data.input_ids[i] for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    answer = torch.zeros(len(rows), dtype=torch.long)
    for j, (i, r) in enumerate(zip(idx, rows, strict=True)):
        off = width - len(r) if left_pad else 0
        ids[j, off : off + len(r)] = torch.tensor(r)
        mask[j, off : off + len(r)] = 1
        answer[j] = max(data.answer_pos[i], 0) + off
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "answer_pos": answer,
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
