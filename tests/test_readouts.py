"""Readouts as strategies (ptune/readouts/): no readout type test outside the package, a linear head on every
family (trains, reloads to identical logits), label-word init wherever label words exist (issue 26)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ptune.checkpoint import save_checkpoint
from ptune.families import FAMILIES
from ptune.inference import load_task
from ptune.readouts import READOUTS
from ptune.training import checkpoint_meta

from .helpers import LABELS, SENTENCES, batch, logits, make_cfg, make_task, run_cli
from .test_cli import csv_overrides
from .test_hostile import assert_one_line_error

# The tiny models (tests/conftest.py) that stand for each family: a new family fails the test below until it has one.
FAMILY_MODELS = {"encoder": ["bert"], "causal": ["gpt2", "llama"], "seq2seq": ["t5"]}


def test_no_readout_type_test_outside_the_readouts_package():
    """Readout facts live in ptune/readouts/: code elsewhere asks the readout object (``readout.generates_text``,
    ``readout.loss``) instead of testing its type or comparing its name. config.py is exempt: it validates the
    user's ``template.readout`` string before any readout exists."""
    import ptune

    root = Path(ptune.__file__).parent
    classes = "|".join(["Readout", "ClsHead", "TargetReadout", *(c.__name__ for c in READOUTS.values())])
    names = "|".join(READOUTS)
    literal = rf"""["']({names})["']"""
    pattern = re.compile(
        rf"\bis_generative\(|\bisinstance\([^)]*\b({classes})\b|\btype\([^)]*readout[^)]*\)\s*(is|==)"
        rf"|(==|!=)\s*{literal}|{literal}\s*(==|!=)|\bin\s*\(\s*{literal}"
    )
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("readouts/") or rel == "config.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"ptune/{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_scan_catches_the_type_tests_it_forbids():
    """The pattern above is not vacuous: each form of readout type test it exists for is caught."""
    classes = "|".join(["Readout", "ClsHead", "TargetReadout", *(c.__name__ for c in READOUTS.values())])
    literal = rf"""["']({"|".join(READOUTS)})["']"""
    pattern = re.compile(
        rf"\bis_generative\(|\bisinstance\([^)]*\b({classes})\b|\btype\([^)]*readout[^)]*\)\s*(is|==)"
        rf"|(==|!=)\s*{literal}|{literal}\s*(==|!=)|\bin\s*\(\s*{literal}"
    )
    for line in ("if is_generative(model):", "isinstance(readout, TargetReadout | ClsHead)",
                 "isinstance(m.readout, VerbalizerReadout)", "if tcfg.readout == 'head':",
                 'kind in ("verbalizer", "generate")', "type(pm.readout) is HeadReadout"):
        assert pattern.search(line), line
    assert not pattern.search("if readout.generates_text:")


def test_every_family_has_a_tiny_model_for_the_head_test():
    assert sorted(FAMILY_MODELS) == sorted(f.name for f in FAMILIES)


HEAD_CASES = [(f.name, kind) for f in FAMILIES for kind in FAMILY_MODELS.get(f.name, [])]


@pytest.mark.parametrize(("family", "kind"), HEAD_CASES)
def test_head_trains_and_reloads_to_identical_logits_on_every_family(family, kind, tiny_models, tmp_path):
    """A linear head on each family (the last real token of a decoder, the decoder's first state of a seq2seq,
    [CLS] of an encoder) trains a few steps through the real loop and reloads to the same logits."""
    from ptune.training import run_training

    rows = "".join(f'"{s}",{LABELS[i % 2]}\n' for i, s in enumerate(SENTENCES))
    (tmp_path / "d.csv").write_text("text,label\n" + rows, encoding="utf-8")
    cfg = make_cfg(tiny_models[kind], "soft_prompt", readout="head", prompt_length=2)
    cfg.template.pooling = "cls"
    cfg.dataset.train_file = cfg.dataset.dev_file = str(tmp_path / "d.csv")
    cfg.dataset.label_names = LABELS
    cfg.trainer = OmegaConf.merge(cfg.trainer, {"max_steps": 3, "eval_every": 3, "batch_size": 3, "lr": 0.05,
                                                "head_lr": 0.05})
    first = make_task(cfg)
    initial = {k: v.clone() for k, v in first.model.readout.state_dict().items()}
    run_training(cfg, tmp_path / "run")
    loaded, *_ = load_task(tmp_path / "run")
    assert loaded.model.family == family
    trained = loaded.model.readout.state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), "the head did not train"
    _, b = batch(loaded)
    before = logits(loaded, b)
    save_checkpoint(tmp_path / "again" / "checkpoint", loaded.model, cfg, checkpoint_meta(loaded, cfg))
    again, *_ = load_task(tmp_path / "again")
    assert torch.equal(before, logits(again, b))
    assert before.shape == (len(SENTENCES), 2) and torch.isfinite(before).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_head_reads_the_last_real_token_with_either_padding(kind, tiny_models):
    """Left and right padding give the same scores (the head pools the last real token, not position 0 or -1),
    and the scores depend on the last token: another last word changes them."""
    cfg = make_cfg(tiny_models[kind], "soft_prompt", readout="head", prompt_length=2)
    cfg.template.pooling = "cls"
    task = make_task(cfg)
    _, left = batch(task, left_pad=True)
    _, right = batch(task, left_pad=False)
    assert not torch.equal(left["attention_mask"], right["attention_mask"])  # the premise: rows are padded
    torch.testing.assert_close(logits(task, left), logits(task, right), atol=1e-5, rtol=1e-5)
    hidden = torch.randn(2, 4, task.model.readout.linear.in_features)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    pooled = task.model.family.summary_state(hidden, mask)
    assert torch.equal(pooled, torch.stack([hidden[0, 3], hidden[1, 1]]))


def test_decoder_head_mean_pooling_counts_the_shared_prefix(tiny_models):
    """Mean pooling averages every real token, the soft prompt's too: a causal LM's shared prefix (computed once
    per batch) must not leave them out, so the scores equal those of the forward without the shortcut."""
    cfg = make_cfg(tiny_models["gpt2"], "soft_prompt", readout="head", prompt_length=2)  # helpers' head: mean
    task = make_task(cfg)
    assert task.model.share_prefix  # the premise: a shared soft prefix the causal forward could run once
    _, b = batch(task)
    scores = logits(task, b)
    task.model.share_prefix = False
    torch.testing.assert_close(scores, logits(task, b), atol=1e-5, rtol=1e-5)


def test_seq2seq_head_reads_the_first_decoder_state(tiny_models):
    """The state a seq2seq head pools is the one the model's own forward turns into the first decoder step's
    logits (not an encoder state): the LM head on it gives those logits."""
    cfg = make_cfg(tiny_models["t5"], "soft_prompt", readout="head", prompt_length=2)
    cfg.template.pooling = "cls"
    task = make_task(cfg)
    pm, (_, b) = task.model, batch(task)
    with torch.no_grad():
        embeds = pm.embed(b["input_ids"])
        state = pm.family.run_hidden(pm, embeds, b["attention_mask"])
        first = pm.family.run(pm, embeds, b["attention_mask"])  # the first decoder step's vocabulary logits
    scale = pm.backbone.model_dim ** -0.5 if pm.backbone.config.scale_decoder_outputs else 1.0
    assert state.shape[:2] == (len(SENTENCES), 1)
    torch.testing.assert_close(pm.backbone.lm_head(state[:, 0] * scale), first, atol=1e-5, rtol=1e-5)


def test_seq2seq_head_refuses_mean_pooling_naming_the_cause(tiny_models):
    from ptune.errors import PtuneError

    cfg = make_cfg(tiny_models["t5"], "soft_prompt", readout="head", prompt_length=2)  # helpers' head: mean
    with pytest.raises(PtuneError, match="decoder's first state: use template.pooling=cls"):
        make_task(cfg)


# ------------------------------------------------------------------------------- label-word init (found on the way)
def _experiment(tiny_models, tiny_csv, kind: str, *extra: str) -> list[str]:
    base = [a for a in csv_overrides(tiny_models, tiny_csv) if not a.startswith(("template=", "backbone."))]
    return ["train", "+experiment=sst2_smollm2_soft", *base, f"backbone.name={tiny_models[kind]}",
            "backbone.max_length=64", "backbone.dtype=float32", "method.prompt_length=4", "trainer.max_steps=2",
            "trainer.eval_every=2", "trainer.batch_size=4", "trainer.device=cpu", "trainer.precision=fp32", *extra]


def test_sst2_smollm2_soft_with_generate_readout_trains_from_label_words(tiny_models, tiny_csv, tmp_path,
                                                                         monkeypatch, capsys):
    """``+experiment=sst2_smollm2_soft template.readout=generate`` (method.init=labels) trains: the generate
    readout's targets are the label words, so the soft prompt starts from their embeddings."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(_experiment(tiny_models, tiny_csv, "llama", "template.readout=generate"), capsys)
    assert code == 0, err
    task, *_ = load_task(next((tmp_path / "outputs" / "runs").glob("*/*")))
    readout = task.model.readout
    assert readout.generates_text
    words = task.backbone.tokenizer([" negative", " positive"], add_special_tokens=False)["input_ids"]
    assert readout.label_word_ids() == [w[0] for w in words]


def test_label_word_init_on_a_head_names_the_real_cause(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = _experiment(tiny_models, tiny_csv, "gpt2", "template.readout=head", "template.text='{text_a}'")
    code, out, err = run_cli(args, capsys)
    assert_one_line_error(code, out, err, "method.init=labels needs label words: template.readout=head reads a "
                                          "linear head, which has no label words")
    assert not list(tmp_path.glob("outputs/runs/*/*")), "a failed run left a run folder"


def test_label_word_init_without_label_words_names_the_target(tiny_models):
    """A generate readout with template.target and no label words: the error says where its targets come from."""
    from ptune.errors import PtuneError

    cfg = make_cfg(tiny_models["gpt2"], "soft_prompt", family="causal", prompt_length=2)
    cfg.template.readout = "generate"
    cfg.template.target = "text_a"
    cfg.template.label_words = None
    cfg.method.init = "labels"
    with pytest.raises(PtuneError, match="needs label words: template.readout=generate has no template.label_words"):
        make_task(cfg)


def test_peft_export_of_a_decoder_head_is_refused_naming_the_cause(tiny_models, tmp_path):
    """PEFT's causal-LM adapter returns logits, not the hidden states the head reads: refused in one line, and
    nothing is written."""
    pytest.importorskip("peft")
    from ptune.errors import PtuneError
    from ptune.export import export_peft

    cfg = make_cfg(tiny_models["gpt2"], "soft_prompt", readout="head", prompt_length=2)
    cfg.template.pooling = "cls"
    task = make_task(cfg)
    save_checkpoint(tmp_path / "run" / "checkpoint", task.model, cfg, checkpoint_meta(task, cfg))
    with pytest.raises(PtuneError, match="template.readout=head needs an encoder backbone"):
        export_peft(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()
