"""`ptune eval PATH... [key=value overrides]`: evaluate saved prompt checkpoints, one table row each."""

from __future__ import annotations

import argparse

from . import fail


def eval_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ptune eval", description="Evaluate saved prompt checkpoints.")
    parser.add_argument(
        "paths", nargs="+", help="run folders or checkpoint/ folders, then key=value overrides"
    )
    args = parser.parse_args(argv)
    paths = [p for p in args.paths if "=" not in p]
    overrides = [p for p in args.paths if "=" in p]
    if not paths:
        fail("ptune eval needs at least one checkpoint path")
    from ..inference import eval_overrides, evaluate_checkpoint

    rows = []
    for p in paths:
        rows.append(evaluate_checkpoint(p, eval_overrides(overrides)))
    print_eval_table(rows)


def print_eval_table(rows: list[dict]) -> None:
    from ..progress import print_table

    # the per-checkpoint metrics lines were printed by evaluate_checkpoint
    print_table("ptune eval", ["checkpoint", "split", "examples", "accuracy", "macro_f1", "eval ex/s"], (
        [
            r["checkpoint"],
            r["split"],
            str(r["examples"]),
            f"{r['accuracy']:.4f}",
            f"{r['macro_f1']:.4f}" if "macro_f1" in r else f"rouge_l {r.get('rouge_l', 0.0):.4f}",
            f"{r['eval_examples_per_s']:.1f}",
        ]
        for r in rows
    ))
