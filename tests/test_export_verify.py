"""The PEFT export's verifier: fed an adapter that does not reproduce ptune (virtual tokens in the wrong order, keys
and values swapped), it refuses to export; ``--no-verify`` skips it."""

from __future__ import annotations

import peft  # noqa: F401 - a pinned dev dependency: a broken install must fail these tests, not skip them
import pytest
import safetensors.torch

from ptune import export as export_mod
from ptune.commands.export import export_main
from ptune.errors import PtuneError
from ptune.export import export_peft

from .helpers import make_cfg
from .test_serving import save_prompt


def _reversed_virtual_tokens(monkeypatch) -> None:
    """A broken PROMPT_TUNING export: the soft vectors are written in reverse order."""
    real = safetensors.torch.save_file

    def save_file(tensors, path, *args, **kwargs):
        if str(path).endswith("adapter_model.safetensors"):
            tensors = {k: v.flip(0).contiguous() for k, v in tensors.items()}
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _swapped_keys_and_values(monkeypatch) -> None:
    """A broken PREFIX_TUNING export: keys and values trade places ([sites, 2, heads, P, dim])."""
    real = export_mod.rotate_prefix_keys
    monkeypatch.setattr(export_mod, "rotate_prefix_keys", lambda model, prefix: real(model, prefix.flip(1)))


BROKEN = {
    "soft prompt, reversed tokens": ("soft_prompt", dict(prompt_length=4, family="causal"), _reversed_virtual_tokens),
    "deep prompt, keys and values swapped": (
        "ptuning_v2", dict(prompt_length=3, family="causal"), _swapped_keys_and_values,
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_verifier_refuses_an_adapter_that_differs_from_ptune(tiny_models, tmp_path, monkeypatch, case):
    method, kw, breakage = BROKEN[case]
    ckpt = save_prompt(tmp_path, "run", make_cfg(tiny_models["llama"], method, extra=["backbone.dtype=float32"], **kw))
    good = export_peft(ckpt, tmp_path / "good")  # the intact export passes
    assert good["verified_max_abs_diff"] < 1e-4
    breakage(monkeypatch)
    out = tmp_path / "peft"
    with pytest.raises(PtuneError, match="does not reproduce ptune's class scores") as exc:
        export_peft(ckpt, out)
    assert "\n" not in str(exc.value)
    assert not out.exists()  # nothing half-written
    info = export_peft(ckpt, out, check=False)  # --no-verify writes even this one, unchecked
    assert "verified_max_abs_diff" not in info and (out / "adapter_model.safetensors").is_file()


def test_no_verify_flag_skips_the_check(tiny_models, tmp_path, monkeypatch, capsys):
    ckpt = save_prompt(tmp_path, "run", make_cfg(tiny_models["bert"], "soft_prompt", prompt_length=2))
    calls = []
    real = export_mod.verify
    monkeypatch.setattr(export_mod, "verify", lambda *a: calls.append(a) or real(*a))
    export_main([str(ckpt), "--output", str(tmp_path / "checked")])
    assert len(calls) == 1 and "PEFT reload matches ptune" in capsys.readouterr().out
    export_main([str(ckpt), "--output", str(tmp_path / "unchecked"), "--no-verify"])
    assert len(calls) == 1, "--no-verify still reloaded the export"
    out = capsys.readouterr().out
    assert "exported" in out and "matches" not in out
    assert (tmp_path / "unchecked" / "adapter_model.safetensors").is_file()
