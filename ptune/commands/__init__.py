"""One module per `ptune` subcommand (train, eval, predict, search, report, export, show); ptune/cli.py only
dispatches to them. What they share: a user error is one line ``ptune: error: ...`` and exit code 2, a crashed run
one line and exit code 1."""

from __future__ import annotations

import os
import sys

from ..errors import one_line

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"ptune: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_failed(exc: Exception) -> None:
    """A single run that stopped on an error other than a PtuneError (a library's, a bug): one line naming it and
    exit 1, rather than Hydra's "Set the environment variable HYDRA_FULL_ERROR=1" epilogue or a bare traceback.
    Hydra's own switch HYDRA_FULL_ERROR=1 still shows the full traceback (the caller re-raises)."""
    fail(f"the run failed: {type(exc).__name__}: {one_line(exc, 500)} (HYDRA_FULL_ERROR=1 shows the traceback)",
         EXIT_RUN_FAILED)


def full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")  # torchao's and torch's import-time log lines are quieted in ptune/__init__
