"""Serving prompts read with template.multi_token=full (whole label words, teacher-forced) beside ordinary ones:
their rows run as their own sub-batches inside a mixed batch and still score what each prompt scores alone."""

from __future__ import annotations

import pytest
import torch

from ptune.inference import load_task
from ptune.serving import PromptServer

from .helpers import SENTENCES, batch, logits, make_cfg
from .test_serving import save_prompt

FULL_WORDS = {"negative": ["unwatchable", "bad"], "positive": ["great", "splendiferous"]}  # 1 to 5 word pieces

PROMPTS = {
    "gpt2": [
        ("full_soft", "soft_prompt", dict(prompt_length=3), True),
        ("first_v2", "ptuning_v2", dict(prompt_length=2), False),
        ("full_prefix", "prefix", dict(prompt_length=4, template="Text: {text_a} Mood: {mask}"), True),
    ],
    "t5": [
        ("full_v2", "ptuning_v2", dict(prompt_length=2), True),
        ("first_soft", "soft_prompt", dict(prompt_length=3), False),
    ],
}


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_full_prompts_in_mixed_batches_equal_each_prompt_alone(tiny_models, tmp_path, kind):
    family = "causal" if kind == "gpt2" else "seq2seq"
    paths = []
    for seed, (name, method, kw, full) in enumerate(PROMPTS[kind]):
        cfg = make_cfg(tiny_models[kind], method, family=family, extra=["backbone.dtype=float32"], **kw)
        if full:
            cfg.template.label_words = FULL_WORDS
            cfg.template.multi_token = "full"
        paths.append(save_prompt(tmp_path, name, cfg, seed))
    alone = []
    for p in paths:
        task, _, _, _ = load_task(p)
        _, b = batch(task, SENTENCES)
        alone.append(logits(task, b))
    full_rows = [i for i, (*_, full) in enumerate(PROMPTS[kind]) if full]
    assert all(bool((alone[i] <= 0).all()) for i in full_rows)  # whole-word log-likelihoods, not first-token logits
    server = PromptServer([str(p) for p in paths])
    assert [p.mixable for p in server.prompts] == [not full for *_, full in PROMPTS[kind]]
    requests = [(i, {"text_a": s}) for s in SENTENCES for i in range(len(paths))]
    for batch_size in (len(requests), 4, 1):  # one mixed batch; small batches mixing full and other rows; single rows
        scores = server.scores(requests, batch_size=batch_size)
        for (i, ex), s in zip(requests, scores, strict=True):
            torch.testing.assert_close(s, alone[i][SENTENCES.index(ex["text_a"])], atol=1e-5, rtol=0)
