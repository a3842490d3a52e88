"""Which examples a run uses: the train and evaluation splits of a config, seeded subsets and k-shot samples."""

from __future__ import annotations

import random

from omegaconf import DictConfig

from ..errors import PtuneError
from .sources import Split, k_shot, load_split


def sample_limit(value: object, key: str) -> int | None:
    """A ``dataset.max_*_samples`` value: an integer >= 1, or None for all.

    Checked before any data is read; ``-1`` or ``0`` used to mean "all" silently, which hid typos.
    """
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PtuneError(f"{key}={value!r} must be an integer >= 1, or null for all examples")
    return value


def subsample(split: Split, n: int | None, seed: int, key: str = "dataset.max_train_samples") -> Split:
    """``n`` examples drawn with ``random.Random(seed)`` (in file order), or the whole split for None or n >= size.

    ``key`` names the config value in the error for a bad ``n``.
    """
    n = sample_limit(n, key)
    if n is None or n >= len(split.labels):
        return split
    idx = sorted(random.Random(seed).sample(range(len(split.labels)), n))
    return Split(
        [split.examples[i] for i in idx], [split.labels[i] for i in idx], split.label_names, split.source
    )


VALIDATION_SEED = 0  # one held-out split for every run and trial, whatever trainer.seed is


def hold_out(split: Split, validation: float | int, stratify: bool) -> tuple[Split, Split]:
    """``dataset.validation``: (rest, held out), the held-out part a fraction (0 < v < 1) or a count (v >= 1) of the
    examples, drawn with ``random.Random(VALIDATION_SEED)``; both keep file order.

    ``stratify`` (``dataset.validation_stratify``, on by default): each class gives its share of the held-out
    examples (largest remainders, and never its last training example), so a rare class is judged on as many
    examples as its frequency allows. A plain random draw held out only 2 of CB's 16 neutral examples in 50, and a
    search selecting on that split could not see whether a trial ever predicted the class."""
    n_all = len(split.labels)
    n = round(validation * n_all) if validation < 1 else int(validation)
    if not 1 <= n < n_all:
        raise PtuneError(
            f"dataset.validation={validation!r} holds out {n} of {n_all} training examples: it must leave at least "
            "one on each side"
        )
    rng = random.Random(VALIDATION_SEED)
    if not stratify:
        held = set(rng.sample(range(n_all), n))
    else:
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(split.labels):
            by_class.setdefault(label, []).append(i)
        held = set()
        for label, count in _class_quotas({c: len(ix) for c, ix in sorted(by_class.items())}, n).items():
            held.update(rng.sample(by_class[label], count))

    def part(keep) -> Split:
        idx = [i for i in range(n_all) if keep(i)]
        return Split([split.examples[i] for i in idx], [split.labels[i] for i in idx], split.label_names, split.source)

    return part(lambda i: i not in held), part(lambda i: i in held)


def _class_quotas(counts: dict[int, int], n: int) -> dict[int, int]:
    """How many of ``n`` held-out examples each class gives: ``n * count / total`` rounded by largest remainder,
    at most ``count - 1`` per class while any class has room, so training keeps every class it can."""
    total = sum(counts.values())
    quotas = {c: min(n * k // total, max(k - 1, 0)) for c, k in counts.items()}
    by_remainder = sorted(counts, key=lambda c: (-(n * counts[c] % total), c))
    for cap in (lambda c: counts[c] - 1, lambda c: counts[c]):  # a class's last example only when nothing else is left
        while sum(quotas.values()) < n and any(quotas[c] < cap(c) for c in counts):
            for c in by_remainder:
                if sum(quotas.values()) < n and quotas[c] < cap(c):
                    quotas[c] += 1
    return quotas


def training_examples(cfg: DictConfig, seed: int) -> tuple[Split, Split | None]:
    """The examples training learns from, in the order it sees them, and the part ``dataset.validation`` holds out
    (None when unset). The one place that selects them: training (``load_train_dev``) and ``ptune show-template``
    both call it, so show-template never shows an example that training holds out."""
    ds = cfg.dataset
    max_train = sample_limit(ds.get("max_train_samples"), "dataset.max_train_samples")  # before reading data
    train = load_split(ds, "train", cfg.data.get("root"))
    held = None
    if ds.get("validation") is not None:
        train, held = hold_out(train, ds.validation, ds.validation_stratify)
    if ds.get("k_shot"):
        train = k_shot(train, int(ds.k_shot), seed)
    return subsample(train, max_train, seed), held


def load_train_dev(cfg: DictConfig, seed: int) -> tuple[Split, Split]:
    ds = cfg.dataset
    # bad limits are reported before reading (possibly large) data files
    max_eval = sample_limit(ds.get("max_eval_samples"), "dataset.max_eval_samples")
    train, dev = training_examples(cfg, seed)
    if dev is None:  # with dataset.validation, the held-out training examples: the eval split is never read
        dev = load_split(ds, str(ds.get("eval_split", "dev")), cfg.data.get("root"))
    dev = subsample(dev, max_eval, 0, "dataset.max_eval_samples")
    return train, dev
