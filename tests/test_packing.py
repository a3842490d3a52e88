"""Packed forwards (ptune/packing.py): rows end to end in one sequence, attending per row, give what each row gives
padded."""

from __future__ import annotations

import pytest
import torch

from ptune import packing
from ptune.serving import PromptServer

from .helpers import SENTENCES, close
from .test_serving import make_prompts


def right_padded(lengths: list[int]) -> torch.Tensor:
    width = max(lengths)
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def _rows_of(plan) -> list[list[int]]:
    return [b.rows.tolist() for b in plan.buckets]


def test_rows_are_laid_end_to_end_with_their_own_positions_and_attention():
    lengths = [10, 2, 3, 5]
    plan = packing.plan(right_padded(lengths))
    assert plan is not None and plan.tokens == 20 and plan.positions.shape == (1, 20)
    assert sorted(r for rows in _rows_of(plan) for r in rows) == [0, 1, 2, 3]
    x = torch.randn(4, 10, 3)
    seq = plan.pack(x)[0]
    starts = {}
    for b in plan.buckets:
        for j, r in enumerate(b.rows.tolist()):
            n = lengths[r]
            assert b.valid[j].tolist() == [k < n for k in range(b.index.shape[1])]
            torch.testing.assert_close(seq[b.index[j, :n]], x[r, :n])  # the bucket gathers row r's own tokens
            starts[r] = int(b.index[j, 0])
            assert plan.positions[0, starts[r]: starts[r] + n].tolist() == list(range(n))  # restarting at 0
            # every query of the row sees the row's real tokens and nothing else (encoder: both directions)
            assert (b.mask[j, 0, :, :n]).all() and not b.mask[j, 0, :, n:].any()
    # a tensor in the padded layout survives packing and unpacking, with zeros on the padding
    real = right_padded(lengths).bool()
    back = plan.unpack(plan.pack(x))
    torch.testing.assert_close(back[real], x[real])
    assert (back[~real] == 0).all()


def test_left_padded_rows_pack_and_a_decoder_sees_only_earlier_tokens_of_its_row():
    lengths = [10, 2, 3, 5]
    left = right_padded(lengths).flip(1)  # a decoder's batch: padding on the left
    plan = packing.plan(left, causal=True)
    x = torch.randn(4, 10, 3)
    seq = plan.pack(x)[0]
    for b in plan.buckets:
        for j, r in enumerate(b.rows.tolist()):
            n = lengths[r]
            torch.testing.assert_close(seq[b.index[j, :n]], x[r, 10 - n:])  # the end of its padded row
            sees = b.mask[j, 0, :n, :n]
            assert torch.equal(sees, torch.ones(n, n, dtype=torch.bool).tril())  # causal within the row
            assert not b.mask[j, 0, :, n:].any()
    real = left.bool()
    back = plan.unpack(plan.pack(x))
    torch.testing.assert_close(back[real], x[real])
    assert (back[~real] == 0).all()


def test_rows_are_bucketed_where_padding_costs_more_than_a_bucket():
    """Attention runs per bucket of similar lengths: one more bucket costs ``BUCKET_OVERHEAD`` attention pairs, a
    row padded to its bucket's longest ``length ** 2``."""
    short, long = 10, 60
    assert 16 * (long**2 - short**2) > packing.BUCKET_OVERHEAD  # splitting these saves more than a bucket costs
    lengths = [short, long] * 16
    assert packing.bucket_rows(lengths) == [list(range(0, 32, 2)), list(range(1, 32, 2))]
    near = [20, 21, 22]  # 3 rows padded by 1-2 tokens: far less than a bucket
    assert packing.bucket_rows(near) == [[0, 1, 2]]
    plan = packing.plan(right_padded(lengths))
    assert [sorted(r) for r in _rows_of(plan)] == [list(range(0, 32, 2)), list(range(1, 32, 2))]
    assert [b.index.shape[1] for b in plan.buckets] == [short, long]  # each padded to its own longest


@pytest.mark.parametrize(
    "mask",
    [
        right_padded([7, 7, 7]),  # no padding to save
        right_padded([7, 7, 7, 7, 7, 7, 7, 7, 7, 6]),  # too little to save (98% of the padded tokens are real)
        right_padded([7]),  # one row
        torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [1, 0, 0, 0, 0]]),  # padding inside a row
        torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0]]),  # an empty row
    ],
    ids=["equal", "little", "one-row", "hole", "empty-row"],
)
def test_batches_that_would_not_gain_stay_padded(mask):
    assert packing.plan(mask) is None


@pytest.mark.parametrize("prompts", ["all", "shallow"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_packed_mixed_batch_equals_padded(tiny_models, tmp_path, monkeypatch, amp, kind, prompts):
    """Soft prompts, P-tuning v1 (soft slots inside the text), v2 and prefix tuning (deep prefixes of different
    lengths) and a mean-pooled head, mixed in one batch of rows of different lengths: right padded on an encoder,
    left padded on a decoder (causal within each row). "shallow": no deep prompt among them, so nothing but the
    server itself routes the backbone's attention through ptune's attention function, which packed rows need."""
    paths = [str(p) for p in make_prompts(tiny_models, kind, tmp_path)]
    if prompts == "shallow":
        paths = paths[:2]  # a soft prompt and P-tuning v1
    precision = "fp32" if amp is None else "bf16"
    packed_server = PromptServer(paths, precision=precision)
    padded_server = PromptServer(paths, precision=precision, pack=False)
    assert packed_server.packs_rows and not padded_server.packs_rows
    plans = []
    plan = packing.plan
    monkeypatch.setattr(packing, "plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    sentences = [*SENTENCES, "bad", SENTENCES[1] + " " + SENTENCES[2]]
    requests = [(i, {"text_a": s}) for s in sentences for i in range(len(paths))]
    got = packed_server.scores(requests, batch_size=len(requests))
    assert plans and all(p is not None and p.tokens < p.real.numel() for p in plans)  # it really packed
    want = padded_server.scores(requests, batch_size=len(requests))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=close(amp, 1e-5), rtol=close(amp, 0))
    # one prompt's rows alone (its prefix broadcast to every row), for the last prompt: deep unless "shallow"
    alone = [(len(paths) - 1, {"text_a": s}) for s in sentences]
    plans.clear()
    got = packed_server.scores(alone, batch_size=len(alone))
    assert plans and all(p is not None for p in plans)
    for g, w in zip(got, padded_server.scores(alone, batch_size=len(alone)), strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=close(amp, 1e-5), rtol=close(amp, 0))
