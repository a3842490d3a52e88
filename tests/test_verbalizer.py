"""Verbalizers (aggregation, multi-token words, start-up checks), multi_token=full and contextual calibration."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from ptune.batching import Encoded, collate
from ptune.calibration import calibrate, content_free_logprobs
from ptune.checkpoint import save_checkpoint
from ptune.errors import PtuneError
from ptune.inference import load_task
from ptune.readouts.verbalizer import build_verbalizer
from ptune.training import checkpoint_meta

from .helpers import LABELS, SENTENCES, amp_context, batch, close, logits, make_cfg, make_task

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bert_tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["bert"])


def ids_of(tok, word: str) -> list[int]:
    return tok(word, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------ aggregation


def test_class_score_is_mean_over_words(bert_tok):
    v = build_verbalizer({"negative": ["terrible", "bad"], "positive": ["great"]}, LABELS, bert_tok, False)
    logits_ = torch.zeros(2, len(bert_tok))
    terrible, bad, great = (ids_of(bert_tok, w)[0] for w in ("terrible", "bad", "great"))
    logits_[0, terrible], logits_[0, bad], logits_[0, great] = 1.0, 3.0, 5.0
    logits_[1, terrible], logits_[1, bad], logits_[1, great] = -2.0, 0.0, 0.5
    assert torch.allclose(v.class_scores(logits_), torch.tensor([[2.0, 5.0], [-1.0, 0.5]]))
    # the same scores from logits over just the used token ids (the causal LM-head shortcut)
    ids = v.flat_ids
    assert torch.allclose(v.class_scores(logits_[:, ids], ids), v.class_scores(logits_))


@pytest.mark.parametrize("mode", ["first", "mean"])
def test_multi_token_word_first_vs_mean(bert_tok, mode):
    toks = ids_of(bert_tok, "unwatchable")
    assert len(toks) == 3  # un ##watch ##able
    v = build_verbalizer({"negative": ["unwatchable"], "positive": ["great"]}, LABELS, bert_tok, False, mode)
    logits_ = torch.zeros(1, len(bert_tok))
    logits_[0, toks] = torch.tensor([3.0, 6.0, 9.0])
    logits_[0, ids_of(bert_tok, "great")[0]] = 1.0
    expected = 3.0 if mode == "first" else 6.0
    assert torch.allclose(v.class_scores(logits_), torch.tensor([[expected, 1.0]]))


def test_label_words_list_form_and_single_string(bert_tok):
    v = build_verbalizer(["terrible", ["great", "good"]], LABELS, bert_tok, False)
    assert v.words == [["terrible"], ["great", "good"]]
    assert v.word_mask.tolist() == [[True, False], [True, True]]


@pytest.mark.parametrize(
    "words,mode,needle",
    [
        ({"negative": ["\u2603"], "positive": ["great"]}, "first", "unknown"),  # [UNK] for the BERT vocab
        ({"negative": ["great"], "positive": ["Great"]}, "first", "ambiguous"),  # uncased: one token
        ({"negative": ["unwatchable"], "positive": ["unreadable"]}, "first", "ambiguous"),  # same first token
        ({"negative": ["terrible"], "positive": [""]}, "first", "empty"),
        ({"negative": ["terrible"], "positive": [True]}, "first", "not a string: quote it"),  # YAML: [yes]
        ({"negative": ["terrible"], "positive": True}, "first", "not a string: quote it"),  # YAML: yes
        ({"negative": ["terrible"], "positive": []}, "first", "no label words"),
        ({"negative": ["terrible"]}, "first", "no label words for class 'positive'"),
        ({"negative": ["terrible"], "positive": ["great"], "neutral": ["okay"]}, "first", "neutral"),
        ([["terrible"]], "first", "1 classes"),
        ({"negative": ["terrible"], "positive": ["great"]}, "sum", "multi_token"),
    ],
)
def test_bad_label_words_are_start_up_errors(bert_tok, words, mode, needle):
    with pytest.raises(PtuneError, match=needle):
        build_verbalizer(words, LABELS, bert_tok, False, mode)


def test_shared_first_token_is_fine_when_all_tokens_count(bert_tok):
    assert ids_of(bert_tok, "unwatchable")[0] == ids_of(bert_tok, "unreadable")[0]
    build_verbalizer({"negative": ["unwatchable"], "positive": ["unreadable"]}, LABELS, bert_tok, False, "mean")


def test_bad_label_words_fail_when_building_the_task(tiny_models):
    cfg = make_cfg(tiny_models["bert"], "soft_prompt", prompt_length=2)
    cfg.template.label_words = {"negative": ["\u2603"], "positive": ["great"]}
    with pytest.raises(PtuneError, match="unknown to the backbone's tokenizer"):
        make_task(cfg)


# ------------------------------------------------------------------------------------ multi_token=full

FULL_WORDS = {"negative": ["unwatchable", "bad"], "positive": ["great", "splendiferous"]}


def _full_task(tiny_models, kind, method="soft_prompt", prompt_length=0):
    family = "causal" if kind in ("gpt2", "llama", "gemma3") else "seq2seq"
    cfg = make_cfg(tiny_models[kind], method, family=family, prompt_length=prompt_length)
    cfg.template.label_words = FULL_WORDS
    cfg.template.multi_token = "full"
    cfg.backbone.dtype = "float32"  # the default config's bf16 weights would blur the exact comparisons
    return make_task(cfg)


def _brute_force_full(task, sentences) -> torch.Tensor:
    """One plain backbone call per (sentence, word): sum of the word tokens' log-probabilities, mean per class."""
    bb, tok = task.backbone.model, task.backbone.tokenizer
    out = torch.zeros(len(sentences), len(LABELS))
    for i, s in enumerate(sentences):
        r = task.renderer.render({"text_a": s})
        prompt = r.input_ids[: r.answer_pos + 1] if task.model.family == "causal" else r.input_ids
        for c, name in enumerate(LABELS):
            scores = []
            for w in FULL_WORDS[name]:
                word = ids_of(tok, w)
                with torch.no_grad():
                    if task.model.family == "causal":
                        lg = bb(input_ids=torch.tensor([prompt + word])).logits[0, len(prompt) - 1 : -1]
                    else:
                        dec = [bb.config.decoder_start_token_id or 0] + word[:-1]
                        lg = bb(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec])).logits[0]
                scores.append(torch.log_softmax(lg.float(), -1)[torch.arange(len(word)), word].sum())
            out[i, c] = torch.stack(scores).mean()
    return out


@pytest.mark.parametrize("kind", ["gpt2", "gemma3", "t5"])
def test_full_is_teacher_forced_log_likelihood(tiny_models, kind):
    task = _full_task(tiny_models, kind)
    assert task.verbalizer.token_ids.shape[-1] == 5  # splendiferous: 5 word pieces
    expected = _brute_force_full(task, SENTENCES)
    for left_pad in (True, False):
        _, b = batch(task, SENTENCES, left_pad=left_pad)
        got = logits(task, b)
        assert torch.allclose(got, expected, atol=1e-4), left_pad
        assert (got <= 0).all()  # log-likelihoods


@pytest.mark.parametrize("kind,method", [("llama", "soft_prompt"), ("gpt2", "ptuning_v2"), ("mt5", "prefix")])
def test_full_with_prompts_padding_invariant_and_trainable(tiny_models, kind, method):
    task = _full_task(tiny_models, kind, method, prompt_length=3)
    enc, b_left = batch(task, SENTENCES, left_pad=True)
    b_right = collate(enc, list(range(len(enc))), task.model.pad_id, False)
    full = logits(task, b_left)
    assert torch.allclose(full, logits(task, b_right), atol=1e-4)
    one = collate(enc, [2], task.model.pad_id, task.left_pad)
    assert torch.allclose(logits(task, one)[0], full[2], atol=1e-4)
    task.model.train()
    out = task.model(b_left["input_ids"], b_left["attention_mask"], b_left["answer_pos"])
    torch.nn.functional.cross_entropy(out, b_left["labels"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.trainable_parameters())


def test_full_is_rejected_for_an_mlm(tiny_models):
    cfg = make_cfg(tiny_models["bert"], "soft_prompt", prompt_length=2)
    cfg.template.multi_token = "full"
    with pytest.raises(PtuneError, match="multi_token=full .* causal or seq2seq"):
        make_task(cfg)


# --------------------------------------------------------------------------------- contextual calibration


def _perturbed_task(tiny_models, kind="bert", family="mlm", method="soft_prompt", calib=True):
    cfg = make_cfg(tiny_models[kind], method, family=family, prompt_length=3)
    cfg.template.calibrate = calib
    task = make_task(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in task.model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return cfg, task


@pytest.mark.parametrize("kind,family", [("bert", "mlm"), ("gpt2", "causal"), ("t5", "seq2seq")])
def test_calibration_makes_content_free_input_uniform(tiny_models, kind, family):
    _, task = _perturbed_task(tiny_models, kind, family)
    before = content_free_logprobs(task, CPU, None, ("N/A",))[0]
    assert before.exp().max() - before.exp().min() > 1e-3  # the prompt is biased to begin with
    offset = calibrate(task, CPU, None, ("N/A",))
    assert torch.allclose(task.model.readout.calibration, offset)
    r = task.renderer.render({"text_a": "N/A"})
    b = collate(Encoded([r.input_ids], [r.answer_pos], [0]), [0], task.model.pad_id, task.left_pad)
    probs = logits(task, b).softmax(-1)[0]
    assert torch.allclose(probs, torch.full_like(probs, 1 / len(LABELS)), atol=1e-5)


def test_calibration_averages_the_content_free_inputs(tiny_models):
    _, task = _perturbed_task(tiny_models)
    # the reference, computed here: each content-free input ("N/A", "") alone through the uncalibrated model
    assert not task.model.readout.calibration.any()
    rows = []
    for value in ("N/A", ""):
        r = task.renderer.render({"text_a": value})
        b = collate(Encoded([r.input_ids], [r.answer_pos], [0]), [0], task.model.pad_id, task.left_pad)
        rows.append(torch.log_softmax(logits(task, b)[0], -1))
    each = torch.stack(rows)
    torch.testing.assert_close(content_free_logprobs(task, CPU, None), each, atol=1e-6, rtol=0)
    assert (each[0] - each[1]).abs().max() > 1e-4  # the two inputs differ: the mean is not any one of them
    offset = calibrate(task, CPU, None)
    torch.testing.assert_close(offset, each.mean(0), atol=1e-6, rtol=0)
    # the calibrated content-free distributions have a uniform geometric mean
    cal = torch.log_softmax(each - offset, -1).mean(0)
    assert torch.allclose(cal, cal.mean().expand_as(cal), atol=1e-5)
    # calibration is computed from raw scores: calibrating twice gives the same offset
    assert torch.allclose(calibrate(task, CPU, None), offset)


def test_calibrated_checkpoint_reloads_to_identical_logits(tiny_models, tmp_path):
    cfg, task = _perturbed_task(tiny_models, "gpt2", "causal")
    calibrate(task, CPU, None)
    assert task.model.readout.calibration.abs().sum() > 0
    _, b = batch(task)
    before = logits(task, b)
    save_checkpoint(tmp_path / "checkpoint", task.model, cfg, checkpoint_meta(task, cfg))
    loaded, *_ = load_task(tmp_path)
    assert torch.equal(loaded.model.readout.calibration, task.model.readout.calibration)
    assert torch.allclose(logits(loaded, b), before, atol=1e-6)


def test_calibrate_needs_a_verbalizer(tiny_models):
    cfg = make_cfg(tiny_models["bert"], "soft_prompt", readout="head", prompt_length=2)
    cfg.template.calibrate = True
    with pytest.raises(PtuneError, match="calibrate"):
        make_task(cfg)
    cfg = make_cfg(tiny_models["bert"], "soft_prompt", prompt_length=2)
    cfg.template.calibrate = "yes"
    with pytest.raises(PtuneError, match="calibrate"):
        make_task(cfg)


def test_training_saves_the_calibration_of_the_saved_prompt(tiny_models, tmp_path):
    from omegaconf import OmegaConf

    from ptune.checkpoint import read_checkpoint
    from ptune.training import run_training

    rows = "".join(f'"{s}",{LABELS[i % 2]}\n' for i, s in enumerate(SENTENCES))
    (tmp_path / "d.csv").write_text("text,label\n" + rows, encoding="utf-8")
    cfg = make_cfg(tiny_models["bert"], "soft_prompt", prompt_length=2)
    cfg.template.calibrate = True
    cfg.dataset.train_file = cfg.dataset.dev_file = str(tmp_path / "d.csv")
    cfg.dataset.label_names = LABELS
    cfg.trainer = OmegaConf.merge(cfg.trainer, {"max_steps": 2, "eval_every": 2, "batch_size": 3, "lr": 0.5})
    res = run_training(cfg, tmp_path / "run")
    _, _, state = read_checkpoint(tmp_path / "run" / "checkpoint")
    assert state["readout.calibration"].abs().sum() > 0
    loaded, *_ = load_task(tmp_path / "run")
    expected = calibrate(loaded, CPU, None)  # recomputed from the saved prompt
    assert torch.allclose(state["readout.calibration"], expected, atol=1e-5)
    from ptune.inference import evaluate_checkpoint

    ev = evaluate_checkpoint(tmp_path / "run", [f"dataset.dev_file={tmp_path / 'd.csv'}"])
    assert abs(ev["accuracy"] - res["metrics"]["accuracy"]) < 1e-9


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3"])
def test_causal_mean_of_multi_piece_words_matches_the_full_vocabulary(tiny_models, kind, amp):
    """Causal backbones score only the label words' rows of the LM head (``label_rows_only``); with
    multi_token=mean and multi-piece words (un ##watch ##able) each class is still the mean of its words' mean
    piece logits over the full vocabulary, as the plain backbone computes them (a wrong row gives other scores)."""
    words = {"negative": ["unwatchable", "bad"], "positive": ["great", "breathtaking"]}
    cfg = make_cfg(tiny_models[kind], "soft_prompt", family="causal", prompt_length=0)
    cfg.template.label_words = words
    cfg.template.multi_token = "mean"
    task = make_task(cfg)
    assert task.model.family.label_rows_only
    tok = task.backbone.tokenizer
    pieces = {w: ids_of(tok, w) for ws in words.values() for w in ws}
    assert len(pieces["unwatchable"]) == 3 and len(pieces["breathtaking"]) > 1, pieces
    _, b = batch(task)
    got = logits(task, b, amp)
    bb = task.model.backbone
    positions = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), amp_context(amp):
        full = bb(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=positions).logits
    full = full[torch.arange(len(full)), b["answer_pos"]].float()  # [B, V]
    expected = torch.stack(
        [torch.stack([full[:, pieces[w]].mean(-1) for w in words[c]]).mean(0) for c in LABELS], -1
    )
    torch.testing.assert_close(got, expected, rtol=close(amp, 1e-5), atol=close(amp, 1e-5))
