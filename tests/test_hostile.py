"""Hostile and broken inputs: each ends in one clear `ptune: error:` line, exit code 2, no traceback, and no
half-written run folder. Runs the CLI in-process (same code path as the console script) to stay fast."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from ptune.cli import main

from .test_cli import csv_overrides


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, out: str, err: str, needle: str) -> None:
    assert code == 2, (code, err)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ptune: error:"), lines[0]
    assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in out + err


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _with(args: list[str], **updates: str) -> list[str]:
    keys = {a.split("=", 1)[0] for a in args}
    out = [a for a in args if a.split("=", 1)[0] not in updates]
    return out + [f"{k if k in keys else '++' + k}={v}" for k, v in updates.items()]


TRAIN_CASES = {
    # name: (override updates, needle in the message)
    "zero batch size": ({"trainer.batch_size": "0"}, "batch_size"),
    "negative batch size": ({"trainer.batch_size": "-4"}, "batch_size"),
    "zero lr": ({"trainer.lr": "0"}, "trainer.lr"),
    "negative lr": ({"trainer.lr": "-0.1"}, "trainer.lr"),
    "zero steps": ({"trainer.max_steps": "0"}, "max_steps"),
    "zero eval_every": ({"trainer.eval_every": "0"}, "eval_every"),
    "unknown trainer key": ({"trainer.bogus": "1"}, "bogus"),
    "fp16 on cpu": ({"trainer.precision": "fp16"}, "fp16"),
    "cuda without a GPU": ({"trainer.device": "cuda"}, "cuda"),
    "negative prompt length": ({"method.prompt_length": "-2"}, "-2"),
    "empty template": ({"template.text": "''"}, "empty"),
    "template without an input field": ({"template.text": "'It was {mask}.'"}, "field"),
    "unbalanced brace": ({"template.text": "'{text_a} It was {mask}.}'"}, "brace"),
    "unknown placeholder": ({"template.text": "'{text_a} {mask} {what ever}'"}, "what ever"),
    "template field not in data": ({"template.text": "'{review} It was {mask}.'"}, "review"),
    "soft tokens exceed max length": ({"method.prompt_length": "70"}, "maximum length"),
    "verbalizer label not in data": ({"template.label_words.neutral": "[fine]"}, "neutral"),
    "unknown label word": ({"template.label_words.positive": "[☃]"}, "☃"),
    "ambiguous label words": ({"template.label_words.positive": "[terrible]"}, "ambiguous"),
    "k-shot larger than a class": ({"dataset.k_shot": "100"}, "100"),
    "unknown dataset": ({"dataset.name": "imdb"}, "imdb"),
    "bad truncate side": ({"template.truncate": "middle"}, "middle"),
    "unknown backbone": ({"backbone.name": "no/such-model"}, "no/such-model"),
    "bad dtype": ({"backbone.dtype": "float8"}, "float8"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_train_input(case, tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    updates, needle = TRAIN_CASES[case]
    if case == "soft tokens exceed max length":
        updates = {**updates, "method": "soft_prompt"}
    args = _with(csv_overrides(tiny_models, tiny_csv), **updates)
    args = [a.replace("++method=", "method=") for a in args]
    assert_one_line_error(*run_cli(["train", *args], capsys), needle)
    assert not list(tmp_path.glob("outputs/runs/*/*")), "a failed run left a run folder"


DATA_CASES = {
    "empty data file": (b"", "empty"),
    "wrong delimiter": ("text\tlabel\nnice film\tpositive\n", "text"),
    "non-UTF-8 bytes": (b"text,label\n\"caf\xe9 au lait\",positive\n", "UTF-8"),
    "unseen label value": ("text,label\nnice film,positive\nodd film,sideways\n", "sideways"),
    "empty text": ('text,label\nnice film,positive\n"   ",negative\n', "empty"),
    "header only": ("text,label\n", "no"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_file(case, tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    content, needle = DATA_CASES[case]
    _write(tiny_csv["train"], content)
    code, out, err = run_cli(["train", *csv_overrides(tiny_models, tiny_csv)], capsys)
    assert_one_line_error(code, out, err, needle)
    assert "train.csv" in err


def test_extremely_long_text_is_truncated_not_fatal(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = "".join(f'"{"very long words " * 5000}",{lab}\n' for lab in ("positive", "negative") * 3)
    _write(tiny_csv["train"], "text,label\n" + rows)
    code, out, err = run_cli(["train", *csv_overrides(tiny_models, tiny_csv), "trainer.max_steps=2"], capsys)
    assert code == 0, err


@pytest.fixture()
def trained_run(tiny_models, tiny_csv, tmp_path_factory, capsys, monkeypatch) -> Path:
    cwd = tmp_path_factory.mktemp("trained")
    monkeypatch.chdir(cwd)
    code, _, err = run_cli(["train", *csv_overrides(tiny_models, tiny_csv), "trainer.max_steps=2"], capsys)
    assert code == 0, err
    return next((cwd / "outputs" / "runs").glob("*/*"))


def test_checkpoint_holding_a_pickle_is_refused(trained_run, tmp_path, capsys):
    weights = trained_run / "checkpoint" / "prompt.safetensors"
    weights.write_bytes(pickle.dumps({"method.soft_prompt": [1.0, 2.0]}))
    assert_one_line_error(*run_cli(["eval", str(trained_run)], capsys), "corrupted")


def test_truncated_weights_are_detected(trained_run, capsys):
    weights = trained_run / "checkpoint" / "prompt.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    assert_one_line_error(*run_cli(["eval", str(trained_run)], capsys), "corrupted")


def test_prompt_on_a_different_backbone_is_refused(trained_run, tiny_models, tmp_path, capsys):
    other = tmp_path / "other_bert"
    shutil.copytree(tiny_models["bert"], other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    key = next(iter(weights))
    weights[key] = weights[key] + 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    code, out, err = run_cli(["eval", str(trained_run), f"backbone.name={other}"], capsys)
    assert_one_line_error(code, out, err, "different backbone")


def test_corrupted_meta_json(trained_run, capsys):
    (trained_run / "checkpoint" / "meta.json").write_text("{not json")
    assert_one_line_error(*run_cli(["eval", str(trained_run)], capsys), "meta.json")


def test_eval_override_of_unknown_key(trained_run, capsys):
    assert_one_line_error(*run_cli(["eval", str(trained_run), "trainer.nope=1"], capsys), "trainer.nope")


def test_results_and_metrics_parse(trained_run):
    json.loads((trained_run / "results.json").read_text())
    for line in (trained_run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
