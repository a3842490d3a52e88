"""The console script end to end: train then eval reproduces the metric; bad input gives one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_csv
from .helpers import ptune_here

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def ptune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ptune", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )


def csv_overrides(tiny_models, tiny_csv) -> list[str]:
    return [
        "backbone=hf",
        f"backbone.name={tiny_models['bert']}",
        "backbone.max_length=64",
        "dataset=csv",
        f"dataset.train_file={tiny_csv['train']}",
        f"dataset.dev_file={tiny_csv['dev']}",
        "dataset.label_names=[negative,positive]",
        "template=sst2_mlm",
        "method.prompt_length=4",
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "trainer.batch_size=4",
    ]


def run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_train_then_eval_reproduces_metric(tiny_models, tiny_csv, tmp_path):
    res = ptune("train", *csv_overrides(tiny_models, tiny_csv), "trainer.lr=0.1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = run_dir(tmp_path)
    results = json.loads((out / "results.json").read_text())
    for key in ("best_metric", "best_step", "metrics", "trainable_params", "total_params", "train_examples_per_s",
                "eval_examples_per_s", "wall_s", "checkpoint_bytes"):
        assert key in results
    assert set(results["metrics"]) >= {"accuracy", "macro_f1"}
    assert 0 < results["trainable_params"] < results["total_params"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    ckpt = out / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "meta.json", "prompt.safetensors"]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["label_names"] == ["negative", "positive"] and "ptune_version" in meta
    assert meta["backbone"]["hidden_size"] == 32
    # a checkpoint's data paths are never followed: the user names the file again (issue 12)
    ev = ptune("eval", str(out), f"dataset.dev_file={tiny_csv['dev']}", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    evaluated = json.loads((out / "eval.json").read_text())
    assert abs(evaluated["accuracy"] - results["metrics"]["accuracy"]) < 1e-6
    assert abs(evaluated["macro_f1"] - results["metrics"]["macro_f1"]) < 1e-6
    # The tiny random BERT predicts nearly the same classes whatever the prompt, so equal accuracies would prove
    # little; the calibration error (from the class probabilities) moves with every weight: the untrained prompt,
    # evaluated the same way, is 3e-4 away, and eval must reproduce the trained value to 1e-6.
    assert abs(evaluated["ece"] - results["metrics"]["ece"]) < 1e-6
    from ptune.build import build_task
    from ptune.checkpoint import read_checkpoint, save_checkpoint
    from ptune.inference import evaluate_checkpoint
    from ptune.training import checkpoint_meta

    saved, meta, _ = read_checkpoint(ckpt)
    untrained = build_task(saved, meta["label_names"], int(saved.trainer.seed))
    save_checkpoint(tmp_path / "untrained" / "checkpoint", untrained.model, saved, checkpoint_meta(untrained))
    before = evaluate_checkpoint(tmp_path / "untrained", [f"dataset.dev_file={tiny_csv['dev']}"])
    assert abs(before["ece"] - results["metrics"]["ece"]) > 1e-4


def test_help(tmp_path):
    res = ptune("--help", cwd=tmp_path)
    assert res.returncode == 0 and "train" in res.stdout and "eval" in res.stdout
    res = ptune("train", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "backbone" in res.stdout and "method" in res.stdout


BAD_INPUTS = {
    "unknown backbone": (["backbone.name=no-such-model-xyz"], "no-such-model-xyz"),
    "missing data file": (["+experiment=sst2_soft", "data.root=/nonexistent/ptune-data"], "/nonexistent/ptune-data"),
    "template without mask for MLM verbalizer": (
        ["backbone=cassette_bert", "dataset=sst2", "template=sst2_mlm", "template.text='{text_a} was good.'"],
        "mask",
    ),
    "label outside the label set": (
        ["backbone=cassette_bert", "dataset=sst2", "template=sst2_mlm", "+template.label_words.neutral=[okay]"],
        "neutral",
    ),
    "negative prompt length": (["method.prompt_length=-1"], "-1"),
    "unknown experiment": (["+experiment=no_such_experiment"], "no_such_experiment"),
    "zero batch size": (["trainer.batch_size=0"], "batch_size"),
    "unknown method": (["method.name=lora"], "lora"),
    "non-boolean switch": (["trainer.fuse_projections=maybe"], "use one of true, false"),
}


# the cases run by a real `python -m ptune` process; the others run in this one (helpers.ptune_here), which ends in
# the same handler: one composition error and one from inside the run's start
IN_A_PROCESS = ("unknown experiment", "missing data file")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_no_traceback(case, tmp_path, data_root, capsys, monkeypatch):
    args, needle = BAD_INPUTS[case]
    if case != "missing data file":
        args = [*args, f"data.root={data_root}"]
    if case in IN_A_PROCESS:
        res = ptune("train", *args, cwd=tmp_path)
    else:
        res = ptune_here("train", *args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert res.returncode == 2, res.stderr  # the README's exit code for user errors
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("ptune: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    assert not list(tmp_path.glob("outputs/runs/*/*")), "a failed run left a run folder behind"


def test_unknown_label_in_data_file(tiny_models, tiny_csv, tmp_path):
    write_csv(tiny_csv["dev"], [("fine film", "positive"), ("odd one", "neutral")])
    res = ptune("train", *csv_overrides(tiny_models, tiny_csv), cwd=tmp_path)
    assert res.returncode == 2, res.stderr  # the README's exit code for user errors
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "neutral" in lines[0] and "dev.csv" in lines[0], res.stderr


def test_eval_of_missing_checkpoint(tmp_path):
    res = ptune("eval", str(tmp_path / "nothing"), cwd=tmp_path)
    assert res.returncode == 2 and "no checkpoint" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("line", "expected", "absent"),
    [
        ("ptune tr", {"train"}, set()),
        ("ptune train trainer.max_st", {"trainer.max_steps="}, set()),
        ("ptune train method=", {"method=ptuning_v2", "method=prefix"}, {"method=prefix_schema"}),
        ("ptune train +experiment=sst2_pt", {"+experiment=sst2_ptv1", "+experiment=sst2_ptv2"}, set()),
        ("ptune train dataset=csv dataset.fields.text", {"dataset.fields.text_a=", "dataset.fields.text_b="}, set()),
    ],
)
def test_shell_completion_of_train_overrides(line, expected, absent, monkeypatch, capsys):
    """`eval "$(ptune train -sc install=bash)"` installs a function that runs `ptune -sc query=bash` with the typed
    line in COMP_LINE: the subcommand word must not reach Hydra as an override, and schemas are not choices."""
    from ptune.cli import main

    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setattr(sys, "argv", ["ptune"])
    main(["-sc", "query=bash"])
    words = set(capsys.readouterr().out.split())
    assert expected <= words, words
    assert not absent & words


def test_shell_completion_installs_for_the_ptune_command(monkeypatch, capsys):
    from ptune.cli import main

    monkeypatch.setattr(sys, "argv", ["ptune"])
    main(["train", "-sc", "install=bash"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("-F hydra_bash_completion ptune"), last


def test_a_second_text_field_needs_no_plus(tmp_path):
    """csv/tsv/jsonl ship `fields.text_b: null`, so `dataset.fields.text_b=COL` works without Hydra's `+`."""
    from ptune.config import compose

    cfg = compose(["dataset=jsonl", "dataset.fields.text_b=premise"])
    assert cfg.dataset.fields.text_b == "premise"
