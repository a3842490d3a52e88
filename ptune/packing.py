"""Packed forwards: a batch's rows laid end to end in one sequence instead of each padded to the longest.

Requests that arrive together have rows of any length. Padded to its longest row, a batch of SST-2 sentences in
arrival order computes 1.84x its real tokens (``ptune predict`` sorts its whole input by length: 1.02x); cutting it
into forwards of similar lengths leaves 1.18x but needs 3.6x as many forwards, each with a fixed cost (``ptune
serve``'s ``length_chunks``). Packed, the rows sit end to end in one sequence, and every layer but attention (the
projections, the MLP, the norms: most of the work) computes the real tokens only. Attention runs "varlen": each row
attends to its own tokens only (earlier ones only for a decoder) and its own prompt's deep prefix, in ``buckets`` of
rows of similar lengths, each padded to its longest row (``deep_attention.prefixes(..., buckets=...)``); position
ids restart at every row. So each row computes what it computes padded, up to float rounding, and ``unpack`` puts
the hidden states back in the padded layout (left or right padded) for the readouts.

Before the buckets, rows were packed into bins as wide as the longest row with a block-diagonal mask over each bin:
1.11x the real tokens, and attention over whole bins (1.7x the pairs of sorted batches). Arrival-order batches of 32
ran at 0.84 of ``ptune predict``'s sorted batches then (MiniLM, 8 prompts, 2-core AMD EPYC).

Only a family whose body takes position ids and a ready 4D mask, and whose attention goes through ptune's attention
function (``deep_attention``) and sees nothing but relative distances, can pack (``Family.packs_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WORTH_PACKING = 0.9
"""Pack only when the real tokens are at most this share of the padded batch's: the gathers cost a little, and a
length-sorted batch (``ptune predict``) saves nothing."""

BUCKET_OVERHEAD = 3000
"""What one more attention bucket costs, in attention pairs (query x key tokens): its gathers and its kernel call,
per layer (estimated on CPU from MiniLM's profile: a pair costs ~50 ns over 12 heads, a bucket's ops ~150 us)."""


@dataclass
class Bucket:
    """Rows of similar lengths whose attention runs as one padded batch."""

    rows: torch.Tensor  # [n]: their batch rows
    index: torch.Tensor  # [n, L]: where each row's tokens sit in the packed sequence (0 past a row's end)
    valid: torch.Tensor  # [n, L] bool: a row's real tokens
    real: torch.Tensor  # [k]: where the real tokens sit in the flattened [n * L] (row by row: the sequence's order)
    mask: torch.Tensor  # [n, 1, L, L] bool: the keys each query sees (its row's; the earlier ones where causal)


@dataclass
class Packing:
    """Where every real token of a padded [B, W] batch sits in one packed sequence [1, T], and the attention
    buckets."""

    take: torch.Tensor  # [T]: for each packed token, its flat index in the padded [B * W] layout
    back: torch.Tensor  # [B * W]: for each padded slot, its index in the packed sequence (0 on padding)
    positions: torch.Tensor  # [1, T]: each token's position in its own row
    real: torch.Tensor  # [B, W] bool: the padded batch's real tokens
    buckets: list[Bucket]

    @property
    def tokens(self) -> int:
        return self.take.shape[0]

    def mask(self) -> torch.Tensor:
        """[1, 1, T, T] all true, without memory: the body wants a ready 4D mask, and attention ignores it for the
        buckets' own (``deep_attention.prefixes(..., buckets=...)``)."""
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.take.device).expand(1, 1, self.tokens, self.tokens)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, W, ...] -> [1, T, ...]."""
        flat = padded.reshape(-1, *padded.shape[2:])
        return flat[self.take].unsqueeze(0)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, T, ...] -> [B, W, ...], zeros on padding."""
        flat = packed.reshape(-1, *packed.shape[2:])[self.back]
        out = flat.view(*self.real.shape, *packed.shape[2:])
        keep = self.real.view(*self.real.shape, *([1] * (packed.dim() - 2)))
        return out.masked_fill(~keep, 0)


def bucket_rows(lengths: list[int]) -> list[list[int]]:
    """Rows grouped for attention: sorted by length and cut where the attention pairs saved outweigh a bucket's
    cost (``BUCKET_OVERHEAD``): dynamic programming over the distinct lengths."""
    sizes = sorted(set(lengths))
    count = [sum(1 for n in lengths if n == s) for s in sizes]
    k = len(sizes)
    best, cut = [0.0] + [float("inf")] * k, [0] * (k + 1)
    for j in range(1, k + 1):
        rows = 0
        for i in range(j - 1, -1, -1):  # bucket = distinct lengths i..j-1, padded to sizes[j - 1]
            rows += count[i]
            cost = best[i] + BUCKET_OVERHEAD + rows * sizes[j - 1] ** 2
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], k
    while j > 0:
        groups.append(set(sizes[cut[j]: j]))
        j = cut[j]
    return [[r for r, n in enumerate(lengths) if n in g] for g in reversed(groups)]


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
    if sum(lengths) > WORTH_PACKING * b * width:
        return None
    dev = attention_mask.device
    groups = bucket_rows(lengths)
    order = [r for g in groups for r in g]  # the sequence holds the rows bucket by bucket
    at, offset = 0, [0] * b
    for r in order:
        offset[r] = at
        at += lengths[r]
    length_t = torch.tensor(lengths, device=dev)
    seq_rows = torch.tensor(order, device=dev)
    take = (seq_rows * width + torch.tensor(first, device=dev)[seq_rows]).repeat_interleave(length_t[seq_rows])
    positions = torch.cat([torch.arange(lengths[r], device=dev) for r in order])
    take = take + positions
    back = torch.zeros(b * width, dtype=torch.long, device=dev)
    back[take] = torch.arange(len(take), device=dev)
    buckets = []
    for g in groups:
        rows = torch.tensor(g, device=dev)
        n = max(lengths[r] for r in g)
        span = torch.arange(n, device=dev)[None, :]
        valid = span < length_t[rows][:, None]
        index = torch.where(valid, torch.tensor([offset[r] for r in g], device=dev)[:, None] + span, 0)
        mask = valid[:, None, None, :].expand(len(g), 1, n, n)
        if causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        buckets.append(Bucket(rows, index, valid, valid.reshape(-1).nonzero().squeeze(1), mask))
    return Packing(take, back, positions[None], real, buckets)
