"""Hostile and broken inputs: each ends in one clear `ptune: error:` line, exit code 2, no traceback, and no
half-written run folder. Runs the CLI in-process (same code path as the console script) to stay fast."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from ptune.cli import main

from .helpers import run_cli
from .test_cli import csv_overrides


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


# ------------------------------------------------------------------------------------------------ issue 12
# Values that used to crash with a traceback, were silently accepted, or got a message covering several keys.

# Each pattern asks for the key and the bad value, and for the valid range where the value has the right type
# (a string where a number belongs is refused by the config schema's type check, which names the type).
NOT_A = r"(could not be converted to|must be an?) "
VALUE_CASES = {
    # name: (override updates, regex the error line must match)
    "seed not a number": ({"trainer.seed": "abc"}, r"trainer\.seed.*'abc'.*" + NOT_A + "(Integer|integer)"),
    "negative seed": ({"trainer.seed": "-1"}, r"trainer\.seed=-1 must be an integer in \[0, 4294967295\]"),
    "seed above 2**32-1": ({"trainer.seed": str(2**32)}, r"trainer\.seed=4294967296 must be an integer in \[0, 4294"),
    "warmup_ratio not a number": ({"trainer.warmup_ratio": "abc"}, r"trainer\.warmup_ratio.*'abc'.*" + NOT_A),
    "warmup_ratio of 1": (
        {"trainer.warmup_ratio": "1.0"},
        r"trainer\.warmup_ratio=1\.0 must be a number in \[0(\.0)?, 1",
    ),
    "warmup_ratio nan": ({"trainer.warmup_ratio": "nan"}, r"trainer\.warmup_ratio=nan .*\[0(\.0)?, 1"),
    "grad_clip not a number": ({"trainer.grad_clip": "abc"}, r"trainer\.grad_clip.*'abc'.*" + NOT_A),
    "negative grad_clip": ({"trainer.grad_clip": "-1"}, r"trainer\.grad_clip=-1(\.0)? must be a number >= 0"),
    "num_threads not a number": ({"trainer.num_threads": "abc"}, r"trainer\.num_threads.*'abc'.*" + NOT_A),
    "absurd num_threads": (
        {"trainer.num_threads": "100000"},
        r"trainer\.num_threads=100000 must be an integer in \[0, 4096\]",
    ),
    "negative num_threads": ({"trainer.num_threads": "-2"}, r"trainer\.num_threads=-2 must be an integer in \[0, "),
    "weight_decay not a number": ({"trainer.weight_decay": "abc"}, r"trainer\.weight_decay.*'abc'.*" + NOT_A),
    "negative weight_decay": ({"trainer.weight_decay": "-0.1"}, r"trainer\.weight_decay=-0\.1 must be a number >= 0"),
    "patience not a number": ({"trainer.early_stopping_patience": "abc"}, r"early_stopping_patience.*'abc'.*" + NOT_A),
    "negative patience": (
        {"trainer.early_stopping_patience": "-1"},
        r"early_stopping_patience=-1 must be an integer >= 0",
    ),
    "max_length not a number": ({"backbone.max_length": "abc"}, r"backbone\.max_length.*'abc'.*" + NOT_A),
    "max_length zero": ({"backbone.max_length": "0"}, r"backbone\.max_length=0 must be an integer (> 0|in \[1, )"),
    "max_length fractional": ({"backbone.max_length": "12.5"}, r"backbone\.max_length.*12\.5.*" + NOT_A),
    "max_train_samples -1": (
        {"dataset.max_train_samples": "-1"},
        r"max_train_samples=-1 must be an integer >= 1, or null",
    ),
    "max_train_samples text": ({"dataset.max_train_samples": "abc"}, r"dataset\.max_train_samples.*'abc'.*" + NOT_A),
    "max_eval_samples -1": (
        {"dataset.max_eval_samples": "-1"},
        r"max_eval_samples=-1 must be an integer >= 1, or null",
    ),
    "max_eval_samples zero": ({"dataset.max_eval_samples": "0"}, r"max_eval_samples=0 must be an integer >= 1"),
    "max_eval_samples fractional": ({"dataset.max_eval_samples": "2.5"}, r"dataset\.max_eval_samples.*2\.5.*" + NOT_A),
    "huge {soft:N}": (
        {"method": "ptuning_v1", "template.text": "'{soft:100000000} {text_a} It was {mask}.'"},
        r"\{soft:100000000\} asks for too many soft tokens: at most 65536",
    ),
    "thousands of digits in {soft:N}": (
        {"method": "ptuning_v1", "template.text": "'{soft:" + "9" * 5000 + "} {text_a} It was {mask}.'"},
        r"\{soft:9+\.\.\.\} asks for too many soft tokens",
    ),
    "{soft:N} over the maximum length": (
        {"method": "ptuning_v1", "template.text": "'{soft:100} {text_a} It was {mask}.'"},
        r"maximum length 64",
    ),
    "special token as a label word": ({"template.label_words.positive": "['[SEP]']"}, r"special token '\[SEP\]'"),
}


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_bad_value_is_one_line_naming_key_and_range(case, tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    import re

    monkeypatch.chdir(tmp_path)
    updates, pattern = VALUE_CASES[case]
    args = [a.replace("++method=", "method=") for a in _with(csv_overrides(tiny_models, tiny_csv), **updates)]
    code, out, err = run_cli(["train", *args], capsys)
    assert_one_line_error(code, out, err, "ptune: error:")
    assert re.search(pattern, err), (pattern, err)
    assert len(err) < 400, "the bad value is shown shortened"
    assert not list(tmp_path.glob("outputs/runs/*/*")), "a failed run left a run folder"


def test_duplicate_csv_header_is_refused(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write(tiny_csv["train"], "text,label,text\nnice film,positive,awful film\nbad film,negative,good film\n")
    code, out, err = run_cli(["train", *csv_overrides(tiny_models, tiny_csv)], capsys)
    assert_one_line_error(code, out, err, "column 'text' more than once (columns 1, 3)")
    assert "train.csv" in err


# ---------------------------------------------------------------------------------------- label words
def test_multi_piece_label_word_scored_by_first_piece_warns_once(tiny_models, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from ptune.errors import PtuneError
    from ptune.readouts import verbalizer

    monkeypatch.setattr(verbalizer, "_WARNED_FIRST_PIECE", set())
    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    pieces = tok.tokenize("qzxqzxqzx")
    assert len(pieces) > 1  # the premise: not one token of this vocabulary
    words = {"negative": ["terrible"], "positive": ["qzxqzxqzx"]}
    capsys.readouterr()
    for _ in range(2):  # once per process, not once per build
        verbalizer.build_verbalizer(words, ["negative", "positive"], tok, leading_space=False)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("ptune: warning:") and "'qzxqzxqzx'" in lines[0]
    assert f"first piece {pieces[0]!r}" in lines[0] and "multi_token=mean" in lines[0]
    verbalizer.build_verbalizer(words, ["negative", "positive"], tok, leading_space=False, multi_token="mean")
    assert capsys.readouterr().err == ""  # every piece counts: nothing to warn about
    # a word refused for ambiguity gets no warning first: the error stays the only line
    assert tok.tokenize("qzxqzxqzy")[0] == pieces[0]
    with pytest.raises(PtuneError, match="ambiguous"):
        verbalizer.build_verbalizer({"negative": ["qzxqzxqzy"], "positive": ["qzxqzxqzw"]},
                                    ["negative", "positive"], tok, leading_space=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("word", ["[SEP]", "[CLS]", "[MASK]", "[PAD]"])
def test_special_token_label_word_is_an_error(tiny_models, word):
    from transformers import AutoTokenizer

    from ptune.errors import PtuneError
    from ptune.readouts.verbalizer import build_verbalizer

    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    with pytest.raises(PtuneError, match=r"special token '\[" + word[1:-1] + r"\]'"):
        build_verbalizer({"negative": ["terrible"], "positive": [word]}, ["negative", "positive"], tok, False)


# ---------------------------------------------------------------------------------------- ptune predict
def _fifo(tmp_path: Path) -> Path:
    import os

    os.mkfifo(tmp_path / "pipe.jsonl")
    return tmp_path / "pipe.jsonl"


PREDICT_INPUTS = {
    # name: (make the input path, needle)
    "deep nesting": (lambda d: _write(d / "in.jsonl", "[" * 100000 + "\n"), "nested too deeply"),
    "deep nesting in an object": (
        lambda d: _write(d / "in.jsonl", '{"text_a": ' + "[" * 100000 + "]" * 100000 + "}\n"),
        "nested too deeply",
    ),
    "integer of 5000 digits": (lambda d: _write(d / "in.jsonl", '{"text_a": ' + "9" * 5000 + "}\n"), "too long"),
    "invalid UTF-8": (lambda d: _write(d / "in.jsonl", b'{"text_a": "nice"}\n{"text_a": "caf\xe9"}\n'), "in.jsonl:2"),
    "binary": (lambda d: _write(d / "in.jsonl", bytes(range(256)) * 4), "not UTF-8"),
    "NUL bytes": (lambda d: _write(d / "in.jsonl", b"\x00" * 64), "not valid JSON"),
    "empty file": (lambda d: _write(d / "in.jsonl", ""), "is empty"),
    "blank lines only": (lambda d: _write(d / "in.jsonl", "\n  \n\n"), "is empty"),
    "/dev/null": (lambda d: Path("/dev/null"), "'/dev/null' is empty"),
    "a folder": (lambda d: d, "is a folder"),
    "a named pipe": (_fifo, "is a named pipe, not a regular file"),
    "a missing file": (lambda d: d / "missing.jsonl", "does not exist"),
}


@pytest.mark.parametrize("case", list(PREDICT_INPUTS))
def test_bad_predict_input_is_one_line(case, tmp_path, capsys):
    """Inputs are checked before any checkpoint is loaded, so no model is needed; a pipe must not block."""
    make, needle = PREDICT_INPUTS[case]
    path = make(tmp_path)
    code, out, err = run_cli(["predict", str(tmp_path / "no-run"), "--input", str(path)], capsys)
    assert_one_line_error(code, out, err, needle)
    assert "does not exist" not in err or case == "a missing file"


@pytest.mark.parametrize("case", ["existing folder", "missing folder", "parent is a file"])
def test_bad_predict_output_is_refused_before_scoring(case, tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", '{"text_a": "nice"}\n')
    _write(tmp_path / "file", "x")
    output, needle = {
        "existing folder": (tmp_path, "is a folder"),
        "missing folder": (tmp_path / "nope" / "out.jsonl", "does not exist"),
        "parent is a file": (tmp_path / "file" / "out.jsonl", "is not a folder"),
    }[case]
    code, out, err = run_cli(["predict", str(tmp_path / "no-run"), "--input", str(inp), "--output", str(output)],
                             capsys)
    assert_one_line_error(code, out, err, needle)
    assert "--output" in err
    assert not (tmp_path / "nope").exists()


@pytest.fixture(scope="module")
def shared_run(tiny_models, tmp_path_factory) -> tuple[Path, list[str]]:
    """One 2-step run for the tests below that only read it (or copy it before damaging it)."""
    from .conftest import write_csv
    from .helpers import SENTENCES

    cwd = tmp_path_factory.mktemp("shared_run")
    rows = [(s, ["negative", "positive"][i % 2]) for i, s in enumerate(SENTENCES * 2)]
    csvs = {"train": write_csv(cwd / "train.csv", rows), "dev": write_csv(cwd / "dev.csv", rows[:6])}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        try:
            main(["train", *csv_overrides(tiny_models, csvs), "trainer.max_steps=2"])
        except SystemExit as exc:
            assert not exc.code, exc
    return next((cwd / "outputs" / "runs").glob("*/*")), [f"dataset.dev_file={csvs['dev']}"]


def _strict_json(line: str):
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_predictions_never_write_nan(shared_run, tmp_path, monkeypatch, capsys):
    import torch

    from ptune import serving

    def nan_scores(self, requests, batch_size=32):
        return [torch.tensor([float("nan"), 0.5]) if k % 2 == 0 else torch.tensor([0.1, float("inf")])
                for k in range(len(requests))] if requests else []

    monkeypatch.setattr(serving.PromptServer, "scores", nan_scores)
    inp = _write(tmp_path / "in.jsonl", '{"text_a": "nice"}\n{"text_a": "awful"}\n')
    out_file = tmp_path / "pred.jsonl"
    code, out, err = run_cli(["predict", str(shared_run[0]), "--input", str(inp), "--output", str(out_file)], capsys)
    assert code == 0, err
    rows = [_strict_json(x) for x in out_file.read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["label"] is None and r["label_name"] is None and set(r["probs"].values()) == {None}
        assert r["error"] == "non-finite class scores"
    assert "2 of 2 predictions have non-finite scores" in err


def test_a_failed_predictions_write_is_one_line(shared_run, tmp_path, monkeypatch, capsys):
    import errno

    from ptune import atomic

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "atomic_write_text", full_disk)
    out_file = tmp_path / "pred.jsonl"
    code, out, err = run_cli(["predict", str(shared_run[0]), "--text", "nice", "--output", str(out_file)], capsys)
    assert_one_line_error(code, out, err, "could not be written: No space left on device")
    assert not out_file.exists()


# ---------------------------------------------------------------------------------------- ptune eval
def test_eval_prints_metrics_before_a_failed_eval_json_write(shared_run, tmp_path, capsys, monkeypatch):
    run = shutil.copytree(shared_run[0], tmp_path / "run")
    (run / "eval.json").mkdir()  # a folder where the file must go (not ptune's: kept; a write would fail anyway)
    code, out, err = run_cli(["eval", str(run), *shared_run[1]], capsys)
    assert_one_line_error(code, out, err, "are printed above")
    assert "eval.json" in err
    assert "accuracy=" in out and "macro_f1=" in out
    (run / "eval.json").rmdir()

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ptune.inference.atomic_write_json", full_disk)
    code, out, err = run_cli(["eval", str(run), *shared_run[1]], capsys)
    assert_one_line_error(code, out, err, "printed above, but")
    assert "No space left on device" in err and "accuracy=" in out


def test_eval_refuses_max_eval_samples_minus_one(shared_run, capsys):
    code, out, err = run_cli(["eval", str(shared_run[0]), *shared_run[1], "dataset.max_eval_samples=-1"], capsys)
    assert_one_line_error(code, out, err, "dataset.max_eval_samples=-1 must be an integer >= 1, or null")


# ---------------------------------------------------------------------------------------- ptune report
GOOD_RESULTS = {
    "best_metric": 0.75,
    "metric": "accuracy",
    "best_step": 2,
    "metrics": {"accuracy": 0.75, "macro_f1": 0.7},
    "trainable_params": 100,
    "train_examples_per_s": 10.0,
    "eval_examples_per_s": 20.0,
}
BAD_RESULTS = {
    "truncated": json.dumps(GOOD_RESULTS)[:30],
    "not an object": "[0.75, 2]",
    "empty": "",
    "best_metric a string": json.dumps({**GOOD_RESULTS, "best_metric": "high"}),
    "metrics not an object": json.dumps({**GOOD_RESULTS, "metrics": "accuracy"}),
    "best_step a list": json.dumps({**GOOD_RESULTS, "best_step": [2]}),
    "invalid UTF-8": b'{"best_metric": 0.5, "metric": "\xff"}',
}


@pytest.mark.parametrize("case", list(BAD_RESULTS))
def test_report_on_a_bad_results_json(case, tmp_path, capsys):
    """Alone, a bad results.json is the one error line; beside a good run it is skipped with one warning."""
    bad = tmp_path / "runs" / "bad" / "results.json"
    bad.parent.mkdir(parents=True)
    _write(bad, BAD_RESULTS[case])
    assert_one_line_error(*run_cli(["report", str(tmp_path / "runs")], capsys), str(bad))
    assert not (tmp_path / "runs" / "summary.csv").exists()

    good = tmp_path / "runs" / "good" / "results.json"
    good.parent.mkdir()
    good.write_text(json.dumps(GOOD_RESULTS))
    code, out, err = run_cli(["report", str(tmp_path / "runs")], capsys)
    assert code == 0, err
    lines = [x for x in err.splitlines() if x.strip() and "summary.png" not in x]
    assert len(lines) == 1 and lines[0].startswith("ptune: warning: skipping a run:") and str(bad) in lines[0]
    assert "Traceback" not in err
    assert "0.75" in (tmp_path / "runs" / "summary.csv").read_text()


# ---------------------------------------------------------------------------------------- token cache
@pytest.mark.parametrize("damage", ["id >= vocab size", "negative id", "answer past its row"])
def test_token_cache_with_out_of_range_ids_is_re_tokenised(damage, tiny_models, tmp_path, monkeypatch):
    import numpy as np
    from transformers import AutoTokenizer

    from ptune import token_cache
    from ptune.template import SOFT_ID, TemplateRenderer, parse_template

    from .helpers import SENTENCES

    monkeypatch.setenv("PTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PTUNE_NO_TOKEN_CACHE", raising=False)
    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    renderer = TemplateRenderer(parse_template("{soft:2} {text_a} It was {mask}."), tok, "mask", 64)
    examples = [{"text_a": s} for s in SENTENCES]
    expected = token_cache.render_batched(renderer, examples)
    assert token_cache.render_split(renderer, examples) == expected
    (path,) = (tmp_path / "cache" / "tokens").glob("*.npz")
    with np.load(path) as z:
        arrays = dict(z)
    assert SOFT_ID in arrays["ids"]  # soft placeholders are negative on purpose and must stay valid
    if damage == "id >= vocab size":
        arrays["ids"][5] = len(tok) + 7
    elif damage == "negative id":
        arrays["ids"][5] = -3
    else:
        arrays["answer_pos"][1] = arrays["offsets"][2] - arrays["offsets"][1]
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    assert token_cache.render_split(renderer, examples) == expected  # re-tokenised, not trusted
    assert token_cache._read(path, len(examples), len(tok)) == expected  # and rewritten whole


# ---------------------------------------------------------------------------------------- README
def test_readme_own_data_command_works_as_written(tmp_path, monkeypatch, capsys):
    """The "Your own data" command, run as printed (only shortened), from a folder holding train.csv/dev.csv,
    with data.root pointing elsewhere as $PTUNE_DATA does in CI: relative paths still find the files."""
    import re
    import shlex

    from .helpers import SENTENCES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    args = shlex.split(block.replace("\\\n", " "))
    assert args[:2] == ["ptune", "train"], args
    for name, n in (("train.csv", 12), ("dev.csv", 6)):
        rows = "".join(f'{i},"{SENTENCES[i % 6]}",{["negative", "positive"][i % 2]}\n' for i in range(n))
        _write(tmp_path / name, "id,review,stars\n" + rows)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    extra = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.batch_size=4"]
    extra.append(f"data.root={tmp_path / 'elsewhere'}")
    code, out, err = run_cli([*args[1:], *extra], capsys)
    assert code == 0, err
    assert "done: accuracy" in out


def test_eval_overrides_are_typed_like_train_overrides(shared_run, capsys):
    """`dataset.max_eval_samples=3` reached the code as the string "3" (a TypeError in the comparison)."""
    code, out, err = run_cli(["eval", str(shared_run[0]), *shared_run[1], "dataset.max_eval_samples=3"], capsys)
    assert code == 0, err
    assert json.loads((shared_run[0] / "eval.json").read_text())["examples"] == 3
    assert_one_line_error(*run_cli(["eval", str(shared_run[0]), "trainer.seed=1,2"], capsys), "give one value")


@pytest.mark.parametrize(
    "text",
    [
        "dataset:\n  name: ${oc.env:SECRET_TOKEN}\n",  # a mapping's value
        "dataset:\n  label_names: [negative, '${oc.env:SECRET_TOKEN}']\n",  # inside a list
        "template:\n  label_words:\n    negative: [[bad, '${oc.env:SECRET_TOKEN}']]\n",  # a list in a list
    ],
    ids=["dict-value", "list-item", "nested-list-item"],
)
def test_checkpoint_config_interpolation_is_refused_wherever_it_is(tmp_path, monkeypatch, text):
    """A checkpoint's config.yaml is plain data: an ${oc.env:...} is refused before OmegaConf could resolve it, in
    a mapping's value and inside lists (kills skipping the list branch of checkpoint._check_plain)."""
    from ptune.checkpoint import load_plain_yaml
    from ptune.errors import PtuneError

    monkeypatch.setenv("SECRET_TOKEN", "s3cr3t")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(PtuneError, match="interpolation") as info:
        load_plain_yaml(path)
    assert "s3cr3t" not in str(info.value)
    assert load_plain_yaml(path, interpolation=True) is not None  # a run's own .hydra/config.yaml may hold them
