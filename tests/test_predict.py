"""`ptune predict`: JSONL predictions of several checkpoints, served in mixed batches."""

from __future__ import annotations

import json

import pytest
import torch

from ptune.data import input_columns
from ptune.errors import PtuneError
from ptune.inference import load_task
from ptune.predict import example_for, predict

from .helpers import SENTENCES, batch, logits, make_cfg
from .test_cli import ptune
from .test_serving import save_prompt


@pytest.fixture()
def prompts(tiny_models, tmp_path):
    specs = [
        ("soft", "soft_prompt", dict(prompt_length=3)),
        ("v2", "ptuning_v2", dict(prompt_length=2, template="Review: {text_a} Overall {mask}!")),
        ("head", "prefix", dict(prompt_length=4, readout="head")),
    ]
    return [
        save_prompt(tmp_path, name, make_cfg(tiny_models["bert"], m, extra=["backbone.dtype=float32"], **kw), i)
        for i, (name, m, kw) in enumerate(specs)
    ]


def test_predict_rows_match_each_checkpoint(prompts):
    # dataset=csv maps the template field text_a to the column "text": both spellings are accepted.
    inputs = [{"text": s} if i % 2 else {"text_a": s} for i, s in enumerate(SENTENCES)]
    rows = predict([str(p) for p in prompts], inputs, batch_size=4)
    assert len(rows) == len(SENTENCES) * len(prompts)
    for p in prompts:
        task, _, _, _ = load_task(p)
        _, b = batch(task)
        probs = torch.softmax(logits(task, b), -1)
        mine = sorted((r for r in rows if r["checkpoint"] == str(p)), key=lambda r: r["index"])
        assert [r["index"] for r in mine] == list(range(len(SENTENCES)))
        for r, ref in zip(mine, probs, strict=True):
            assert list(r["probs"]) == ["negative", "positive"]
            assert list(r["probs"].values()) == pytest.approx(ref.tolist(), abs=1e-5)
            assert r["label"] == int(ref.argmax()) and r["label_name"] == task.label_names[r["label"]]
            assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-5)


def test_input_columns_accept_the_data_sets_own_column_names():
    """A template field is found under its own name, then the column ``dataset.fields`` maps it to, then the
    built-in data set's column (SST-2's "sentence", CB's "premise"/"hypothesis")."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    sst2 = OmegaConf.create({"name": "sst2"})
    assert input_columns(sst2, ["text_a"]) == {"text_a": ["text_a", "sentence"]}
    cb = OmegaConf.create({"name": "cb"})
    assert input_columns(cb, ["text_a", "text_b"]) == {"text_a": ["text_a", "premise"],
                                                       "text_b": ["text_b", "hypothesis"]}
    own = OmegaConf.create({"name": "csv", "fields": {"text_a": "review"}})
    assert input_columns(own, ["text_a", "text_a"]) == {"text_a": ["text_a", "review"]}
    prompt = SimpleNamespace(columns=input_columns(cb, ["text_a", "text_b"]))
    assert example_for(prompt, {"premise": "p", "text_b": "h", "other": 1}, "x") == {"text_a": "p", "text_b": "h"}


def test_predict_routes_rows_to_named_checkpoint(prompts):
    paths = [str(p) for p in prompts]
    rows = predict(paths, [{"text_a": "fine", "checkpoint": paths[1]}, {"text_a": "bad", "checkpoint": 2}])
    assert [(r["index"], r["checkpoint"]) for r in rows] == [(0, paths[1]), (1, paths[2])]
    with pytest.raises(PtuneError, match="none of the checkpoints"):
        predict(paths, [{"text_a": "x", "checkpoint": "elsewhere"}])
    with pytest.raises(PtuneError, match="no field 'text_a'"):
        predict(paths[:1], [{"review": "x"}])


def test_predict_cli(prompts, tmp_path):
    paths = [str(p) for p in prompts]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text_a": s}) + "\n" for s in SENTENCES[:3]))
    out = tmp_path / "out.jsonl"
    res = ptune("predict", *paths, "--input", str(inp), "--output", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 9 and {r["checkpoint"] for r in rows} == set(paths)
    assert set(rows[0]) == {"index", "checkpoint", "label", "label_name", "probs"}
    res = ptune("predict", paths[0], "--text", "a great movie", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (row,) = [json.loads(x) for x in res.stdout.splitlines()]
    assert row["index"] == 0 and row["label_name"] in ("negative", "positive")
    inp.write_text('{"text_a": "ok"}\nnot json\n')
    res = ptune("predict", paths[0], "--input", str(inp), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("ptune: error:") and ":2:" in res.stderr


def test_predict_refuses_other_backbone(prompts, tiny_models, tmp_path):
    other = save_prompt(
        tmp_path, "llama", make_cfg(tiny_models["llama"], "soft_prompt", prompt_length=2, family="causal")
    )
    with pytest.raises(PtuneError, match="different backbones"):
        predict([str(prompts[0]), str(other)], [{"text_a": "x"}])
