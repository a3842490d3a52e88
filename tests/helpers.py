"""Build tasks for tests straight from composed configs (no data files needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from omegaconf import OmegaConf

from ptune.batching import collate
from ptune.build import Task, build_task, encode
from ptune.config import compose

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRE_REAL = "PTUNE_REQUIRE_REAL"


def missing(what: str) -> NoReturn:
    """A real data set or packaged model that a test needs is absent. Skipped (the reason shows in the summary:
    pyproject's addopts has ``-rs``), but failed where PTUNE_REQUIRE_REAL=1, as .ci/run sets it: a CI checkout
    without ../shared/data or the `models` extra must fail, not pass while skipping what it was meant to check."""
    if os.environ.get(REQUIRE_REAL) == "1":
        pytest.fail(f"{what} ({REQUIRE_REAL}=1: every real-data and packaged-model test must run)", pytrace=False)
    pytest.skip(what)


LABELS = ["negative", "positive"]
SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish ,",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting is just bad",
    "a masterpiece four years in the making",
]

FAMILY_TEMPLATES = {
    "mlm": "{text_a} It was {mask}.",
    "causal": "{text_a} It was {mask}",
    "seq2seq": "{text_a} It was {mask}.",
}
V1_TEMPLATES = {
    "mlm": "{soft:2} {text_a} {soft} It was {mask}.",
    "causal": '{soft:"the movie"} {text_a} {soft:2} It was {mask}',
    "seq2seq": "{soft:2} {text_a} {soft} It was {mask}.",
}


def make_cfg(
    model_dir: Path | str,
    method: str,
    *,
    readout: str = "verbalizer",
    family: str = "mlm",
    prompt_length: int | None = None,
    template: str | None = None,
    extra: list[str] | None = None,
):
    overrides = [
        f"method={method}",
        "dataset=csv",
        "trainer.precision=fp32",
        "trainer.device=cpu",
        *(extra or []),
    ]
    cfg = compose(overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.backbone.name = str(model_dir)
    cfg.backbone.dtype = "float32"
    cfg.backbone.max_length = 64
    if prompt_length is not None:
        cfg.method.prompt_length = prompt_length
    if readout == "head":
        cfg.template = OmegaConf.create(
            {"readout": "head", "text": template or "{text_a}", "pooling": "mean", "head_dropout": 0.0}
        )
    else:
        text = template or (V1_TEMPLATES if method == "ptuning_v1" else FAMILY_TEMPLATES)[family]
        cfg.template = OmegaConf.create(
            {
                "readout": "verbalizer",
                "text": text,
                "label_words": {"negative": ["terrible"], "positive": ["great"]},
            }
        )
    del cfg["hydra"]
    return cfg


def required_values(group: str, option: str) -> list[str]:
    """Overrides filling the keys that ``conf/<group>/<option>.yaml`` leaves to the user (``???``) with placeholders,
    read from the file and typed by the group's schema: an option added later composes without editing a test."""
    import dataclasses

    import yaml

    from ptune.config import SCHEMAS, config_dir

    data = yaml.safe_load((config_dir() / group / f"{option}.yaml").read_text(encoding="utf-8")) or {}
    types = {f.name: str(f.type) for f in dataclasses.fields(SCHEMAS[group])} if group in SCHEMAS else {}
    return [
        f"{group}.{key}=" + ("[x,y]" if types.get(key, "").startswith("list") else f"placeholder_{key}")
        for key, value in data.items() if value == "???"
    ]


def make_task(cfg, seed: int = 0) -> Task:
    return build_task(cfg, LABELS, seed)


def batch(task: Task, sentences=SENTENCES, left_pad: bool | None = None):
    enc = encode(task, [{"text_a": s} for s in sentences], [i % 2 for i in range(len(sentences))])
    lp = task.left_pad if left_pad is None else left_pad
    return enc, collate(enc, list(range(len(enc))), task.model.pad_id, lp)


# The suite's precision axis (the ``amp`` fixture of tests/conftest.py): plain fp32, and bf16 autocast forced on
# whatever the CPU (where it has no bf16 instructions torch emulates it: slower, the same numbers), so that what the
# tests cover does not depend on the machine that runs them (trainer.precision=auto picks bf16 on CPUs with
# AVX512-BF16/AMX and on GPUs).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def amp_context(amp: torch.dtype | None):
    """The training and evaluation forwards' autocast context (ptune.evaluate.autocast) on CPU."""
    from ptune.runtime import autocast

    return autocast(torch.device("cpu"), amp)


def close(amp: torch.dtype | None, fp32: float) -> float:
    """A comparison tolerance: ``fp32`` as given, bf16 that of its 8-bit mantissa (2^-7, about 0.8% relative)."""
    return fp32 if amp is None else max(fp32, 2**-7)


def logits(task: Task, b, amp: torch.dtype | None = None) -> torch.Tensor:
    task.model.eval()
    with torch.no_grad(), amp_context(amp):
        return task.model(b["input_ids"], b["attention_mask"], b["answer_pos"]).float()


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``ptune ARGS`` in this process, through the console script's own entry (``ptune.cli.main``: the same
    one-line error handler and exit codes): (exit code, stdout, stderr)."""
    from ptune.cli import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def ptune_here(*args: str, cwd: Path, capsys, monkeypatch) -> subprocess.CompletedProcess:
    """``run_cli`` in ``cwd``, answered as ``tests/test_cli.py::ptune`` answers a subprocess. For commands refused
    before any model loads: a subprocess spends ~5 s importing torch and transformers to print that one line. Each
    test file that uses it keeps at least one such case in a real process."""
    monkeypatch.chdir(cwd)
    code, out, err = run_cli(list(args), capsys)
    return subprocess.CompletedProcess(["ptune", *args], code, out, err)
