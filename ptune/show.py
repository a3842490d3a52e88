"""`ptune show-template [--n N] [Hydra overrides]`: the exact tokens the model reads for a few training examples.

Soft positions print as ``<soft:i>`` (i = index of the prompt vector), the answer slot as ``[[MASK]]`` (MLM, the
mask token itself), ``<answer>`` after the position whose next-token logits are read (causal LM), or a
decoder note (seq2seq); a linear head says so, a generate readout shows each example's target text. Then the
truncation count per example and the token ids of every class's label words (a generate readout: where its
targets come from and how it decodes). ``describe`` returns the text, so it is testable without the console.
"""

from __future__ import annotations

import argparse
import re

from .errors import PtuneError, one_line

DEFAULT_N = 3
_N_OVERRIDE = re.compile(r"^\+{0,2}show\.n=(.*)$")


def _token_text(tok: str) -> str:
    """Make whitespace and control characters in a token visible (Gemma has '\\n' tokens, T5 '▁' pieces)."""
    return "".join("␣" if c == " " else c if c.isprintable() else repr(c)[1:-1] for c in tok)


def render_tokens(task, input_ids: list[int], answer_pos: int) -> str:
    """One line: the tokens in order, soft positions numbered, the answer slot marked."""
    from .template import SOFT_ID

    tok = task.backbone.tokenizer
    mode = task.renderer.answer_mode
    out: list[str] = []
    soft = 0
    for pos, i in enumerate(input_ids):
        if i == SOFT_ID:
            out.append(f"<soft:{soft}>")
            soft += 1
            continue
        text = _token_text(tok.convert_ids_to_tokens(i))
        if mode == "mask" and pos == answer_pos:
            text = f"[{text}]" if text.startswith("[") and text.endswith("]") else f"[[{text}]]"
        out.append(text)
        if mode == "end" and pos == answer_pos:
            out.append("<answer>")
    line = " ".join(out)
    if mode == "end" and answer_pos < 0:
        line = "<answer> " + line
    if mode == "drop":
        line += "  => decoder: <start> <answer>"
    elif mode == "none":
        line += f"  => {task.model.readout.describe()}"
    return line


def describe(task, examples: list[dict[str, str]], labels: list[int], n: int = DEFAULT_N) -> str:
    r = task.renderer
    tok = task.backbone.tokenizer
    where = {
        "mask": "the [[MASK]] token's MLM logits",
        "end": "the next-token logits at <answer>",
        "drop": "the decoder's first step",
        "none": "a linear head on the pooled encoder output",
    }[r.answer_mode]
    gen = generate_readout(task)
    if gen is not None:
        where = "the text the backbone writes " + ("at <answer>" if r.answer_mode == "end" else "from the decoder")
    if task.verbalizer is not None and task.verbalizer.multi_token == "full":
        where = "the log-likelihood of each label word's tokens " + (
            "written after <answer>" if r.answer_mode == "end" else "fed to the decoder"
        )
    lines = [
        f"backbone {task.backbone.identity.get('name_or_path', '?')} ({task.backbone.family}), method "
        f"{task.method.name}; class scores from {where}",
        f"template {r.template.source!r}; max_length {r.max_length}, truncate {r.truncate_side}, "
        f"{r.num_soft} soft tokens ({r.prepend_soft} prepended)",
        "",
    ]
    for k, (ex, lab) in enumerate(zip(examples[:n], labels[:n], strict=True), start=1):
        rend = r.render(ex)
        lines.append(
            f"example {k}: label {task.label_names[lab]!r}, {len(rend.input_ids)} tokens, "
            f"truncated {rend.truncated} tokens"
        )
        lines.append("  " + render_tokens(task, rend.input_ids, rend.answer_pos))
        if gen is not None:
            lines.append(f"  target {gen.target_text(ex, lab)!r}")
    lines.append("")
    if gen is not None:
        s = gen.settings
        source = (f"the field {gen.target!r} of each example" if gen.target is not None
                  else "each class's first label word (" + ", ".join(
                      f"{n} -> {gen.label_words[n][0]!r}" for n in task.label_names) + ")")
        lines.append(f"readout: generate (no head, no label-word scores): the target text is {source}; "
                     f"decoding {s['strategy']}" + (f" ({s['num_beams']} beams)" if s["strategy"] == "beam" else "")
                     + f", at most {gen.max_target_length} tokens")
        return "\n".join(lines) + "\n"
    v = task.verbalizer
    if v is None:
        lines.append(f"readout: linear head over {len(task.label_names)} classes (no label words)")
        return "\n".join(lines) + "\n"
    note = {"first": "first token scored", "mean": "mean of token logits", "full": "full-sequence log-likelihood"}
    lines.append(f"label words (multi_token={v.multi_token}: {note[v.multi_token]}); token ids per class:")
    width = max(len(c) for c in v.label_names)
    for c, name in enumerate(v.label_names):
        parts = []
        for w, word in enumerate(v.words[c]):
            ids = v.token_ids[c, w][v.token_mask[c, w]].tolist()
            shown = " ".join(_token_text(t) for t in tok.convert_ids_to_tokens(ids))
            parts.append(f"{word!r} -> {ids} {shown}")
        lines.append(f"  {name:<{width}}  " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def generate_readout(task):
    """The task's readout where it writes text (template.readout=generate), or None for a classifier."""
    return task.model.readout if task.model.readout.generates_text else None


def split_args(argv: list[str]) -> tuple[int, list[str]]:
    parser = argparse.ArgumentParser(
        prog="ptune show-template",
        description="Print the exact tokens fed to the model for the first training examples.",
    )
    parser.add_argument("--n", type=int, default=None, help=f"examples to show (default {DEFAULT_N})")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for ptune train")
    args = parser.parse_args(argv)
    n, overrides = args.n, []
    for item in args.overrides:
        m = _N_OVERRIDE.match(item)
        if m:
            try:
                n = int(m.group(1))
            except ValueError:
                raise PtuneError(f"show.n={m.group(1)!r} must be an integer") from None
        else:
            overrides.append(item)
    n = DEFAULT_N if n is None else n
    if n <= 0:
        raise PtuneError(f"show.n={n} must be >= 1")
    return n, overrides


def load_config(overrides: list[str]):
    from omegaconf import OmegaConf

    from .config import compose

    try:
        cfg = compose(overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra raises many types for bad overrides
        raise PtuneError(one_line(exc)) from None
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    return cfg


def show_template_text(overrides: list[str], n: int = DEFAULT_N) -> str:
    from .build import build_task
    from .config import trainer_config
    from .data import training_examples

    cfg = load_config(overrides)
    seed = trainer_config(cfg).seed
    split, _ = training_examples(cfg, seed)  # the examples training sees, in its order (no held-out ones)
    task = build_task(cfg, split.label_names, seed)
    return describe(task, split.examples, split.labels, n)
