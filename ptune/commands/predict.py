"""`ptune predict PATH... --input F.jsonl | --text T [--output O] [--generate]`: class predictions (or generated
text) of one or more checkpoints, in mixed batches; input and output checked before any model loads."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import PtuneError
from ..predict import check_output_path, predict, read_jsonl


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
    parser.add_argument(
        "--generate", action="store_true",
        help='write the generated text of template.readout=generate checkpoints: {"index", "checkpoint", "text"}',
    )
    args = parser.parse_args(argv)
    paths = [p for p in args.paths if "=" not in p]
    overrides = [p for p in args.paths if "=" in p]
    if not paths:
        raise PtuneError("ptune predict needs at least one checkpoint path")
    if args.batch_size <= 0:
        raise PtuneError(f"--batch-size {args.batch_size} must be > 0")
    # input and output are checked before loading any model: a bad file should cost no waiting
    output = check_output_path(args.output, args.input) if args.output else None
    inputs = read_jsonl(args.input) if args.input is not None else []
    if args.generate:
        rows = _generated_rows(args, paths, overrides, inputs)
    else:
        rows = _class_rows(args, paths, overrides, inputs)
    # allow_nan=False: predict() already maps non-finite scores to null; a NaN slipping through must fail here
    # rather than write a line no strict JSON reader accepts
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    bad = sum(1 for r in rows if r.get("error"))
    if bad:
        print(f"ptune: warning: {bad} of {len(rows)} predictions have non-finite scores (label null)", file=sys.stderr)
    if output is not None:
        from ..atomic import atomic_write_text

        try:
            atomic_write_text(output, text)
        except OSError as exc:
            raise PtuneError(f"--output {args.output!r} could not be written: {exc.strerror or exc}") from None
        print(f"wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _generated_rows(args, paths: list[str], overrides: list[str], inputs: list[dict]) -> list[dict[str, Any]]:
    from ..predict import predict_generate

    if args.input is None:  # --text fills the first field of each checkpoint's template
        from ..inference import load_task

        fields = load_task(paths[0], overrides)[0].renderer.template.field_names
        if len(fields) > 1:
            raise PtuneError(f"--text fills one field, but the template of {paths[0]!r} reads several: use --input")
        inputs = [{fields[0]: args.text}]
    source = str(args.input) if args.input is not None else "--text"
    return predict_generate(paths, inputs, overrides, args.batch_size, args.device, source)


def _class_rows(args, paths: list[str], overrides: list[str], inputs: list[dict]) -> list[dict[str, Any]]:
    from ..serving import PromptServer

    server = PromptServer(paths, overrides, device=args.device)
    for p in server.prompts:
        p.task.model.readout.check_prediction(False, p.name)
    if args.input is not None:
        source = str(args.input)
    else:
        many = [p.name for p in server.prompts if len(p.fields) > 1]
        if many:
            raise PtuneError(
                f"--text fills one field, but the template of {many[0]!r} reads several: use --input with JSONL"
            )
        inputs = [{p.fields[0]: args.text for p in server.prompts}]
        source = "--text"
    return predict(paths, inputs, batch_size=args.batch_size, server=server, source=source)
