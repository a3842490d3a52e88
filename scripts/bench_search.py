"""Pruned against unpruned `ptune search`: the same space, the same sampler seed, one search per ``search.pruner``;
for each, the best held-out metric, the training examples all its trials spent, their seconds, and how many trials
were pruned (read back from each study's trials, as ``ptune report`` shows them).

    python scripts/bench_search.py OUT [--space SPACE] [--n-trials 16] [--seed 0] [--pruners none median]
                                       [--parallel] [-- extra trial overrides]

SPACE is a shipped space name (``sst2_ptv2``) or a YAML file; the default is a scaled-down SST-2 space written into
OUT (``SMALL_SPACE``: the packaged tiny cassette-bert, 120 steps of 16 examples, evaluated every 20 steps on 400
examples held out of a 3000-example subset of train, fp32) so that both searches fit in minutes on a CPU. Each
search runs as its own ``python -m ptune search`` into ``OUT/<pruner>``; rerunning continues them (the Optuna study
in each folder).
Writes ``OUT/bench_search.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SMALL_SPACE = """\
# scripts/bench_search.py's scaled-down SST-2 space: P-tuning v2 on the packaged cassette-bert (2 layers, hidden 128)
overrides: [backbone=cassette_bert, method=ptuning_v2, dataset=sst2, template=sst2_head, backbone.max_length=64,
            dataset.max_train_samples=3000, dataset.validation=400, trainer.batch_size=16, trainer.max_steps=120,
            trainer.eval_every=20, trainer.save_every=0, trainer.precision=fp32]
n_startup_trials: 5
params:
  trainer.lr: {type: float, low: 0.001, high: 0.3, log: true}
  trainer.head_lr: {type: float, low: 0.0001, high: 0.1, log: true}
  method.prompt_length: {type: categorical, choices: [4, 8, 16, 32]}
  trainer.schedule: {type: categorical, choices: [linear, cosine]}
"""


def summarise(folder: Path) -> dict:
    """One search folder's figures, from its Optuna study."""
    import optuna
    from optuna.trial import TrialState

    from ptune.commands.search import best_trial, open_study
    from ptune.commands.search_pruning import compute_totals

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(folder)
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    count = lambda s: sum(t.state == s for t in trials)  # noqa: E731
    return {"trials": len(trials), "complete": count(TrialState.COMPLETE), "pruned": count(TrialState.PRUNED),
            "failed": count(TrialState.FAIL), "best_value": None if best is None else best.value,
            "best_trial": None if best is None else best.number, **compute_totals(trials)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--space", default=None, help="shipped space name or YAML file (default: SMALL_SPACE)")
    parser.add_argument("--n-trials", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pruners", nargs="+", default=["none", "median"])
    parser.add_argument("--parallel", action="store_true", help="run the searches at once (split the threads with "
                        "-- trainer.num_threads=N; seconds then share the machine)")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: given to every trial of every search
    args = parser.parse_args(argv[:cut])
    args.overrides = argv[cut + 1:]
    args.out.mkdir(parents=True, exist_ok=True)
    space = args.space
    if space is None:
        space = str(args.out / "space.yaml")
        Path(space).write_text(SMALL_SPACE)
    procs = []
    for pruner in args.pruners:
        cmd = [sys.executable, "-m", "ptune", "search", f"+hparams_search={space}", f"search.dir={args.out / pruner}",
               f"search.pruner={pruner}", f"search.n_trials={args.n_trials}", f"search.seed={args.seed}",
               *args.overrides]
        print("$ " + " ".join(cmd), flush=True)
        log = (args.out / f"{pruner}.log").open("w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        if not args.parallel:
            procs[-1].wait()
    if any(p.wait() for p in procs):
        raise SystemExit(f"a search failed: see {args.out}/<pruner>.log")
    figures = {pruner: summarise(args.out / pruner) for pruner in args.pruners}
    base = figures.get("none")
    lines = ["| search.pruner | trials (complete / pruned / failed) | best held-out | training examples | "
             "vs none | seconds |", "|---|---|---|---|---|---|"]
    for pruner, f in figures.items():
        share = f"{f['examples'] / base['examples']:.0%}" if base and base["examples"] else "-"
        best = "-" if f["best_value"] is None else f"{f['best_value']:.4f} (trial {f['best_trial']})"
        lines.append(f"| {pruner} | {f['trials']} ({f['complete']} / {f['pruned']} / {f['failed']}) | {best} | "
                     f"{f['examples']:.0f} | {share} | {f['seconds']:.0f} |")
    print("\n".join(lines))
    (args.out / "bench_search.json").write_text(json.dumps({"space": space, "n_trials": args.n_trials,
                                                            "seed": args.seed, "overrides": args.overrides,
                                                            "figures": figures}, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
