"""`ptune train`: hands over to Hydra (a single run, or `-m` for a multirun sweep) after checking the run or sweep
folder; `ptune train --resume RUN` continues a killed run in place. ``ptune.train`` (ptune/api.py) runs the same
checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import config, runfolder
from ..config import compose, config_dir
from ..errors import PtuneError, one_line
from . import fail, full_error, run_failed

# Hydra's log of a run, in its folder: Hydra names the job after the file of the task function (this one).
JOB_LOG = "train.log"


def resume_run(argv: list[str]) -> dict:
    """`ptune train --resume RUN_DIR` (and ``ptune.train(resume=RUN_DIR)``): continue a killed run in place with the
    config it started with; returns its results."""
    from ..checkpoint import load_plain_yaml
    from ..training import run_training

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
    from omegaconf import OmegaConf

    plain = [a for a in argv if not a.startswith("-")]
    try:
        parsed = config.parse_overrides(plain)
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
            if full_error():
                raise
            run_failed(exc)
        return
    refuse_search_overrides(argv)
    from .. import distributed

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
        from ..training import run_training

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
                if full_error():
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
        from ..report import sweep_outcome

        failed, finished = sweep_outcome(Path(sweep_dir))
        if failed:
            print(f"ptune: {failed} of {failed + finished} jobs failed (see {sweep_dir}/summary.md)", file=sys.stderr)
            raise SystemExit(1)
