"""`ptune search`'s pruning and budgets: the Optuna pruner of ``search.pruner``, the evaluation hook that reports
each held-out evaluation of a trial to it, the compute each trial spent, and the budgets that stop a search.

Pruning: the training loop (ptune/training.py) calls ``on_eval(step, value, examples, last)`` after each evaluation
and stops when it returns True, exactly as early stopping does: the best checkpoint so far and results.json are
written, so a pruned trial's folder is a normal run folder; the search then marks it ``PRUNED`` and tells Optuna
``TrialState.PRUNED``. The last evaluation is reported and never pruned: the trial has run all its steps, so
stopping it would save nothing and only turn a finished result into a pruned one. The loop knows nothing of
Optuna. The pruner is rebuilt from the saved ``search.yaml`` when a search is resumed, so it prunes against the
same settings.

Budgets (``search.timeout``, ``search.max_examples``) are checked between trials only: a trial that has started
runs to its end (or its pruning), so a search may pass its budget by at most one trial.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..config import SearchConfig
from ..errors import PtuneError, one_line

PRUNED = "PRUNED"  # the marker file in a pruned trial's folder

# The trial's compute, kept as Optuna user attributes (the report's columns): training steps, training examples
# seen (batch_size x grad_accum per step), wall seconds of the trial (loading and evaluation included).
COMPUTE = ("steps", "examples", "seconds")


def make_pruner(spec: SearchConfig):
    """Optuna's pruner for ``search.pruner`` with ``search.pruner_args``; a bad argument value is one line (Optuna
    raises ValueError or TypeError from the constructor, before the search writes anything)."""
    import optuna

    classes = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner}
    try:
        return classes[spec.pruner](**spec.pruner_args)
    except (TypeError, ValueError) as exc:
        raise PtuneError(f"search.pruner_args={spec.pruner_args!r} for search.pruner={spec.pruner}: "
                         f"{one_line(exc, 160)}") from None


@dataclass
class EvalReporter:
    """The ``on_eval`` hook of one trial: reports each evaluation to Optuna and asks its pruner whether to stop.
    Keeps the compute spent so far, so that a trial that fails later still records it."""

    trial: Any  # optuna.trial.Trial
    steps: int = 0
    examples: int = 0
    pruned_at: int | None = None
    value: float = float("nan")
    started: float = field(default_factory=time.perf_counter)

    def __call__(self, step: int, value: float, examples: int, last: bool) -> bool:
        self.steps, self.examples, self.value = step, examples, value
        self.trial.report(value, step)  # the last value too: later trials are judged against it at this step
        if not last and self.trial.should_prune():  # pruning at the last step would save nothing, lose a result
            self.pruned_at = step
            return True
        return False

    def record(self, results: dict | None = None) -> None:
        """Save the trial's compute as user attributes: results.json's when the run finished, else what the hook
        saw at the last evaluation (a failed trial's compute after that evaluation is not known)."""
        if results is not None:
            self.steps, self.examples = int(results["steps"]), int(results.get("examples_seen", self.examples))
        self.trial.set_user_attr("steps", self.steps)
        self.trial.set_user_attr("examples", self.examples)
        self.trial.set_user_attr("seconds", round(time.perf_counter() - self.started, 3))


def budget_spent(spec: SearchConfig, trials: list, started: float, ran: int) -> str | None:
    """Why no new trial may start (a message), or None: ``search.timeout`` seconds since this search started
    (once it ran ``ran`` >= 1 trials: as Optuna's ``optimize(timeout=)``, a search runs at least one), or
    ``search.max_examples`` training examples summed over the study's trials."""
    if spec.timeout is not None and ran and time.perf_counter() - started >= spec.timeout:
        return f"search.timeout={spec.timeout:g} s reached ({time.perf_counter() - started:.0f} s)"
    if spec.max_examples is not None:
        spent = sum(int(t.user_attrs.get("examples", 0)) for t in trials)
        if spent >= spec.max_examples:
            return f"search.max_examples={spec.max_examples} reached ({spent} training examples)"
    return None


def compute_totals(trials: list) -> dict[str, float]:
    """The compute summed over ``trials`` (the report's totals line)."""
    return {k: sum(float(t.user_attrs.get(k, 0) or 0) for t in trials) for k in COMPUTE}
