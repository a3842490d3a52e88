"""The `ptune` console script: `train` hands over to Hydra (single run or `-m` multirun), the other
subcommands take a checkpoint path plus dotted overrides. User errors end in one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import config, runfolder
from .config import compose, config_dir
from .errors import PtuneError, one_line
from .show import show_template_main

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
# Hydra's log of a run, in its folder: Hydra names the job after the file of the task function (this one).
JOB_LOG = "cli.log"


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"ptune: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_failed(exc: Exception) -> None:
    """A single run that stopped on an error other than a PtuneError (a library's, a bug): one line naming it and
    exit 1, rather than Hydra's "Set the environment variable HYDRA_FULL_ERROR=1" epilogue or a bare traceback.
    Hydra's own switch HYDRA_FULL_ERROR=1 still shows the full traceback (the caller re-raises)."""
    fail(f"the run failed: {type(exc).__name__}: {one_line(exc, 500)} (HYDRA_FULL_ERROR=1 shows the traceback)",
         EXIT_RUN_FAILED)


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")  # torchao's and torch's import-time log lines are quieted in ptune/__init__


def resume_run(argv: list[str]) -> dict:
    """`ptune train --resume RUN_DIR` (and ``ptune.train(resume=RUN_DIR)``): continue a killed run in place with the
    config it started with; returns its results."""
    from .checkpoint import load_plain_yaml
    from .train import run_training

    if len(argv) != 1:
        raise PtuneError("usage: ptune train --resume RUN_DIR")
    run = Path(argv[0])
    saved = run / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise PtuneError(f"{str(run)!r} is not a ptune run folder (no .hydra/config.yaml)")
    cfg = load_plain_yaml(saved, interpolation=True)
    cfg.trainer.resume = True
    folder = runfolder.RunFolder.survey(run)
    try:
        results = run_training(cfg, run)
    except BaseException:  # a failure, a crash or Ctrl-C: the folder as it was, byte for byte
        folder.undo()
        raise
    print(f"done: {results['metric']} {results['best_metric']:.4f} (step {results['best_step']}); run folder {run}")
    return results


def _pin(argv: list[str], key: str, value: str) -> list[str]:
    """Replace any override of ``key`` by ``key=value``: Hydra's run and sweep folders are pinned to the ones
    resolved before the start (their ${now:} would otherwise be resolved again, a second later). The value is
    quoted, so a folder named with spaces, braces, commas or quotes reaches Hydra unchanged."""
    return [*(a for a in argv if not a.lstrip("+").startswith(f"{key}=")), f"{key}={hydra_quote(value)}"]


def hydra_quote(value: str) -> str:
    """``value`` as a Hydra quoted string: a quote is escaped by a backslash, and backslashes right before a quote
    or at the end are doubled (elsewhere Hydra reads them literally)."""
    import re

    body = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", value)
    return "'" + re.sub(r"(\\+)$", lambda m: m[1] * 2, body) + "'"


def preflight(cfg) -> runfolder.RunFolder:
    """Check a single run's folder before Hydra writes into it: writable, not held by a live run, not holding a
    run already (unless resuming it, and then not a finished one). Returns what existed there before."""
    from omegaconf import OmegaConf

    run_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
    runfolder.check_writable(run_dir)
    folder = runfolder.RunFolder.survey(run_dir)
    holder = runfolder.holder_of(run_dir)
    if holder:
        raise PtuneError(
            f"run folder {str(run_dir)!r} is in use by another ptune run ({holder}): wait for it to end, "
            "or choose another hydra.run.dir"
        )
    resume = OmegaConf.select(cfg, "trainer.resume") is True
    found = folder.has_run()
    if found and not resume:
        raise PtuneError(
            f"hydra.run.dir={str(run_dir)!r} already holds a run ({found}): choose a new folder, or continue it "
            f"with `ptune train --resume {run_dir}`"
        )
    if resume and "results.json" in folder.entries_before and "resume" not in folder.entries_before:
        raise PtuneError(f"run {str(run_dir)!r} is finished (results.json): nothing to resume, nothing changed")
    # A new run adds new names only to a folder of the user's. A lock file (nobody holds it: checked above) marks
    # the leftovers of a ptune run killed before its first evaluation, which a new or resumed run may replace.
    if not found and runfolder.LOCK_NAME not in folder.entries_before:
        runfolder.refuse_replacing(folder, new_run_names(cfg), "hydra.run.dir")
    return folder


def new_run_names(cfg) -> list[str]:
    """What a new run writes into its folder (``runfolder.OUTPUT_NAMES``, Hydra's log), less the lock file (a
    killed run's is reused) and MLflow's default store unless this run opens it there."""
    from omegaconf import OmegaConf

    names = [n for n in runfolder.OUTPUT_NAMES if n != runfolder.LOCK_NAME] + [JOB_LOG]
    loggers = OmegaConf.select(cfg, "trainer.loggers") or []
    if "mlflow" not in loggers or OmegaConf.select(cfg, "trainer.mlflow_uri"):
        names = [n for n in names if n not in (runfolder.MLFLOW_DB, runfolder.MLFLOW_ARTIFACTS)]
    return names


def claim_sweep_dir(sweep_dir: str) -> runfolder.RunFolder:
    """A multirun's folder must be new or empty: its jobs 0/, 1/, ... and summary.* would replace a user's files
    or an earlier sweep's runs. Returns what existed, to undo a sweep that ends before its first job."""
    found = runfolder.RunFolder.survey(Path(sweep_dir))
    runfolder.check_writable(found.path, "hydra.sweep.dir")
    if found.entries_before:
        raise PtuneError(
            f"hydra.sweep.dir={sweep_dir!r} is not empty (it holds {runfolder.list_names(found.entries_before)}): "
            "name a new folder for the sweep; ptune never writes a sweep over files or earlier runs"
        )
    return found


def pin_sweep_dir(argv: list[str]) -> str | None:
    """The sweep folder a multirun will use, resolved once so that ptune can read its jobs' outcome afterwards
    (Hydra composes it from the overrides that are not sweeps, as done here). None when it cannot be told."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    plain = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
        cfg = compose([a for a, o in zip(plain, parsed, strict=True) if not o.is_sweep_override()])
        return str(OmegaConf.select(cfg, "hydra.sweep.dir"))
    except Exception:  # noqa: BLE001 - Hydra reports bad overrides itself when the sweep starts
        return None


def refuse_search_overrides(argv: list[str]) -> None:
    """Search keys on a training command: Hydra would compose the search space into the config and train one run,
    ignoring it."""
    searching = [a for a in argv if a.lstrip("+~").split("=", 1)[0] == "hparams_search" or a.startswith("search.")]
    if searching:
        raise PtuneError(f"{searching[0]!r} configures a search, which `ptune train` does not run: use "
                         f"`ptune search {' '.join(searching)} [overrides]`")


def compose_run(argv: list[str]):
    """A single run's config, composed as Hydra will and with every group's values checked, before anything is
    written (``ptune train`` and ``ptune.train``); a bad override is one line."""
    try:
        composed = compose(argv)
    except Exception as exc:  # noqa: BLE001 - Hydra raises many types for bad overrides
        raise PtuneError(config.explain_composition_error(exc)) from None
    config.validate(composed)
    return composed


def _sweep_started(sweep_dir: Path) -> bool:
    """Whether a job folder exists in the sweep: those are the sweep's results, kept whatever happens next."""
    try:
        return any(e.name != "multirun.yaml" for e in sweep_dir.iterdir())
    except OSError:
        return False


def train_main(argv: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    if argv[:1] == ["--resume"]:
        try:
            resume_run(argv[1:])
        except PtuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - a crash of the resumed run (already undone): one line
            if _full_error():
                raise
            run_failed(exc)
        return
    refuse_search_overrides(argv)
    from . import distributed

    argv = distributed.hydra_overrides(argv)  # under torchrun: one shared run folder, rank 0 writes
    argv = config.label_words_overrides(argv)  # a dict of label words replaces the template's (Hydra would merge)
    multirun = any(a in ("-m", "--multirun") or a.lstrip("+") == "hydra.mode=MULTIRUN" for a in argv)
    folder: runfolder.RunFolder | None = None
    sweep_dir = pin_sweep_dir(argv) if multirun else None
    if sweep_dir is not None:
        argv = _pin(argv, "hydra.sweep.dir", sweep_dir)
        if os.environ.get("RANK", "0") == "0" and not any(a in ("-sc", "--shell-completion") for a in argv):
            folder = claim_sweep_dir(sweep_dir)
    if not multirun and not any(a.startswith("-") for a in argv):
        composed = compose_run(argv)
        if os.environ.get("RANK", "0") == "0":
            folder = preflight(composed)
            argv = _pin(argv, "hydra.run.dir", str(folder.path))
            runfolder.acquire(folder.path)  # held from before Hydra writes .hydra/ until this process ends

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
            fail(str(exc))  # train_main undoes what the run wrote
        except Exception as exc:  # noqa: BLE001 - in a sweep any crash fails only its own job
            if not multirun:
                if _full_error():
                    raise
                run_failed(exc)  # train_main undoes what the run wrote
            import traceback

            print(f"ptune: job {out} failed: {one_line(exc)}", file=sys.stderr)
            (out / "FAILED").write_text(f"{type(exc).__name__}: {one_line(exc)}\n\n{traceback.format_exc()}")
            return None
        if os.environ.get("RANK", "0") == "0":
            also = results["metrics"].get("macro_f1")  # a class readout's; generated text has none
            print(
                f"done: {results['metric']} {results['best_metric']:.4f} (step {results['best_step']})"
                + (f", macro_f1 {also:.4f}" if also is not None and results["metric"] != "macro_f1" else "")
                + f"; run folder {out}"
            )
        return results["best_metric"]

    config.register()
    completing = any(a in ("-sc", "--shell-completion") for a in argv)
    # Hydra names the program after argv[0]: "ptune train" in help, but the completion it installs is for `ptune`
    sys.argv = ["ptune" if completing else "ptune train", *argv]
    try:
        _run()
    except BaseException:  # a failure, a crash, Ctrl-C: undo what this start wrote (a saved checkpoint stays)
        if folder is not None and not multirun and not (folder.path / "checkpoint").exists():
            folder.undo(extra_names=(JOB_LOG,))
        elif folder is not None and multirun and not _sweep_started(folder.path):
            folder.undo(extra_names=("multirun.yaml",))
        raise
    distributed.cleanup()
    if sweep_dir is not None and Path(sweep_dir).is_dir():
        from .report import sweep_outcome

        failed, finished = sweep_outcome(Path(sweep_dir))
        if failed:
            print(f"ptune: {failed} of {failed + finished} jobs failed (see {sweep_dir}/summary.md)", file=sys.stderr)
            raise SystemExit(1)


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
    from .inference import eval_overrides, evaluate_checkpoint, print_eval_table

    rows = []
    for p in paths:
        rows.append(evaluate_checkpoint(p, eval_overrides(overrides)))
    print_eval_table(rows)


def complete_main(argv: list[str]) -> None:
    """`ptune -sc query=bash`: what the completion function installed by `eval "$(ptune train -sc install=bash)"`
    runs on every <TAB>, with the typed line in COMP_LINE. The first word completes to the subcommands; after
    `train`, Hydra completes overrides (groups, keys, values; schemas left out) of a line that it expects to start
    with the program name alone, so the subcommand is taken out of the line first. Other subcommands complete file
    names (the shell's default)."""
    import contextlib
    import io
    import re

    line = os.environ.get("COMP_LINE", "")
    if check_completion_args(argv[1:]) != "query":  # install/uninstall: Hydra prints the script for `ptune`
        train_main(argv)
        return
    words = line.split()
    if len(words) < 2 or (len(words) == 2 and not line[-1:].isspace()):
        typed = words[1] if len(words) == 2 else ""
        print(" ".join(name for name in COMMANDS if name.startswith(typed)))
        return
    if words[1] != "train":
        return
    os.environ["COMP_LINE"] = re.sub(r"^(\s*\S+)\s+train(?=\s|$)", r"\1", line, count=1)
    with contextlib.redirect_stdout(io.StringIO()) as hydra_says:
        train_main(argv)
    # the schemas live in the config groups (each group file starts from one) but are not choices of their own
    print(" ".join(w for w in hydra_says.getvalue().split() if not w.endswith("_schema")))


COMPLETION_SHELLS = ("bash", "zsh", "fish")  # Hydra's completion plugins
COMPLETION_ACTIONS = ("install", "uninstall", "query")


def check_completion_args(args: list[str]) -> str:
    """The action of ``-sc ACTION=SHELL`` (install, uninstall or query), checked before Hydra sees it: Hydra
    raises a ValueError (a traceback) for none or several, an unknown shell, or a query without COMP_LINE, which
    only the installed completion function sets."""
    actions = [(k, v) for k, eq, v in map(lambda a: a.partition("="), args) if eq and k in COMPLETION_ACTIONS]
    other = [a for a in args if a.partition("=")[0] not in COMPLETION_ACTIONS or "=" not in a]
    usage = f"use one of install=SHELL, uninstall=SHELL, query=SHELL with SHELL one of {', '.join(COMPLETION_SHELLS)}"
    if len(actions) != 1 or other:
        shown = repr(" ".join(args)) if args else "no action"
        raise PtuneError(f"shell completion (-sc) got {shown}: {usage}, e.g. eval \"$(ptune train -sc install=bash)\"")
    action, shell = actions[0]
    if shell not in COMPLETION_SHELLS:
        raise PtuneError(f"-sc {action}={shell!r}: no completion for that shell: {usage}")
    if action == "query" and not os.environ.get("COMP_LINE", "").strip():
        raise PtuneError("-sc query=... completes the line in COMP_LINE, which is not set: the shell function that "
                         "`eval \"$(ptune train -sc install=bash)\"` installs runs it on <TAB>")
    return action


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
    "search": (
        _lazy("search", "search_main"),
        "Bayesian hyperparameter search (Optuna TPE): +hparams_search=NAME [search.*] [overrides] | --resume DIR",
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
    if argv[:1] in (["--version"], ["-V"]):
        from . import __version__

        print(f"ptune {__version__}")
        raise SystemExit(0)
    if argv[:1] in (["-sc"], ["--shell-completion"]):
        try:
            complete_main(argv)
        except PtuneError as exc:
            fail(str(exc))
        return
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0 if argv else EXIT_USER_ERROR)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command {command!r}: use one of {', '.join(COMMANDS)}")
    _quiet()
    try:
        flags = ("-sc", "--shell-completion")
        if command == "train" and any(a in flags for a in rest):  # Hydra reads every other word as its action
            check_completion_args([a for a in rest if a not in flags])
        COMMANDS[command][0](rest)
    except PtuneError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted")
