"""Multi-prompt serving: a batch mixing prompts gives, row by row, what each prompt gives alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ptune.checkpoint import save_checkpoint
from ptune.errors import PtuneError
from ptune.inference import load_task
from ptune.serving import PromptServer
from ptune.training import checkpoint_meta

from .helpers import SENTENCES, batch, close, logits, make_cfg, make_task


def save_prompt(root: Path, name: str, cfg, seed: int = 0) -> Path:
    """A checkpoint with randomly moved prompt/head values (so that every prompt differs), no training."""
    task = make_task(cfg, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in task.model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * (p.std() if p.numel() > 1 else 1.0))
    out = root / name
    save_checkpoint(out / "checkpoint", task.model, cfg, checkpoint_meta(task, cfg))
    return out


PROMPTS = {
    "bert": [
        ("soft4", "soft_prompt", dict(prompt_length=4)),
        ("v1_middle", "ptuning_v1", dict(prompt_length=0)),  # {soft:2} {text_a} {soft} ...: soft slots inside
        ("v2_len3", "ptuning_v2", dict(prompt_length=3, template="Review: {text_a} Overall {mask}!")),
        ("prefix5_head", "prefix", dict(prompt_length=5, readout="head")),
    ],
    "llama": [
        ("soft4", "soft_prompt", dict(prompt_length=4, family="causal")),
        ("v1", "ptuning_v1", dict(prompt_length=2, family="causal")),
        ("v2_len3", "ptuning_v2", dict(prompt_length=3, family="causal")),
        ("prefix6", "prefix", dict(prompt_length=6, family="causal", template="Text: {text_a} Mood: {mask}")),
    ],
    "t5": [
        ("soft3", "soft_prompt", dict(prompt_length=3, family="seq2seq")),
        ("v2_len2", "ptuning_v2", dict(prompt_length=2, family="seq2seq")),
        ("prefix4", "prefix", dict(prompt_length=4, family="seq2seq")),
    ],
}


def make_prompts(tiny_models, kind: str, root: Path) -> list[Path]:
    paths = []
    for seed, (name, method, kw) in enumerate(PROMPTS[kind]):
        cfg = make_cfg(tiny_models[kind], method, extra=["backbone.dtype=float32"], **kw)
        paths.append(save_prompt(root, name, cfg, seed))
    return paths


@pytest.mark.parametrize("kind", ["bert", "llama", "t5"])
def test_mixed_batch_equals_each_prompt_alone(tiny_models, tmp_path, kind, amp):
    paths = make_prompts(tiny_models, kind, tmp_path)
    sentences = SENTENCES
    alone = []
    for p in paths:
        task, _, _, _ = load_task(p)
        _, b = batch(task, sentences)
        alone.append(logits(task, b, amp))
    # Per-prompt results really differ (otherwise the comparison would prove little).
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)
    server = PromptServer([str(p) for p in paths], precision="fp32" if amp is None else "bf16")
    # Every (sentence, prompt) pair in one interleaved request list; one mixed batch, then small mixed batches.
    requests = [(i, {"text_a": s}) for s in sentences for i in range(len(paths))]
    for batch_size in (len(requests), 5):
        scores = server.scores(requests, batch_size=batch_size)
        for (i, ex), s in zip(requests, scores, strict=True):
            ref = alone[i][sentences.index(ex["text_a"])]
            torch.testing.assert_close(s.float(), ref, atol=close(amp, 1e-5), rtol=close(amp, 0))


def test_per_row_soft_vectors_pad_shorter_prompts(tiny_models):
    task = make_task(make_cfg(tiny_models["bert"], "soft_prompt", prompt_length=4))
    _, b = batch(task)
    model = task.model
    vectors = model.tuner.soft_vectors().detach()
    padded = torch.cat([vectors, torch.randn(3, vectors.shape[1])])  # 3 padding slots nobody reads
    per_row = padded.unsqueeze(0).expand(b["input_ids"].shape[0], -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(b["input_ids"], per_row), model.embed(b["input_ids"]))


def test_other_backbone_refused(tiny_models, tmp_path):
    a = save_prompt(tmp_path, "bert", make_cfg(tiny_models["bert"], "soft_prompt", prompt_length=2))
    b = save_prompt(tmp_path, "gpt2", make_cfg(tiny_models["gpt2"], "soft_prompt", prompt_length=2, family="causal"))
    with pytest.raises(PtuneError, match="different backbones"):
        PromptServer([str(a), str(b)])
    # Same name, other weights: the identity saved in meta.json decides.
    meta_path = b / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["backbone"] = {**json.loads((a / "checkpoint" / "meta.json").read_text())["backbone"], "sha256": "0" * 64}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PtuneError, match="sha256"):
        PromptServer([str(a), str(b)])


def test_served_backbone_is_quantized_as_the_checkpoint_says(tiny_models, tmp_path):
    """A prompt trained on an int8 backbone is served on an int8 backbone (the server used to load full precision
    whatever backbone.quantize said), and prompts of differently quantised backbones are not mixed."""
    cfg = make_cfg(tiny_models["llama"], "ptuning_v2", prompt_length=3, family="causal",
                   extra=["backbone.dtype=float32", "backbone.quantize=int8"])
    path = save_prompt(tmp_path, "int8", cfg)
    task, _, _, _ = load_task(path)
    _, b = batch(task, SENTENCES)
    alone = logits(task, b)
    full, _, _, _ = load_task(path, ["backbone.quantize=none"])
    assert not torch.allclose(alone, logits(full, b), atol=1e-6)  # int8 really changes the scores
    served = PromptServer([str(path)]).scores([(0, {"text_a": s}) for s in SENTENCES])
    torch.testing.assert_close(torch.stack(served), alone, atol=1e-5, rtol=0)
    plain = save_prompt(tmp_path, "plain", make_cfg(tiny_models["llama"], "ptuning_v2", prompt_length=3,
                                                    family="causal", extra=["backbone.dtype=float32"]))
    with pytest.raises(PtuneError, match="backbone.quantize"):
        PromptServer([str(path), str(plain)])


def test_every_served_checkpoint_goes_through_the_one_loader(tiny_models, tmp_path, monkeypatch):
    """Serving reads, overrides and rebuilds each checkpoint with inference's loader (the one load_task uses), so
    checkpoint reading, override application and the backbone identity check exist once."""
    from ptune import inference, serving

    paths = [save_prompt(tmp_path, n, make_cfg(tiny_models["bert"], "soft_prompt", prompt_length=k))
             for n, k in (("a", 2), ("b", 3))]
    read, built = [], []
    real_read, real_rebuild = inference.read_saved, inference.rebuild

    def spy_read(path, overrides=()):
        read.append((Path(path), list(overrides)))
        return real_read(path, overrides)

    def spy_rebuild(saved, backbone=None):
        built.append((saved.checkpoint, backbone))
        return real_rebuild(saved, backbone)

    monkeypatch.setattr(inference, "read_saved", spy_read)
    monkeypatch.setattr(inference, "rebuild", spy_rebuild)
    monkeypatch.setattr(serving, "read_saved", spy_read, raising=False)
    monkeypatch.setattr(serving, "rebuild", spy_rebuild, raising=False)
    server = PromptServer([str(p) for p in paths], overrides=["trainer.eval_batch_size=3"])
    assert read == [(p, ["trainer.eval_batch_size=3"]) for p in paths]
    assert [c for c, _ in built] == [p / "checkpoint" for p in paths]
    assert all(b is server.backbone for _, b in built)  # one backbone, shared
    assert all(p.cfg.trainer.eval_batch_size == 3 for p in server.prompts)
