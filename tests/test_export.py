"""`ptune export --format peft`: PEFT reloads the folder onto a fresh base model and computes ptune's logits."""

from __future__ import annotations

import json

import peft  # a pinned dev dependency: if it breaks, these tests must fail, not skip silently
import pytest
import torch

from ptune.errors import PtuneError
from ptune.export import export_peft
from ptune.inference import load_task
from ptune.template import SOFT_ID
from ptune.tuners import deep_attention as da

from .helpers import SENTENCES, make_cfg
from .test_cli import ptune
from .test_serving import save_prompt


def fresh_base(path, kind: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    cls = {"mlm": AutoModelForMaskedLM, "causal": AutoModelForCausalLM, "head": AutoModel}[kind]
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def ptune_outputs(task, ids: list[int]) -> torch.Tensor:
    """The backbone's full output (vocab logits, or hidden states for a head) under ptune's prompt, one row."""
    model = task.model.eval()
    t = torch.tensor([ids])
    mask = torch.ones_like(t)
    prefixes = model.tuner.deep_prefixes() if model.tuner.is_deep else None
    with torch.no_grad(), da.prefixes(prefixes):
        out = model.backbone(inputs_embeds=model.embed(t), attention_mask=mask)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def peft_outputs(peft_model, ids: list[int], drop: int) -> torch.Tensor:
    t = torch.tensor([[x for x in ids[drop:] if x != SOFT_ID]])
    with torch.no_grad():
        out = peft_model(input_ids=t, attention_mask=torch.ones_like(t))
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


CASES = {
    "bert-mlm-soft": ("bert", "mlm", "soft_prompt", dict(prompt_length=4)),
    "bert-head-soft": ("bert", "head", "soft_prompt", dict(prompt_length=3, readout="head")),
    "gpt2-soft": ("gpt2", "causal", "soft_prompt", dict(prompt_length=3, family="causal")),
    "llama-soft": ("llama", "causal", "soft_prompt", dict(prompt_length=4, family="causal")),
    "llama-v1-leading": (
        "llama",
        "causal",
        "ptuning_v1",
        dict(prompt_length=2, family="causal", template="{text_a} It was {mask}"),
    ),
    "llama-ptv2": ("llama", "causal", "ptuning_v2", dict(prompt_length=3, family="causal")),
    "llama-prefix": ("llama", "causal", "prefix", dict(prompt_length=5, family="causal")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_reload_matches_ptune(tiny_models, tmp_path, case):
    kind, base_kind, method, kw = CASES[case]
    cfg = make_cfg(tiny_models[kind], method, extra=["backbone.dtype=float32"], **kw)
    ckpt = save_prompt(tmp_path, "run", cfg, seed=3)
    out = tmp_path / "peft"
    info = export_peft(ckpt, out)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert info["verified_max_abs_diff"] < 1e-4
    saved = json.loads((out / "ptune_export.json").read_text())
    drop = len(saved["drop_leading_token_ids"])
    task, _, _, _ = load_task(ckpt)
    peft_model = peft.PeftModel.from_pretrained(fresh_base(tiny_models[kind], base_kind), str(out)).eval()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PREFIX_TUNING" if method in ("ptuning_v2", "prefix") else "PROMPT_TUNING")
    for s in SENTENCES[:3]:
        r = task.renderer.render({"text_a": s})
        ours = ptune_outputs(task, r.input_ids)
        theirs = peft_outputs(peft_model, r.input_ids, drop)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
        if base_kind == "head":
            assert (out / "ptune_head.safetensors").is_file() and saved["readout"]["kind"] == "head"
            head = task.model.readout.eval()
            with torch.no_grad():
                scores = head(theirs, torch.ones(theirs.shape[:2], dtype=torch.long))
                t = torch.tensor([r.input_ids])
                torch.testing.assert_close(scores, task.model(t, torch.ones_like(t), torch.tensor([0])))


REFUSED = {
    "soft tokens inside the template": (
        "bert",
        "ptuning_v1",
        dict(prompt_length=0),
        "soft tokens after text",  # {soft:2} {text_a} {soft} ...
    ),
    "deep prompt, absolute positions": ("gpt2", "ptuning_v2", dict(prompt_length=3, family="causal"), "rotary"),
    "deep prompt on an encoder": ("bert", "prefix", dict(prompt_length=3), "causal LMs with rotary"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unexportable_prompts_refused(tiny_models, tmp_path, case):
    kind, method, kw, needle = REFUSED[case]
    cfg = make_cfg(tiny_models[kind], method, extra=["backbone.dtype=float32"], **kw)
    ckpt = save_prompt(tmp_path, "run", cfg)
    with pytest.raises(PtuneError, match=needle):
        export_peft(ckpt, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_export_cli(tiny_models, tmp_path):
    cfg = make_cfg(tiny_models["bert"], "soft_prompt", extra=["backbone.dtype=float32"], prompt_length=2)
    ckpt = save_prompt(tmp_path, "run", cfg)
    res = ptune("export", str(ckpt), "--format", "peft", "--output", str(tmp_path / "peft"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "PROMPT_TUNING" in res.stdout and "matches" in res.stdout
    bad = ptune("export", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("ptune: error:")
