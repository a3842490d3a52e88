"""`ptune show-template`: the exact tokens the model reads, for tiny models of each family."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptune.cli import main
from ptune.show import show_template_text

from .helpers import SENTENCES

LONG = " ".join(["very"] * 80) + " long review"


@pytest.fixture()
def csv_data(tmp_path) -> Path:
    rows = [(LONG, "positive")] + [(s, ["negative", "positive"][i % 2]) for i, s in enumerate(SENTENCES)]
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows), encoding="utf-8")
    return path


def overrides(model: Path, data: Path, *extra: str) -> list[str]:
    return [
        "backbone=hf",
        f"backbone.name={model}",
        "backbone.max_length=48",
        "backbone.dtype=float32",
        "dataset=csv",
        f"dataset.train_file={data}",
        f"dataset.dev_file={data}",
        "dataset.label_names=[negative,positive]",
        "method=soft_prompt",
        "method.prompt_length=2",
        *extra,
    ]


def example_lines(text: str) -> list[str]:
    lines = text.splitlines()
    return [lines[i + 1].strip() for i, line in enumerate(lines) if line.startswith("example ")]


def test_bert_mlm(tiny_models, csv_data):
    text = show_template_text(overrides(tiny_models["bert"], csv_data, "template=sst2_mlm"), n=2)
    first, second = example_lines(text)
    assert second == ("[CLS] <soft:0> <soft:1> a gorgeous , witty , seductive movie . it was [[MASK]] . [SEP]")
    # the long review is cut to fit max_length 48, keeping the template words and the mask
    assert first.startswith("[CLS] <soft:0> <soft:1> very very") and first.endswith("it was [[MASK]] . [SEP]")
    assert len(first.split()) == 48 and "long" not in first
    assert "example 1: label 'positive', 48 tokens, truncated 42 tokens" in text
    assert "example 2: label 'negative', 16 tokens, truncated 0 tokens" in text
    assert "class scores from the [[MASK]] token's MLM logits" in text
    assert "label words (multi_token=first" in text
    assert "  negative  'terrible' -> [6659] terrible" in text
    assert "  positive  'great' -> [2307] great" in text


def test_gpt2_causal_soft_template(tiny_models, csv_data):
    text = show_template_text(
        overrides(
            tiny_models["gpt2"],
            csv_data,
            "template=sst2_lm",
            "template.text='{soft:\"the review\"} {text_a} {soft} It was {mask}'",
            "template.multi_token=full",
            "+template.label_words.negative=[terrible,unwatchable]",
        ),
        n=2,
    )
    assert example_lines(text)[1] == (
        "[CLS] <soft:0> <soft:1> <soft:2> <soft:3> a gorgeous , witty , seductive movie . <soft:4> it was <answer> "
        "[SEP]"
    )
    assert "4 soft tokens (2 prepended)" not in text and "5 soft tokens (2 prepended)" in text
    assert "log-likelihood of each label word's tokens written after <answer>" in text
    assert "multi_token=full: full-sequence log-likelihood" in text
    assert "'unwatchable' -> [4895, 18866, 3085] un ##watch ##able" in text


def test_seq2seq_and_head_readouts(tiny_models, csv_data):
    text = show_template_text(overrides(tiny_models["t5"], csv_data, "template=sst2_mlm"), n=1)
    assert example_lines(text)[0].endswith("it was . [SEP]  => decoder: <start> <answer>")
    text = show_template_text(overrides(tiny_models["bert"], csv_data, "template=sst2_head"), n=1)
    assert example_lines(text)[0].endswith("[SEP]  => linear head (mean pooling)")
    assert "readout: linear head over 2 classes (no label words)" in text and "label words (" not in text


def test_deep_prompt_method_shows_no_soft_positions(tiny_models, csv_data):
    args = overrides(tiny_models["llama"], csv_data, "template=sst2_lm", "method=ptuning_v2")
    text = show_template_text(args, n=1)
    assert "method ptuning_v2" in text and "<soft:" not in text
    assert "0 soft tokens (0 prepended)" in text


def test_cli_n_flag_and_override(tiny_models, csv_data, capsys):
    args = overrides(tiny_models["bert"], csv_data, "template=sst2_mlm")
    main(["show-template", "--n", "1", *args])
    assert len(example_lines(capsys.readouterr().out)) == 1
    main(["show-template", *args, "show.n=4"])
    assert len(example_lines(capsys.readouterr().out)) == 4
    main(["show-template", *args])
    assert len(example_lines(capsys.readouterr().out)) == 3


@pytest.mark.parametrize(
    "extra,needle",
    [(["show.n=0"], "show.n=0"), (["show.n=x"], "show.n"), (["template=no_such_template"], "no_such_template")],
)
def test_cli_errors_are_one_line(tiny_models, csv_data, capsys, extra, needle):
    with pytest.raises(SystemExit) as exc:
        main(["show-template", *overrides(tiny_models["bert"], csv_data, "template=sst2_mlm"), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptune: error:") and needle in err[0]


def test_validation_hold_out_is_not_shown(tiny_models, csv_data):
    """With dataset.validation set, training learns from the examples left after the hold-out: show-template must
    show those, never the held-out ones (it once repeated the selection without the hold-out)."""
    from omegaconf import OmegaConf

    from ptune.config import compose
    from ptune.data import load_train_dev

    args = overrides(tiny_models["bert"], csv_data, "template=sst2_mlm", "dataset.validation=3")
    text = show_template_text(args, n=10)
    cfg = compose(args)
    OmegaConf.set_struct(cfg, False)
    train, held = load_train_dev(cfg, 0)
    assert len(train.labels) == 4 and len(held.labels) == 3
    shown = [line for line in text.splitlines() if line.startswith("example ")]
    assert len(shown) == 4, text  # 7 rows in the file, 3 held out
    expected = show_template_text([*args, "dataset.validation=null"], n=10)
    rows = example_lines(expected)  # every row of the file, in file order
    full = [ex["text_a"] for ex in load_train_dev(compose([*args, "dataset.validation=null"]), 0)[0].examples]
    kept = [rows[full.index(ex["text_a"])] for ex in train.examples]
    assert example_lines(text) == kept
