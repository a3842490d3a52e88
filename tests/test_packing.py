"""Packed forwards (ptune/packing.py): rows end to end in shared sequences give what each row gives padded."""

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


def test_rows_are_laid_end_to_end_with_their_own_positions_and_mask():
    lengths = [10, 2, 3, 5]
    plan = packing.plan(right_padded(lengths))
    assert plan is not None and plan.width == 10
    assert plan.rows == [[0], [3, 2, 1]]  # first fit, longest first
    assert plan.segment[1].tolist() == [3] * 5 + [2] * 3 + [1] * 2
    assert plan.positions[1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]  # every row starts at position 0
    mask = plan.mask()[:, 0]
    assert mask[1, 5, 5:8].all() and not mask[1, 5, :5].any() and not mask[1, 5, 8:].any()
    # a tensor in the padded layout survives packing and unpacking, with zeros on the padding
    x = torch.randn(4, 10, 3)
    real = right_padded(lengths).bool()
    back = plan.unpack(plan.pack(x))
    torch.testing.assert_close(back[real], x[real])
    assert (back[~real] == 0).all()


def test_left_padded_rows_pack_and_a_decoder_sees_only_earlier_tokens_of_its_row():
    lengths = [10, 2, 3, 5]
    left = right_padded(lengths).flip(1)  # a decoder's batch: padding on the left
    plan = packing.plan(left, causal=True)
    assert plan.rows == [[0], [3, 2, 1]] and plan.positions[1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    x = torch.randn(4, 10, 3)
    real = left.bool()
    torch.testing.assert_close(plan.pack(x)[1, :5], x[3, 5:])  # row 3's 5 tokens sit at the end of its padded row
    back = plan.unpack(plan.pack(x))
    torch.testing.assert_close(back[real], x[real])
    assert (back[~real] == 0).all()
    mask = plan.mask()[1, 0]
    assert mask[6, 5:7].all() and not mask[6, 7] and not mask[6, :5].any()  # row 2's 2nd token: its 1st and itself


@pytest.mark.parametrize(
    "mask",
    [
        right_padded([7, 7, 7]),  # no padding to save
        right_padded([7]),  # one row
        torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [1, 0, 0, 0, 0]]),  # padding inside a row
        torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0]]),  # an empty row
    ],
    ids=["equal", "one-row", "hole", "empty-row"],
)
def test_batches_that_would_not_gain_stay_padded(mask):
    assert packing.plan(mask) is None


def test_each_token_sees_only_its_own_rows_prefix():
    plan = packing.plan(right_padded([6, 2, 3]))
    assert plan.rows == [[0], [2, 1]]
    prompt, slot, keep = packing.prefix_slots(plan, prompt_of_row=[0, 1, 2], prefix_len=[4, 0, 2])
    # bin 1 holds row 2 (prompt 2: 2 prefix slots) then row 1 (prompt 1: none), padded to bin 0's 4 slots
    assert prompt[1].tolist()[:2] == [2, 2] and slot[1].tolist()[:2] == [0, 1]
    assert keep[1, :3, :2].all() and not keep[1, :3, 2:].any()  # row 2's tokens: its 2 slots
    assert not keep[1, 3:5].any()  # row 1's tokens: no prefix
    assert keep[0, :6].all()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_packed_mixed_batch_equals_padded(tiny_models, tmp_path, monkeypatch, amp, kind):
    """Soft prompts, P-tuning v1 (soft slots inside the text), v2 and prefix tuning (deep prefixes of different
    lengths) and a mean-pooled head, mixed in one batch of rows of different lengths: right padded on an encoder,
    left padded on a decoder (causal within each row)."""
    paths = [str(p) for p in make_prompts(tiny_models, kind, tmp_path)]
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
    assert plans and all(p is not None and p.bins < len(requests) for p in plans)  # it really packed
    want = padded_server.scores(requests, batch_size=len(requests))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=close(amp, 1e-5), rtol=close(amp, 0))
