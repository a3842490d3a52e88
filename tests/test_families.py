"""Backbone families and self-describing tuners: detection, each family's forward against the backbone's own,
and that every method declares what the rest of ptune asks of it (so a new one is picked up by registering it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

from ptune.families import CAUSAL, ENCODER, FAMILIES, SEQ2SEQ, detect_family
from ptune.tuners import METHODS, MethodConfig, Tuner, TunerContext

from .helpers import batch, make_cfg, make_task

TINY_FAMILY = {"bert": ENCODER, "t5": SEQ2SEQ, "gpt2": CAUSAL, "llama": CAUSAL}


@pytest.mark.parametrize(
    "config,family",
    [
        (BertConfig(), ENCODER),
        (BertConfig(is_decoder=True), CAUSAL),  # BertLMHeadModel
        (T5Config(), SEQ2SEQ),
        (GPT2Config(), CAUSAL),
        (LlamaConfig(), CAUSAL),
    ],
)
def test_detection(config, family):
    found = detect_family(config)
    assert found is family and found == family.name and str(found) == family.name


def test_families_have_distinct_names():
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)


@pytest.mark.parametrize("kind", list(TINY_FAMILY))
def test_family_forward_equals_backbone_forward(tiny_models, kind, monkeypatch):
    """No prompt: the family's run + answer logits are the backbone's own logits at the answer."""
    family = TINY_FAMILY[kind]
    template_family = {ENCODER: "mlm", SEQ2SEQ: "seq2seq", CAUSAL: "causal"}[family]
    task = make_task(make_cfg(tiny_models[kind], "soft_prompt", family=template_family, prompt_length=0))
    pm, bb = task.model, task.model.backbone
    assert pm.family is family and task.backbone.family is family and task.left_pad == family.left_pad
    side = family.left_pad
    with monkeypatch.context() as m:  # the task reads the family's padding side, it keeps no copy of it
        m.setattr(type(family), "left_pad", not side)
        assert task.left_pad is (not side)
    _, b = batch(task)
    ids, mask, answer = b["input_ids"], b["attention_mask"], b["answer_pos"]
    pm.eval()
    with torch.no_grad():
        got = family.answer_logits(bb, family.run(pm, pm.embed(ids), mask), answer, None)
        extra = family.forward_inputs(bb, ids.shape[0], ids.device)
        if family.causal_attention:
            extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0
        ref = bb(input_ids=ids, attention_mask=mask, **extra).logits
        ref = ref[:, 0] if family is SEQ2SEQ else ref[torch.arange(len(ids)), answer]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_tuner_describes_itself(name):
    tuner = METHODS[name]
    assert "config_class" in vars(tuner) and issubclass(tuner.config_class, MethodConfig)
    assert tuner.config_class.name == name
    for flag in ("is_deep", "uses_soft_tokens", "folds_at_save"):
        assert isinstance(getattr(tuner, flag), bool), flag
    assert tuner.is_deep or tuner.uses_soft_tokens, "a method must produce soft tokens or deep prefixes"
    assert tuner.peft_type in ("PROMPT_TUNING", "PREFIX_TUNING", None)


@dataclass
class _FakeConfig(MethodConfig):
    name: str = "fake"
    prompt_length: int = 2


class _FakeTuner(Tuner):
    """Zero soft vectors, or zero deep prefixes: a method that only exists in this test."""

    config_class = _FakeConfig

    def __init__(self, config: _FakeConfig, ctx: TunerContext, tokenizer, generator: torch.Generator):
        super().__init__()
        self.config = config
        self.sites = len(ctx.sites)
        self.vectors = nn.Parameter(torch.zeros(ctx.num_soft, ctx.hidden_size))
        self.prefix = nn.Parameter(
            torch.zeros(len(ctx.sites), 2, ctx.sites[0].heads, config.prompt_length, ctx.sites[0].head_dim)
            if ctx.sites
            else torch.zeros(0)
        )

    def soft_vectors(self) -> torch.Tensor | None:
        return self.vectors if self.uses_soft_tokens else None

    def deep_prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        return [(site[0].unsqueeze(0), site[1].unsqueeze(0)) for site in self.prefix] if self.is_deep else None

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"fake": (self.prefix if self.is_deep else self.vectors).detach()}

    def load_exported(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            (self.prefix if self.is_deep else self.vectors).copy_(state["fake"])


class _FakeSoft(_FakeTuner):
    uses_soft_tokens = True


class _FakeDeep(_FakeTuner):
    is_deep = True


@pytest.mark.parametrize("tuner", [_FakeSoft, _FakeDeep])
def test_a_registered_method_is_built_without_other_edits(tiny_models, monkeypatch, tuner):
    monkeypatch.setitem(METHODS, "fake", tuner)
    cfg = make_cfg(tiny_models["llama"], "soft_prompt", family="causal")
    cfg.method = {"name": "fake", "prompt_length": 2}
    task = make_task(cfg)
    assert type(task.model.tuner) is tuner
    assert task.renderer.num_soft == (2 if tuner.uses_soft_tokens else 0)
    assert task.model.tuner.sites == (2 if tuner.is_deep else 0)  # one self-attention site per tiny llama layer
    _, b = batch(task)
    scores = task.model(b["input_ids"], b["attention_mask"], b["answer_pos"])
    assert scores.shape == (b["input_ids"].shape[0], 2) and torch.isfinite(scores).all()


def test_no_module_outside_the_homes_branches_on_a_family_or_method_name():
    """Family facts live in ptune/families/, method facts in ptune/tuners/: code elsewhere asks the object
    (``family.writes_in_decoder``, ``tuner.is_deep``) instead of comparing its name with a literal."""
    import re

    import ptune

    root = Path(ptune.__file__).parent
    families = "|".join(f.name for f in FAMILIES)
    methods = "|".join(METHODS)
    literal = rf"""["']({families}|{methods})["']"""
    pattern = re.compile(rf"(==|!=)\s*{literal}|{literal}\s*(==|!=)|\bin\s*\(\s*{literal}")
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("families/", "tuners/")):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"ptune/{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
