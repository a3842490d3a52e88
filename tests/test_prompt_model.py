"""Correctness of every method on every backbone family, on tiny random models.

For each method x family: only the method's parameters change in training (checked on the weights), every
trainable parameter gets a non-zero gradient, length 0 equals the bare backbone, a saved prompt reloads to
identical logits, left/right padding agree, and a batch of one equals its row in a padded batch. The first three
run under fp32 and under bf16 autocast (the ``amp`` fixture).
"""

from __future__ import annotations

import pytest
import torch

from ptune.batching import collate
from ptune.checkpoint import save_checkpoint
from ptune.inference import load_task
from ptune.template import SOFT_ID
from ptune.tuners import METHODS as METHOD_REGISTRY

from .helpers import FAMILY_TEMPLATES, LABELS, SENTENCES, amp_context, batch, close, logits, make_cfg, make_task

FAMILIES = {  # tiny model kind -> template family
    "bert": "mlm",
    "t5": "seq2seq",
    "mt5": "seq2seq",
    "gpt2": "causal",
    "llama": "causal",
    "gemma3": "causal",
}
METHODS = list(METHOD_REGISTRY)  # every registered method: a new one is tested without editing this file
GRID = [(m, k) for m in METHODS for k in FAMILIES] + [(m, "bert-head") for m in METHODS]


def _cfg(tiny_models, method, kind, **kw):
    if kind == "bert-head":
        return make_cfg(tiny_models["bert"], method, readout="head", **kw)
    return make_cfg(tiny_models[kind], method, family=FAMILIES[kind], **kw)


def _perturb(task, scale: float = 0.1):
    """Move every prompt parameter away from its init so that tests see a non-trivial prompt."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in task.model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("method,kind", GRID)
def test_only_method_parameters_change(tiny_models, method, kind, amp):
    task = make_task(_cfg(tiny_models, method, kind, prompt_length=3))
    model = task.model
    frozen_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainable = dict(model.tuner.named_parameters()) | {
        f"readout.{k}": v for k, v in model.readout.named_parameters()
    }
    trainable = {k: v for k, v in trainable.items() if v.requires_grad}
    before = {k: v.detach().clone() for k, v in trainable.items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    _, b = batch(task)
    model.train()
    with amp_context(amp):
        out = model(b["input_ids"], b["attention_mask"], b["answer_pos"])
    torch.nn.functional.cross_entropy(out.float(), b["labels"]).backward()
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert all(p.grad is None for p in model.backbone.parameters()), "frozen backbone received gradients"
    opt.step()
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, frozen_before[name]), f"backbone weight {name} changed"
    for name, p in trainable.items():
        assert not torch.equal(p.detach(), before[name]), f"trainable {name} did not change"


def _bare_logits(task, b, amp=None):
    """The backbone alone, through its own forward, read out the same way."""
    model, bb = task.model, task.model.backbone
    ids = b["input_ids"]
    assert not (ids == SOFT_ID).any()
    rows = torch.arange(ids.shape[0])
    with torch.no_grad(), amp_context(amp):
        if model.family == "seq2seq":
            start = bb.config.decoder_start_token_id or 0
            dec = torch.full((ids.shape[0], 1), start, dtype=torch.long)
            vocab = bb(input_ids=ids, attention_mask=b["attention_mask"], decoder_input_ids=dec).logits[:, 0]
            return model.readout(vocab).float()
        if task.verbalizer is None:
            hidden = bb(input_ids=ids, attention_mask=b["attention_mask"]).last_hidden_state
            return model.readout(hidden, b["attention_mask"]).float()
        kwargs = {}
        if model.family == "causal":
            kwargs["position_ids"] = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        vocab = bb(input_ids=ids, attention_mask=b["attention_mask"], **kwargs).logits[rows, b["answer_pos"]]
        return model.readout(vocab).float()


@pytest.mark.parametrize("method,kind", [(m, k) for m, k in GRID if m != "ptuning_v1"])
def test_length_zero_equals_bare_backbone(tiny_models, method, kind, amp):
    task = make_task(_cfg(tiny_models, method, kind, prompt_length=0))
    _, b = batch(task)
    got = logits(task, b, amp)
    ref = _bare_logits(task, b, amp)
    torch.testing.assert_close(got, ref, rtol=0, atol=close(amp, 1e-5))


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_ptuning_v1_without_virtual_tokens_equals_bare_backbone(tiny_models, kind):
    task = make_task(
        _cfg(tiny_models, "ptuning_v1", kind, prompt_length=0, template=FAMILY_TEMPLATES[FAMILIES[kind]])
    )
    _, b = batch(task)
    torch.testing.assert_close(logits(task, b), _bare_logits(task, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,kind", GRID)
def test_prompt_changes_logits_and_reloads_identically(tiny_models, method, kind, tmp_path, amp):
    cfg = _cfg(tiny_models, method, kind, prompt_length=3)
    task = make_task(cfg)
    _perturb(task, 5.0)  # large: on these tiny random models a small deep prompt hardly moves an MLM's scores
    _, b = batch(task)
    before = logits(task, b, amp)
    save_checkpoint(tmp_path / "checkpoint", task.model, cfg, {"label_names": LABELS})
    reloaded, _, _, _ = load_task(tmp_path)
    after = logits(reloaded, b, amp)
    if amp is not None and task.model.tuner.folds_at_save:
        # A reparameterised prompt (P-tuning v1's encoder, prefix tuning's MLP) is saved as the fp32 vectors it
        # computes; the live model computes them under autocast. The reference is the live model with its
        # reparameterisation evaluated in fp32 (what the checkpoint stores): everything else is the same computation.
        tuner = task.model.tuner
        with torch.no_grad():
            vectors, prefixes = tuner.soft_vectors(), tuner.deep_prefixes() if tuner.is_deep else None
        tuner.soft_vectors, tuner.deep_prefixes = (lambda: vectors), (lambda: prefixes)
        assert (before - logits(task, b, amp)).abs().max() > 0, "bf16 did not change the reparameterisation"
        before = logits(task, b, amp)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    bare = make_task(
        _cfg(
            tiny_models,
            method,
            kind,
            prompt_length=0,
            template=None if kind == "bert-head" else FAMILY_TEMPLATES[FAMILIES[kind]],
        )
    )
    _, b0 = batch(bare)
    spread = float(before.max() - before.min())
    moved = float((logits(bare, b0, amp) - before).abs().max())  # measured: at least 5% of the spread on every case
    assert moved > 0.02 * spread, f"the prompt moves the scores by {moved:.2e} only ({spread=:.2e})"


@pytest.mark.parametrize("method,kind", GRID)
def test_padding_side_and_batch_of_one(tiny_models, method, kind):
    task = make_task(_cfg(tiny_models, method, kind, prompt_length=3))
    _perturb(task)
    enc, right = batch(task, left_pad=False)
    _, left = batch(task, left_pad=True)
    assert right["attention_mask"].min() == 0, "test batch should contain padding"
    lr, ll = logits(task, right), logits(task, left)
    torch.testing.assert_close(lr, ll, rtol=0, atol=2e-5)
    for i in range(len(SENTENCES)):
        one = collate(enc, [i], task.model.pad_id, task.left_pad)
        torch.testing.assert_close(logits(task, one)[0], lr[i], rtol=0, atol=2e-5)


@pytest.mark.parametrize("method,kind", GRID)
def test_batches_padded_to_a_width_multiple_give_the_same_logits(tiny_models, method, kind):
    """trainer.pad_to_multiple_of only adds padding: every family masks it (and places positions) the same."""
    task = make_task(_cfg(tiny_models, method, kind, prompt_length=3))
    _perturb(task)
    enc, _ = batch(task)
    short = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))[:3]
    natural = collate(enc, short, task.model.pad_id, task.left_pad)
    enc.width_multiple = enc.longest  # as wide as the data allows: the most padding rounding can add
    padded = collate(enc, short, task.model.pad_id, task.left_pad)
    assert padded["input_ids"].shape[1] > natural["input_ids"].shape[1]
    torch.testing.assert_close(logits(task, padded), logits(task, natural), rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", ["ptuning_v2", "prefix"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_unpadded_deep_prompt_rows_take_the_lower_right_causal_form(tiny_models, method, kind, monkeypatch):
    """On CUDA a batch without padding attends "every prefix slot, then causal" through a lower-right CausalBias
    (flash attention, no mask tensor). Forced on here, where it is materialised: same logits, same gradients.
    (Gemma 3 always hands its layers a mask, sliding-window or full, so it keeps the mask tensor.)"""
    from ptune.tuners import deep_attention

    task = make_task(_cfg(tiny_models, method, kind, prompt_length=3))
    _perturb(task)
    enc, _ = batch(task)
    one = collate(enc, [1], task.model.pad_id, task.left_pad)  # one row: nothing to pad

    def scores_and_grads():
        task.model.zero_grad()
        out = task.model(one["input_ids"], one["attention_mask"], one["answer_pos"])
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in task.model.trainable_parameters()]

    want = scores_and_grads()
    calls = []
    original = deep_attention.causal_lower_right
    monkeypatch.setattr(deep_attention, "LOWER_RIGHT_DEVICES", {"cpu"})
    monkeypatch.setattr(deep_attention, "causal_lower_right", lambda *a: calls.append(a) or original(*a))
    got = scores_and_grads()
    assert calls, "the lower-right form was never used"
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2e-5)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


SHARED_PREFIX_CASES = [
    (method, kind, length, template)
    for kind in ("gpt2", "llama", "gemma3")
    for method, length, template in (
        ("soft_prompt", 3, None),  # soft tokens prepended after the special-token frame
        ("ptuning_v1", 3, None),  # 3 prepended + {soft:"the movie"} shared; {soft:2} later stays per row
        ("ptuning_v1", 0, "{text_a} {soft:2} It was {mask}"),  # nothing to share: the plain path
    )
]


@pytest.mark.parametrize("method,kind,length,template", SHARED_PREFIX_CASES)
def test_shared_prefix_forward_equals_whole_rows(tiny_models, method, kind, length, template):
    """A causal LM computes the prompt that opens every row once per batch: same logits and same gradients as
    running every row whole, with left and right padding."""
    task = make_task(_cfg(tiny_models, method, kind, prompt_length=length, template=template))
    model = task.model
    assert model.share_prefix == (template is None)
    _perturb(task)
    for left in (True, False):
        _, b = batch(task, left_pad=left)
        results = []
        for share in (True, False):
            model.share_prefix = share and template is None
            model.zero_grad(set_to_none=True)
            out = model(b["input_ids"], b["attention_mask"], b["answer_pos"])
            torch.nn.functional.cross_entropy(out, b["labels"]).backward()
            grads = [p.grad.clone() for p in model.trainable_parameters()]
            results.append((out.detach(), grads))
        (shared, g_shared), (whole, g_whole) = results
        torch.testing.assert_close(shared, whole, rtol=0, atol=2e-5)
        for a, c in zip(g_shared, g_whole, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    model.share_prefix = template is None


def test_shared_prefix_runs_the_prompt_once(tiny_models):
    """The saving is real: the shared path feeds the backbone 1 prompt row plus the rows without their prompt."""
    task = make_task(_cfg(tiny_models, "soft_prompt", "llama", prompt_length=5))
    model = task.model
    _, b = batch(task)
    seen = []
    hook = model.body.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        logits(task, b)
    finally:
        hook.remove()
    k = model.shared_prefix[0]
    width = b["input_ids"].shape[1]
    assert seen == [(1, k), (len(SENTENCES), width - k)]


def test_evaluation_runs_the_shared_prefix_once_for_all_batches(tiny_models):
    """predict_logits keeps the prefix's keys/values across batches (the prompt is frozen there): one prefix
    forward for three batches, and the same logits as computing it in every batch."""
    from ptune.evaluate import predict_logits

    task = make_task(_cfg(tiny_models, "soft_prompt", "llama", prompt_length=5))
    _perturb(task)
    enc, b = batch(task)
    k = task.model.shared_prefix[0]
    seen = []
    hook = task.model.body.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        got = predict_logits(task.model, enc, 2, torch.device("cpu"), None, task.left_pad)
    finally:
        hook.remove()
    assert seen[0] == (1, k) and [rows for rows, _ in seen[1:]] == [2, 2, 2]
    assert task.model._prefix_kv is None  # nothing kept after evaluation
    torch.testing.assert_close(got, logits(task, b), rtol=0, atol=2e-5)
