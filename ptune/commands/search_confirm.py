"""`ptune search`'s confirmation (``search.confirm_seeds=N``): after the trials, the best trial's configuration is
trained again on the whole training split (its overrides minus the hold-out, ``dataset.validation=null``) with
seeds 0..N-1, each into ``<search folder>/confirm_seed_S/`` (a normal run folder), and evaluated on dev.

The trials selected on held-out training examples; these runs say what the winner is worth on dev, over seeds. Two
dev figures are reported: the metric at the last evaluation (the run's last step: nothing was chosen on dev) and
the best checkpoint's (chosen on dev, as ``ptune train`` does, so slightly optimistic). A confirmation already
finished for the same trial and seed is kept; one made for an earlier best trial is moved aside to
``confirm_seed_S.trial_NNN`` (never deleted); a confirmation that fails is marked ``FAILED`` and left out.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from ..atomic import atomic_write_json, atomic_write_text
from ..errors import PtuneError, one_line

CONFIRM = "confirm_seed_{}"
INFO = "confirm.json"  # in each confirmation folder: the trial and seed it confirms
HOLD_OUT = ("dataset.validation", "dataset.validation_stratify")


def confirm_overrides(overrides: list[str], seed: int) -> list[str]:
    """The trial's overrides trained on the whole training split with ``seed``: every hold-out or seed override
    dropped, then ``dataset.validation=null`` (evaluate on dev) and ``trainer.seed``."""
    drop = (*HOLD_OUT, "trainer.seed")
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in drop]
    return [*kept, "dataset.validation=null", f"trainer.seed={seed}"]


def confirm_best(folder: Path, best, seeds: int, train: Callable[[list[str], Path], dict]) -> None:
    """Train the best trial (a FrozenTrial) with seeds 0..seeds-1 into ``folder/confirm_seed_S`` with ``train``
    (``search.train_run``)."""
    if best is None:
        print("ptune search: no trial completed: nothing to confirm", file=sys.stderr, flush=True)
        return
    trial_dir = folder / best.user_attrs["run_dir"]
    overrides = [str(o) for o in OmegaConf.load(trial_dir / ".hydra" / "overrides.yaml")]
    for seed in range(seeds):
        run_dir = folder / CONFIRM.format(seed)
        wanted = {"trial": best.number, "seed": seed}
        if _info(run_dir) == wanted and (run_dir / "results.json").is_file():
            print(f"ptune search: {run_dir.name} already confirms trial {best.number}: kept", flush=True)
            continue
        if run_dir.exists():  # an earlier best trial's (or an unfinished) confirmation: kept aside, not deleted
            old = _info(run_dir) or {}
            aside = run_dir.with_name(f"{run_dir.name}.trial_{old.get('trial', 'unknown')}")
            n = 1
            while aside.exists():
                aside, n = run_dir.with_name(f"{run_dir.name}.trial_{old.get('trial', 'unknown')}.{n}"), n + 1
            run_dir.rename(aside)
        print(f"ptune search: confirming trial {best.number} with trainer.seed={seed} on the whole training split, "
              f"evaluated on dev, into {run_dir}", flush=True)
        run_dir.mkdir(parents=True)
        atomic_write_json(run_dir / INFO, wanted)
        try:
            train(confirm_overrides(overrides, seed), run_dir)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - the search's results stand; this confirmation is left out
            msg = one_line(exc)
            print(f"ptune search: confirmation {run_dir.name} failed: {msg}", file=sys.stderr, flush=True)
            atomic_write_text(run_dir / "FAILED", msg + "\n")


def _info(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / INFO).read_text())
    except (OSError, ValueError):
        return None


def confirmation(folder: Path, trial: int) -> dict | None:
    """The finished confirmations of ``trial`` in ``folder``: seeds, dev metric at the last evaluation and of the
    best checkpoint, with mean and sample std; None when there is none."""
    from ..report import _std

    seeds, last, best = [], [], []
    for run_dir in sorted(folder.glob(CONFIRM.format("*"))):
        info = _info(run_dir)
        if not info or info.get("trial") != trial or not (run_dir / "results.json").is_file():
            continue
        try:
            results = json.loads((run_dir / "results.json").read_text())
            history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            last.append(float(history[-1][results["metric"]]))
            best.append(float(results["best_metric"]))
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise PtuneError(f"{str(run_dir)!r} is not a finished run folder ({one_line(exc, 120)})") from None
        seeds.append(int(info["seed"]))
    if not seeds:
        return None
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    return {"trial": trial, "seeds": seeds, "last": last, "best": best,
            "last_mean": mean(last), "last_std": _std(last), "best_mean": mean(best), "best_std": _std(best)}


def describe(conf: dict, metric: str) -> str:
    """One line for search.md and the terminal."""
    return (f"dev {metric} over seeds {', '.join(map(str, conf['seeds']))} (whole training split): "
            f"{conf['last_mean']:.4f} ± {conf['last_std']:.4f} at the last step, {conf['best_mean']:.4f} ± "
            f"{conf['best_std']:.4f} for the best checkpoint (chosen on dev)")
