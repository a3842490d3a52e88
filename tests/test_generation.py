"""template.readout=generate: target-only LM loss, ptune's decoding (cached == uncached, prompt matters), metrics."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ptune.build import encode
from ptune.errors import PtuneError
from ptune.generation import GenEncoded, _Decoder, collate_prompts, generate, generation_metrics
from ptune.readouts.generate import lm_loss
from ptune.tuners import METHODS as METHOD_REGISTRY

from .helpers import SENTENCES, make_cfg, make_task

METHODS = list(METHOD_REGISTRY)  # every registered method: a new one is tested without editing this file
KINDS = ["t5", "gpt2", "llama", "gemma3"]
CPU = torch.device("cpu")


def gen_task(tiny_models, kind: str, method: str, target: str | None = None, **template):
    family = "seq2seq" if kind in ("t5", "mt5") else "causal"
    cfg = make_cfg(tiny_models[kind], method, family=family, prompt_length=4)
    cfg.template.readout = "generate"
    cfg.template.target = target
    for k, v in template.items():
        cfg.template[k] = v
    task = make_task(cfg)
    task.model.eval()
    return task


def prompts(task, sentences=SENTENCES) -> tuple[GenEncoded, torch.Tensor, torch.Tensor]:
    examples = [{"text_a": s, "summary": s.split()[0]} for s in sentences]
    enc = encode(task, examples, [i % 2 for i in range(len(sentences))])
    ids, mask = collate_prompts(enc.input_ids, task.model.pad_id, task.left_pad)
    return enc, ids, mask


def decode(task, ids, mask, **kw):
    return generate(task.model, ids, mask, max_new_tokens=6, stop_id=task.model.readout.stop_id, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_cached_and_uncached_decoding_agree(tiny_models, kind, method):
    task = gen_task(tiny_models, kind, method)
    _, ids, mask = prompts(task)
    for strategy in ("greedy", "beam"):
        cached = decode(task, ids, mask, strategy=strategy, num_beams=3, use_cache=True)
        uncached = decode(task, ids, mask, strategy=strategy, num_beams=3, use_cache=False)
        assert cached == uncached, strategy
        assert sum(len(r) for r in cached) > len(SENTENCES)  # real text was decoded, not only stop tokens
    # and the logits of every step agree, not only their argmax
    from ptune.tuners import deep_attention as da

    pm = task.model
    with torch.no_grad(), da.prefixes(pm.tuner.deep_prefixes() if pm.tuner.is_deep else None):
        runs = [_Decoder(pm, ids, mask, use_cache=c, bare=False) for c in (True, False)]
        steps = [[d.start()] for d in runs]
        for _ in range(3):
            tokens = steps[0][-1].argmax(-1)
            for d, out in zip(runs, steps, strict=True):
                out.append(d.step(tokens))
    for a, b in zip(*steps, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_prompt_changes_generation(tiny_models, kind, method):
    task = gen_task(tiny_models, kind, method)
    _, ids, mask = prompts(task)
    assert decode(task, ids, mask) != decode(task, ids, mask, bare=True)


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_deep_prefixes_stay_out_of_the_cache(tiny_models, kind):
    """The cache holds the real tokens only: the deep prefixes live in the deep-attention state."""
    task = gen_task(tiny_models, kind, "ptuning_v2")
    _, ids, mask = prompts(task)
    from ptune.tuners import deep_attention as da

    with torch.no_grad(), da.prefixes(task.model.tuner.deep_prefixes()):
        dec = _Decoder(task.model, ids, mask, use_cache=True, bare=False)
        dec.start()
        dec.step(torch.zeros(ids.shape[0], dtype=torch.long))
    cache = dec.cache.self_attention_cache if kind == "t5" else dec.cache
    assert cache.get_seq_length() == (2 if kind == "t5" else ids.shape[1] + 1)


def test_sampling_is_seeded(tiny_models):
    task = gen_task(tiny_models, "llama", "ptuning_v2")
    _, ids, mask = prompts(task)
    a = decode(task, ids, mask, strategy="sample", seed=1, temperature=2.0)
    assert a == decode(task, ids, mask, strategy="sample", seed=1, temperature=2.0)
    assert a != decode(task, ids, mask, strategy="sample", seed=2, temperature=2.0)


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
@pytest.mark.parametrize("method", ["soft_prompt", "ptuning_v2"])
def test_loss_is_on_target_tokens_only(tiny_models, kind, method):
    """The batch loss is the token-weighted mean of each row's -log p(target | prompt), padding included,
    and equals the backbone's own LM loss with the prompt tokens masked out."""
    task = gen_task(tiny_models, kind, method)
    enc, _, _ = prompts(task)
    pm = task.model
    with torch.no_grad():
        rows = [float(lm_loss(pm, enc, [i], CPU)) for i in range(3)]
        both = lm_loss(pm, enc, [0, 1, 2], CPU)
        n = [len(enc.target_ids[i]) for i in range(3)]
        assert float(both) == pytest.approx(sum(r * k for r, k in zip(rows, n, strict=True)) / sum(n), rel=1e-4)
        from ptune.tuners import deep_attention as da

        ids = torch.tensor([enc.input_ids[0]])
        target = torch.tensor([enc.target_ids[0]])
        with da.prefixes(pm.tuner.deep_prefixes() if pm.tuner.is_deep else None):
            if kind == "t5":
                ref = pm.backbone(inputs_embeds=pm.embed(ids), labels=target).loss
            else:
                full = torch.cat([ids, target], 1)
                labels = torch.cat([torch.full_like(ids, -100), target], 1)
                ref = pm.backbone(inputs_embeds=pm.embed(full), labels=labels).loss
    assert float(rows[0]) == pytest.approx(float(ref), rel=1e-4)


def test_target_field_and_label_word_targets(tiny_models):
    task = gen_task(tiny_models, "gpt2", "soft_prompt", target="summary")
    enc, _, _ = prompts(task)
    assert enc.targets[0] == SENTENCES[0].split()[0]
    tok = task.backbone.tokenizer
    assert enc.target_ids[0][-1] == task.model.readout.stop_id
    assert tok.decode(enc.target_ids[0][:-1]).strip() == enc.targets[0]
    assert enc.input_ids[0][-1] == tok.convert_tokens_to_ids("was")  # prompt ends at the slot: no trailing [SEP]
    words = gen_task(tiny_models, "t5", "soft_prompt")  # no target: the label's first label word
    enc, _, _ = prompts(words)
    assert enc.targets[:2] == ["terrible", "great"]


def test_encoder_backbone_is_refused(tiny_models):
    with pytest.raises(PtuneError, match="readout=generate needs a causal or seq2seq backbone"):
        gen_task(tiny_models, "bert", "soft_prompt")


def test_template_without_target_or_label_words_is_refused(tiny_models):
    cfg = make_cfg(tiny_models["gpt2"], "soft_prompt", family="causal")
    cfg.template.readout = "generate"
    cfg.template.label_words = None
    with pytest.raises(PtuneError, match="needs template.target"):
        make_task(cfg)


def test_generation_metrics():
    res = generation_metrics(["今天天气很好", "great"], ["今天天气不错", "great"])
    assert res["exact_match"] == res["accuracy"] == 0.5
    # character LCS of 今天天气很好 / 今天天气不错 is 4 of 6 -> F1 2/3; the second pair scores 1
    assert res["rouge_l"] == pytest.approx((2 / 3 + 1) / 2)
    assert generation_metrics(["今天天气很好"], ["今天天气很好"])["bleu"] == pytest.approx(100.0)
    assert 0 < res["bleu"] < 100


def test_generation_metrics_leave_a_redirected_stderr_open():
    """rouge-score's absl handler used to close whatever stderr was live when it was imported, once Hydra
    reconfigured logging: under pytest that was the capture file, and the suite died with "lost sys.stderr"."""
    script = (
        "import io, logging.config, sys\n"
        "sys.stderr = redirected = io.StringIO()\n"
        "from ptune.generation import generation_metrics\n"
        "generation_metrics(['a'], ['a'])\n"
        "sys.stderr = sys.__stderr__\n"
        "logging.config.dictConfig({'version': 1})  # what Hydra does on every run\n"
        "print('closed' if redirected.closed else 'open')\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "open"


# ------------------------------------------------------------------------------------ train, eval, predict, export
def test_ptune_train_of_a_generate_template_ends_with_its_metric(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """The console script's closing line read macro_f1, which a generate run does not have: a finished run ended in a
    KeyError traceback (found training +experiment=inews_title_ptv2)."""
    from ptune.cli import main

    from .test_cli import csv_overrides

    monkeypatch.chdir(tmp_path)
    main(["train", *csv_overrides(tiny_models, tiny_csv), f"backbone.name={tiny_models['gpt2']}",
          "template.readout=generate", "template.text='{text_a} It was {mask}'", "template.max_target_length=4",
          "trainer.metric=rouge_l", "trainer.max_steps=2", "trainer.eval_every=2", "hydra.run.dir=run"])
    done = capsys.readouterr().out.strip().splitlines()[-1]
    assert done.startswith("done: rouge_l ") and "macro_f1" not in done, done
    assert (tmp_path / "run" / "results.json").is_file()


def _train(tiny_models, tiny_csv, tmp_path, kind: str, method: str):
    from omegaconf import OmegaConf

    from ptune.config import compose
    from ptune.training import run_training

    from .test_cli import csv_overrides

    template = "{text_a} It was {mask}" if kind != "t5" else "{text_a} It was {mask}."
    cfg = compose([
        *csv_overrides(tiny_models, tiny_csv), f"backbone.name={tiny_models[kind]}", f"method={method}",
        "method.prompt_length=4", "trainer.precision=fp32", "trainer.device=cpu", "trainer.save_every=0",
        "trainer.max_steps=6", "trainer.eval_every=3", "trainer.lr=0.3", "template.readout=generate",
        f"template.text='{template}'", "template.max_target_length=4", "trainer.metric=rouge_l",
    ])
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    run = tmp_path / f"{kind}-{method}"
    return run, run_training(cfg, run)


@pytest.mark.parametrize(("kind", "method"), [("gpt2", "ptuning_v2"), ("t5", "soft_prompt")])
def test_train_eval_predict_generate(tiny_models, tiny_csv, tmp_path, kind, method):
    import json

    from ptune.checkpoint import read_checkpoint
    from ptune.inference import evaluate_checkpoint

    from .test_cli import ptune

    run, res = _train(tiny_models, tiny_csv, tmp_path, kind, method)
    assert set(res["metrics"]) >= {"exact_match", "rouge_l", "bleu"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]  # the target LM loss falls
    _, _, state = read_checkpoint(run / "checkpoint")
    assert state  # the prompt was saved
    out = evaluate_checkpoint(run, [f"dataset.dev_file={tiny_csv['dev']}"])
    assert out["rouge_l"] == pytest.approx(res["metrics"]["rouge_l"])
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text_a": "a gorgeous movie"}\n{"text_a": "boring"}\n')
    got = ptune("predict", str(run), "--input", str(inputs), "--generate", "--output", str(tmp_path / "o.jsonl"),
                cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(isinstance(r["text"], str) for r in rows)
    refused = ptune("predict", str(run), "--input", str(inputs), cwd=tmp_path)
    assert refused.returncode == 2 and "add --generate" in refused.stderr


def test_inews_title_generation_keeps_the_title_whole(tiny_models):
    """INEWS title generation: the long article content is truncated, the title (target) is kept whole."""
    from ptune.data import load_split

    cfg = make_cfg(tiny_models["gpt2"], "ptuning_v2", family="causal", prompt_length=4)
    from ptune.config import compose

    cfg.template = compose(["template=inews_title_gen", "dataset=inews"]).template
    cfg.dataset = compose(["dataset=inews"]).dataset
    task = make_task(cfg)
    split = load_split(cfg.dataset, "dev", None)
    examples, labels = split.examples[:8], split.labels[:8]
    enc = encode(task, examples, labels)
    tok = task.backbone.tokenizer
    # backbone.max_length minus template.max_target_length (minus the [SEP] dropped after the answer slot)
    assert all(len(r) == 64 - 48 - 1 for r in enc.input_ids)
    for ex, target in zip(examples, enc.target_ids, strict=True):
        assert target[:-1] == tok(ex["title"], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(("kind", "method"), [("llama", "ptuning_v2"), ("gpt2", "soft_prompt")])
def test_export_peft_of_a_generate_checkpoint(tiny_models, tiny_csv, tmp_path, kind, method):
    from ptune.export import export_peft

    run, _ = _train(tiny_models, tiny_csv, tmp_path, kind, method)
    info = export_peft(run, tmp_path / "peft")
    assert info["readout"]["kind"] == "generate" and info["verified_max_abs_diff"] <= 1e-4
