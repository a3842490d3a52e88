"""Packed forwards: a batch's rows laid end to end in a few shared sequences instead of each padded to the longest.

Requests that arrive together have rows of any length. Padded to its longest row, a batch of SST-2 sentences in
arrival order computes 1.84x its real tokens (``ptune predict`` sorts its whole input by length: 1.02x); cutting it
into forwards of similar lengths leaves 1.18x but needs 3.6x as many forwards, each with a fixed cost (``ptune
serve``'s ``length_chunks``). Packed, rows sit end to end in sequences ("bins") as wide as the longest row, and one
forward computes about the real tokens only:

* a block-diagonal mask keeps every row's tokens attending to their own row (causal within it for a decoder), and
  to their own prompt's deep prefix, gathered per bin by ``prefix_slots``;
* position ids restart at every row;

so each row computes what it computes padded, up to float rounding. ``unpack`` puts the hidden states back in the
padded layout (left or right padded), so readouts read them as before.

Only a family whose body takes position ids and a ready 4D mask, and whose attention sees nothing but the mask and
relative distances, can pack (``Family.packs_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WORTH_PACKING = 0.9
"""Pack only when the bins hold at most this share of the padded batch's tokens: the gathers and the mask cost a
little, and a length-sorted batch (``ptune predict``) saves nothing."""


@dataclass
class Packing:
    """Where every real token of a padded [B, W] batch sits in [bins, W] packed sequences."""

    rows: list[list[int]]  # the batch rows in each bin, in order
    width: int
    take: torch.Tensor  # [bins * W]: for each packed slot, its flat index in the padded [B * W] layout (0 on filler)
    back: torch.Tensor  # [B * W]: for each padded slot, its flat index in the packed layout (0 on padding)
    segment: torch.Tensor  # [bins, W]: the batch row of each packed slot, -1 on the filler after a bin's last row
    positions: torch.Tensor  # [bins, W]: each token's position in its own row
    real: torch.Tensor  # [B, W] bool: the padded batch's real tokens
    causal: bool  # a token sees the earlier tokens of its row only

    @property
    def bins(self) -> int:
        return len(self.rows)

    def mask(self) -> torch.Tensor:
        """[bins, 1, W, W] bool: a token sees the tokens of its own row (the earlier ones only where ``causal``); the
        filler sees itself (no empty row)."""
        same = self.segment[:, :, None] == self.segment[:, None, :]
        if self.causal:
            same &= torch.ones(self.width, self.width, dtype=torch.bool, device=same.device).tril()
        return same[:, None]

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, W, ...] -> [bins, W, ...]."""
        flat = padded.reshape(-1, *padded.shape[2:])
        return flat[self.take].view(self.bins, self.width, *padded.shape[2:])

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[bins, W, ...] -> [B, W, ...], zeros on padding."""
        flat = packed.reshape(-1, *packed.shape[2:])[self.back]
        out = flat.view(*self.real.shape, *packed.shape[2:])
        keep = self.real.view(*self.real.shape, *([1] * (packed.dim() - 2)))
        return out.masked_fill(~keep, 0)


def bins_of(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: rows (longest first) into the first bin with room, ``width`` tokens per bin."""
    bins: list[list[int]] = []
    room: list[int] = []
    for r in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for b, free in enumerate(room):
            if lengths[r] <= free:
                bins[b].append(r)
                room[b] -= lengths[r]
                break
        else:
            bins.append([r])
            room.append(width - lengths[r])
    return bins


def plan(attention_mask: torch.Tensor, causal: bool = False) -> Packing | None:
    """The packing of a padded batch (``attention_mask`` [B, W], padded on either side), or None where it would not
    save enough (``WORTH_PACKING``) or a row's tokens are not in one piece."""
    b, width = attention_mask.shape
    real = attention_mask.bool()
    counts, starts = real.sum(1), real.long().argmax(1)  # the first real token of each row
    cols = torch.arange(width, device=real.device)[None]
    if b < 2 or int(counts.min()) == 0:
        return None
    if not torch.equal(real, (cols >= starts[:, None]) & (cols < (starts + counts)[:, None])):
        return None  # padding inside a row
    lengths, first = counts.tolist(), starts.tolist()
    rows = bins_of(lengths, width)
    if len(rows) * width > WORTH_PACKING * b * width:
        return None
    take, segment, positions = [], [], []
    back = [0] * (b * width)
    for n, members in enumerate(rows):
        seg, pos, at = [], [], 0
        for r in members:
            for p in range(lengths[r]):
                take.append(r * width + first[r] + p)
                back[r * width + first[r] + p] = n * width + at + p
            seg += [r] * lengths[r]
            pos += range(lengths[r])
            at += lengths[r]
        take += [0] * (width - at)
        seg += [-1] * (width - at)
        pos += [0] * (width - at)
        segment.append(seg)
        positions.append(pos)
    dev = attention_mask.device
    return Packing(
        rows,
        width,
        torch.tensor(take, device=dev),
        torch.tensor(back, device=dev),
        torch.tensor(segment, device=dev),
        torch.tensor(positions, device=dev),
        real,
        causal,
    )


def prefix_slots(
    packing: Packing, prompt_of_row: list[int], prefix_len: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each bin's deep prefix: the prefixes of its rows' prompts, one after another.

    Returns (prompt [bins, P], slot [bins, P]) to index a stacked prefix table [prompts, heads, P_max, D] with, and
    ``keep`` [bins, W, P] bool: which prefix slots each packed token attends to (its own row's)."""
    per_bin = [
        [(r, prompt_of_row[r], k) for r in members for k in range(prefix_len[prompt_of_row[r]])]
        for members in packing.rows
    ]
    p = max(1, max(len(s) for s in per_bin))
    owner = [[r for r, _, _ in s] + [-2] * (p - len(s)) for s in per_bin]
    prompt = [[i for _, i, _ in s] + [0] * (p - len(s)) for s in per_bin]
    slot = [[k for _, _, k in s] + [0] * (p - len(s)) for s in per_bin]
    dev = packing.segment.device
    owner_t = torch.tensor(owner, device=dev)
    keep = packing.segment[:, :, None] == owner_t[:, None, :]
    return torch.tensor(prompt, device=dev), torch.tensor(slot, device=dev), keep
