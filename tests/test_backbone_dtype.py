"""``backbone.dtype=auto`` (the packaged decoders' default): bf16 weights where the device computes bf16 natively
(CUDA with bf16, a CPU with AMX or AVX512-BF16), else fp32 (a CPU without them emulates bf16, ~12x slower); the
resolved value is saved in the checkpoint and reused when the checkpoint is loaded on a machine that would resolve
it otherwise; the run's first line says which dtype and why. Detection is mocked: these tests run on any CPU."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ptune import runtime
from ptune.checkpoint import load_plain_yaml
from ptune.config import compose
from ptune.inference import load_task
from ptune.training import run_training

from .test_cli import csv_overrides

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _cpu(monkeypatch, feature: str | None) -> None:
    monkeypatch.setattr(runtime, "cpu_bf16_feature", lambda: feature)


@pytest.mark.parametrize(
    ("feature", "want", "why"),
    [("AMX", "bfloat16", "CPU has AMX"), ("AVX512-BF16", "bfloat16", "CPU has AVX512-BF16"),
     (None, "float32", "CPU has neither AMX nor AVX512-BF16")],
)
def test_auto_on_cpu_follows_its_bf16_instructions(monkeypatch, feature, want, why):
    _cpu(monkeypatch, feature)
    dtype, reason = runtime.resolve_dtype("auto", CPU)
    assert dtype == want and reason.startswith(why)
    assert runtime.resolve_dtype("bf16", CPU)[0] == want  # forced bf16 autocast: the weights still follow the CPU
    assert runtime.resolve_dtype("fp32", CPU) == ("float32", "trainer.precision=fp32")


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_on_cuda_follows_the_device(monkeypatch, bf16):
    _cpu(monkeypatch, "AMX")  # the CPU's instructions do not decide for a CUDA run
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert runtime.resolve_dtype("auto", CUDA)[0] == ("bfloat16" if bf16 else "float32")
    assert runtime.resolve_dtype("fp16", CUDA)[0] == "float32"


@pytest.mark.parametrize(
    ("capability", "cpuinfo", "feature"),
    [("AMX", "", "AMX"), ("AVX2", "flags: fpu amx_bf16 amx_tile avx512_bf16", "AMX"),
     ("AVX512", "flags: fpu avx512f avx512_bf16", "AVX512-BF16"), ("AVX512", "flags: avx512f avx512bw", None)],
)
def test_cpu_bf16_feature_names_the_instructions(monkeypatch, tmp_path, capability, cpuinfo, feature):
    info = tmp_path / "cpuinfo"
    info.write_text(cpuinfo)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(runtime, "Path", lambda p: info if str(p) == "/proc/cpuinfo" else p)
    assert runtime.cpu_bf16_feature() == feature


def test_packaged_decoders_default_to_auto_and_settling_rewrites_the_config(monkeypatch):
    _cpu(monkeypatch, "AVX512-BF16")
    for backbone in ("smollm2", "gemma3_270m"):
        cfg = compose([f"backbone={backbone}", "trainer.device=cpu"])
        assert cfg.backbone.dtype == "auto"
        assert runtime.settle_backbone_dtype(cfg) == "backbone.dtype=auto -> bfloat16 (CPU has AVX512-BF16)"
        assert cfg.backbone.dtype == "bfloat16"
    cfg = compose(["backbone=minilm"])  # encoders keep fp32 unless told
    assert runtime.settle_backbone_dtype(cfg) == "backbone.dtype=float32" and cfg.backbone.dtype == "float32"


def _train(tiny_models, tiny_csv, out, *extra):
    cfg = compose([*csv_overrides(tiny_models, tiny_csv), "trainer.device=cpu", "trainer.precision=auto",
                   "backbone.dtype=auto", "trainer.max_steps=2", "trainer.eval_every=2", *extra])
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    return run_training(cfg, out)


def test_the_saved_checkpoint_keeps_the_resolved_dtype_on_any_machine(tiny_models, tiny_csv, tmp_path, monkeypatch,
                                                                      capsys):
    _cpu(monkeypatch, "AVX512-BF16")
    _train(tiny_models, tiny_csv, tmp_path / "run", "trainer.save_every=0")
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("precision: backbone.dtype=auto -> bfloat16 (CPU has AVX512-BF16); autocast bfloat16")
    saved = load_plain_yaml(tmp_path / "run" / "checkpoint" / "config.yaml")
    assert saved.backbone.dtype == "bfloat16"
    _cpu(monkeypatch, None)  # evaluated on a CPU without bf16: the checkpoint's dtype, not this machine's choice
    task, cfg, _, _ = load_task(tmp_path / "run")
    assert cfg.backbone.dtype == "bfloat16"
    assert {p.dtype for p in task.backbone.model.parameters()} == {torch.bfloat16}
    # an explicit override still decides, resolved on this machine
    task, cfg, _, _ = load_task(tmp_path / "run", ["backbone.dtype=auto"])
    assert cfg.backbone.dtype == "float32"
    assert {p.dtype for p in task.backbone.model.parameters()} == {torch.float32}


def test_a_resumed_run_keeps_the_dtype_it_started_with(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """The resume state saves the settled dtype; resuming with auto on a machine that would settle it otherwise
    continues in the saved one (it used to be refused as a changed backbone.dtype)."""
    from ptune import resume

    _cpu(monkeypatch, None)
    run, original = tmp_path / "run", resume.save_state

    def save_then_stop(*args, **kwargs):  # a run killed right after its step-2 save (a finished run clears it)
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(resume, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_models, tiny_csv, run, "trainer.save_every=2", "trainer.max_steps=4", "trainer.eval_every=4")
    monkeypatch.setattr(resume, "save_state", original)
    assert load_plain_yaml(run / resume.STATE_DIR / resume.CONFIG).backbone.dtype == "float32"
    _cpu(monkeypatch, "AMX")  # this machine would pick bf16 now
    capsys.readouterr()
    results = _train(tiny_models, tiny_csv, run, "trainer.save_every=2", "trainer.max_steps=4",
                     "trainer.eval_every=4", "trainer.resume=true")
    assert results["steps"] == 4
    assert "backbone.dtype=float32" in capsys.readouterr().out
    assert load_plain_yaml(run / "checkpoint" / "config.yaml").backbone.dtype == "float32"
