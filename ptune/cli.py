"""The `ptune` console script: `train` hands over to Hydra (single run or `-m` multirun), the other
subcommands take a checkpoint path plus dotted overrides. User errors end in one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import PtuneError
from .show import show_template_main

EXIT_USER_ERROR = 2


def config_dir() -> Path:
    """The conf/ tree: beside the package in a source checkout, or shipped inside it."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "conf", here / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise PtuneError("cannot find ptune's conf/ folder next to the package")


def fail(message: str) -> None:
    print(f"ptune: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def compose(overrides: list[str]):
    """Compose the config as Hydra would, to validate a single run's overrides before starting it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _discard_failed_run(out: Path) -> None:
    """A run that failed before saving any checkpoint leaves nothing behind but Hydra's bookkeeping."""
    import shutil

    if out.is_dir() and not (out / "checkpoint").exists():
        shutil.rmtree(out, ignore_errors=True)
        parent = out.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def resume_run(argv: list[str]) -> None:
    """`ptune train --resume RUN_DIR`: continue a killed run in place with the config it started with."""
    from omegaconf import OmegaConf

    from .train import run_training

    if len(argv) != 1:
        fail("usage: ptune train --resume RUN_DIR")
    run = Path(argv[0])
    saved = run / ".hydra" / "config.yaml"
    if not saved.is_file():
        fail(f"{str(run)!r} is not a ptune run folder (no .hydra/config.yaml)")
    cfg = OmegaConf.load(saved)
    cfg.trainer.resume = True
    results = run_training(cfg, run)
    print(f"done: {results['metric']} {results['best_metric']:.4f} (step {results['best_step']}); run folder {run}")


def train_main(argv: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    if argv[:1] == ["--resume"]:
        resume_run(argv[1:])
        return
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if not multirun and not any(a.startswith("-") for a in argv):
        try:
            compose(argv)
        except Exception as exc:  # noqa: BLE001 - Hydra raises many types for bad overrides
            fail(_one_line(exc))

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base=None)
    def _run(cfg: DictConfig) -> float | None:
        from .train import run_training

        out = Path(HydraConfig.get().runtime.output_dir)
        try:
            results = run_training(cfg, out)
        except PtuneError as exc:
            if multirun:  # a failed job is reported and marked; the sweep's other jobs go on
                print(f"ptune: job {out} failed: {exc}", file=sys.stderr)
                (out / "FAILED").write_text(str(exc) + "\n")
                return None
            if os.environ.get("RANK", "0") == "0":
                _discard_failed_run(out)
            fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - in a sweep any crash fails only its own job
            if not multirun:
                raise
            import traceback

            print(f"ptune: job {out} failed: {_one_line(exc)}", file=sys.stderr)
            (out / "FAILED").write_text(f"{type(exc).__name__}: {_one_line(exc)}\n\n{traceback.format_exc()}")
            return None
        if os.environ.get("RANK", "0") == "0":
            print(
                f"done: {results['metric']} {results['best_metric']:.4f} (step {results['best_step']}), "
                f"macro_f1 {results['metrics']['macro_f1']:.4f}; run folder {out}"
            )
        return results["best_metric"]

    from . import distributed

    argv = distributed.hydra_overrides(argv)  # under torchrun: one shared run folder, rank 0 writes
    sys.argv = ["ptune train", *argv]
    _run()
    distributed.cleanup()
    if multirun:
        from .report import LAST_SWEEP

        if LAST_SWEEP.get("failed"):
            print(
                f"ptune: {LAST_SWEEP['failed']} of {LAST_SWEEP['failed'] + LAST_SWEEP['finished']} jobs failed "
                f"(see {LAST_SWEEP['dir']}/summary.md)",
                file=sys.stderr,
            )
            raise SystemExit(1)


def eval_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ptune eval", description="Evaluate saved prompt checkpoints.")
    parser.add_argument(
        "paths", nargs="+", help="run folders or checkpoint/ folders, then key=value overrides"
    )
    args = parser.parse_args(argv)
    paths = [p for p in args.paths if "=" not in p]
    overrides = [p for p in args.paths if "=" in p]
    # dataset.split=NAME picks the split to evaluate (not a key of the saved config, so add it)
    overrides = [f"+{o}" if o.startswith("dataset.split=") else o for o in overrides]
    if not paths:
        fail("ptune eval needs at least one checkpoint path")
    from .inference import evaluate_checkpoint, print_eval_table

    rows = []
    for p in paths:
        rows.append(evaluate_checkpoint(p, overrides))
    print_eval_table(rows)


def _lazy(module: str, function: str):
    """A subcommand whose module (and its heavy imports) loads only when it runs."""

    def run(argv: list[str]) -> None:
        import importlib

        getattr(importlib.import_module(f"ptune.{module}"), function)(argv)

    return run


COMMANDS = {
    "train": (train_main, "train a prompt; Hydra overrides follow (`-m` for a multirun sweep)"),
    "eval": (eval_main, "evaluate checkpoints: PATH... [key=value overrides]"),
    "show-template": (show_template_main, "print the exact tokens fed to the model: [--n N] [Hydra overrides]"),
    "report": (
        _lazy("report", "report_main"),
        "summarise a sweep over seeds: DIR (table, summary.csv/.md/.png)",
    ),
    "predict": (
        _lazy("predict", "predict_main"),
        "predict with one or more checkpoints (mixed batches): PATH... --input F.jsonl | --text T [--output O]",
    ),
    "export": (
        _lazy("export", "export_main"),
        "export a checkpoint for other libraries: PATH --format peft --output DIR",
    ),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="ptune",
        description="Prompt tuning of frozen transformers: soft prompts, P-tuning v1/v2, prefix tuning.",
        epilog="\n".join(f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\n`ptune train --help` shows the Hydra config groups.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), help="subcommand (see below)")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0 if argv else EXIT_USER_ERROR)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command {command!r}: use one of {', '.join(COMMANDS)}")
    _quiet()
    try:
        COMMANDS[command][0](rest)
    except PtuneError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted")
