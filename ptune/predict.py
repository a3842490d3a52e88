"""`ptune predict`: class predictions of one or more prompt checkpoints, written as JSONL.

Every input is scored by every checkpoint given (or only by the one its ``"checkpoint"`` key names). All
checkpoints share one backbone and the rows of different prompts are mixed in the same batches
(``ptune.serving``). One output line per (input, checkpoint)::

    {"index": 0, "checkpoint": "runs/a", "label": 1, "label_name": "positive",
     "probs": {"negative": 0.12, "positive": 0.88}}

``probs`` is the softmax of the class scores (verbalizer scores or head logits).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import PtuneError


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise PtuneError(f"input file {str(path)!r} does not exist")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PtuneError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise PtuneError(f'{path}:{n}: each line must be a JSON object such as {{"text_a": "..."}}')
        rows.append(obj)
    if not rows:
        raise PtuneError(f"input file {str(path)!r} holds no JSON lines")
    return rows


def _columns(prompt, name: str) -> list[str]:
    """Where a template field may be found in an input object: its own name, then the data set's column."""
    cands = [name]
    fields = prompt.cfg.dataset.get("fields")
    if isinstance(fields, Mapping) and fields.get(name):
        cands.append(str(fields[name]))
    try:  # built-in data sets (sst2: text_a -> sentence, cb: text_a -> premise, ...)
        from .data import sources

        spec = sources._BUILTINS.get(str(prompt.cfg.dataset.get("name")))
        if spec is not None and name in spec.fields:
            cands.append(spec.fields[name])
    except (ImportError, AttributeError):
        pass
    return list(dict.fromkeys(cands))


def example_for(prompt, obj: Mapping[str, Any], where: str) -> dict[str, str]:
    out = {}
    for name in prompt.fields:
        for col in _columns(prompt, name):
            if col in obj and obj[col] is not None:
                out[name] = str(obj[col])
                break
        else:
            raise PtuneError(
                f"{where}: no field {name!r} for checkpoint {prompt.name!r} (its template "
                f"{prompt.task.renderer.template.source!r} reads {', '.join(prompt.fields)}; "
                f"the input has {', '.join(sorted(obj)) or 'no keys'})"
            )
    return out


def _route(obj: Mapping[str, Any], prompts: list, where: str) -> list[int]:
    """Prompt indices an input goes to: all, or the one named by its "checkpoint" key (path or index)."""
    if "checkpoint" not in obj:
        return list(range(len(prompts)))
    want = obj["checkpoint"]
    if isinstance(want, int) and not isinstance(want, bool) and 0 <= want < len(prompts):
        return [want]
    if isinstance(want, str):
        target = Path(want).resolve()
        for i, p in enumerate(prompts):
            ckpt = Path(p.checkpoint).resolve()
            if want == p.name or target in (ckpt, ckpt.parent, Path(p.name).resolve()):
                return [i]
    names = ", ".join(p.name for p in prompts)
    raise PtuneError(f'{where}: "checkpoint": {want!r} is none of the checkpoints given ({names})')


def predict(
    paths: Sequence[str],
    inputs: Sequence[Mapping[str, Any]],
    overrides: Sequence[str] = (),
    batch_size: int = 32,
    device: str | None = None,
    server=None,
    source: str = "input",
) -> list[dict[str, Any]]:
    from .serving import PromptServer

    server = server or PromptServer(paths, overrides, device=device)
    names = [p.name for p in server.prompts]
    requests, owners = [], []
    for n, obj in enumerate(inputs):
        where = f"{source} line {n + 1}"
        for i in _route(obj, server.prompts, where):
            requests.append((i, example_for(server.prompts[i], obj, where)))
            owners.append(n)
    scores = server.scores(requests, batch_size=batch_size)
    rows = []
    for (i, _), n, s in zip(requests, owners, scores, strict=True):
        labels = server.prompts[i].label_names
        probs = torch.softmax(s.float(), -1).tolist()
        k = int(torch.argmax(s))
        rows.append(
            {
                "index": n,
                "checkpoint": names[i],
                "label": k,
                "label_name": labels[k],
                "probs": {name: round(p, 6) for name, p in zip(labels, probs, strict=True)},
            }
        )
    return rows


def predict_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="ptune predict",
        description="Predict labels with one or more prompt checkpoints of the same backbone (mixed batches).",
    )
    parser.add_argument("paths", nargs="+", help="run folders or checkpoint/ folders, then key=value overrides")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help='JSONL file: one object per line with the template fields, e.g. {"text_a": ...}')
    src.add_argument("--text", help="one input text (fills the template's first field)")
    parser.add_argument("--output", help="JSONL file to write (default: standard output)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    args = parser.parse_args(argv)
    paths = [p for p in args.paths if "=" not in p]
    overrides = [p for p in args.paths if "=" in p]
    if not paths:
        raise PtuneError("ptune predict needs at least one checkpoint path")
    if args.batch_size <= 0:
        raise PtuneError(f"--batch-size {args.batch_size} must be > 0")
    from .serving import PromptServer

    server = PromptServer(paths, overrides, device=args.device)
    if args.input is not None:
        inputs, source = read_jsonl(args.input), str(args.input)
    else:
        many = [p.name for p in server.prompts if len(p.fields) > 1]
        if many:
            raise PtuneError(
                f"--text fills one field, but the template of {many[0]!r} reads several: use --input with JSONL"
            )
        inputs = [{p.fields[0]: args.text for p in server.prompts}]
        source = "--text"
    rows = predict(paths, inputs, batch_size=args.batch_size, server=server, source=source)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.output:
        from .checkpoint import atomic_write_text

        atomic_write_text(Path(args.output), text)
        print(f"wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
