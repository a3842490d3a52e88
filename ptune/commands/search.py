"""`ptune search`: Bayesian hyperparameter search (Optuna TPE, ask/tell) over composed Hydra configs.

    ptune search +hparams_search=sst2_ptv2 [search.n_trials=20] [search.dir=DIR] [trial overrides...]
    ptune search --resume DIR [search.n_trials=30]
    ptune search --worker DIR [trainer.num_threads=N]       (one more worker of the study in DIR)

The search space is config (``conf/hparams_search/<name>.yaml``, schema ``SearchConfig`` in ptune/config.py):
the experiment every trial starts from, overrides every trial gets (``dataset.validation=...``: trials select on
training examples held out, never on dev), and one Optuna distribution per override key. Each trial asks the
sampler for values, composes ``+experiment=E <search.overrides> <your overrides> <key=value...>`` exactly as
``ptune train`` would, checks it, and trains it in this process into ``<search folder>/trial_NNN/``, a normal run
folder (``.hydra/config.yaml``, ``.hydra/overrides.yaml``, checkpoint, results.json, ``ptune eval`` works on it).
The trial's value is its ``best_metric`` (``trainer.metric`` on the held-out split); a trial that raises (a bad
value, a crash) or whose metric is NaN is told to Optuna as ``TrialState.FAIL``, with ``FAILED`` in its folder,
and the search goes on. Each evaluation of a trial is reported to the pruner (``search.pruner``, median by
default), which may stop it there: ``TrialState.PRUNED``, ``PRUNED`` in its folder (search_pruning.py). Failed
and pruned trials count towards ``search.n_trials``; ``search.timeout`` and ``search.max_examples`` stop the
search between trials; ``search.confirm_seeds`` retrains the best trial on all of train (search_confirm.py).

The study lives in ``<search folder>/optuna.db`` (SQLite, study name ``ptune``): rerunning into the same folder
(``search.dir=DIR``, or ``--resume DIR``) continues it, trials left RUNNING by a killed search are marked failed;
``optuna-dashboard sqlite:///DIR/optuna.db`` or ``optuna.load_study(study_name="ptune", storage=...)`` read it.
At the end (and with ``ptune report DIR``) the search writes ``search.csv``, ``search.md`` and ``search.png``.
``search.workers=N`` runs N trials at once in worker processes, ``search.storage`` puts the study in Optuna's
journal file or a database that workers on other machines join (ptune/commands/search_workers.py).

Why not hydra-optuna-sweeper: its latest release pins ``optuna<3`` (2021), so it cannot use current Optuna; it
runs trials through Hydra's launcher, where a failing job ends the sweep rather than being told as failed; and
it does not resume a study. Driving ``ask``/``tell`` here keeps the search to one short module on ptune's own
composition, validation and training loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import math
import os
import re
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .. import config, runfolder
from ..atomic import atomic_write_text
from ..config import override_value
from ..errors import PtuneError, one_line
from ..progress import print_table
from . import search_confirm
from . import search_workers as workers
from .search_pruning import COMPUTE, PRUNED, EvalReporter, budget_spent, compute_totals, make_pruner

STUDY = "ptune"
DB = "optuna.db"
SAVED = "search.yaml"


TRIAL = re.compile(r"trial_(\d+)")
# what a resumed search may change: how long it goes on and what it does after; never the space or the pruner
RESUME_MAY_CHANGE = ("search.n_trials", "search.workers", "search.timeout", "search.max_examples",
                     "search.confirm_seeds")


def storage_url(folder: Path) -> str:
    return runfolder.sqlite_url(Path(folder) / DB)


def open_study(folder: Path, spec: config.SearchConfig | None = None, worker: bool = False, **create: Any):
    """The study of ``folder`` in its storage (``spec.storage``, else the one its ``search.yaml`` names, else
    ``optuna.db``): loaded, or created (``load_if_exists``) when ``create`` gives the direction. ``worker``: the
    storage records heartbeats and fails dead workers' trials (ptune/commands/search_workers.py). A damaged store is one
    line naming it, not a SQLAlchemy traceback."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = Path(folder)
    setting = spec.storage if spec is not None else saved_storage(folder)
    try:
        storage = workers.make_storage(folder, setting, folder / DB, spec if worker else None)
        if create:
            return optuna.create_study(storage=storage, study_name=study_name(folder, setting), load_if_exists=True,
                                       **create)
        return optuna.load_study(study_name=study_name(folder, setting), storage=storage)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and Optuna raise many types for a damaged store
        raise unreadable(workers.describe(folder, setting, folder / DB), exc) from None


def _saved(folder: Path, *keys: str) -> str | None:
    from ..checkpoint import load_plain_yaml

    try:
        value = load_plain_yaml(Path(folder) / SAVED)
        for key in keys:
            value = value[key]
    except Exception:  # noqa: BLE001 - no file, an older ptune's, not ptune's: the defaults
        return None
    return value if isinstance(value, str) else None


def saved_storage(folder: Path) -> str | None:
    """``search.storage`` as the folder's ``search.yaml`` saved it (None: ``optuna.db``, or no readable file)."""
    return _saved(folder, "search", "storage")


def study_name(folder: Path, storage: str | None) -> str:
    """The study's name: as ``search.yaml`` saved it; for a new search ``ptune`` in the folder's own storage, and
    ``ptune:<folder>`` in a journal or database that other searches may share."""
    own = storage is None or storage == "journal"
    return _saved(folder, "study") or (STUDY if own else f"{STUDY}:{os.path.abspath(folder)}")


def unreadable(db: Path | str, exc: Exception) -> PtuneError:
    return PtuneError(
        f"{str(db)!r} is not a readable Optuna study ({one_line(exc, 160)}): ptune changed nothing; restore it "
        "from a copy, or start a new search in a new search.dir"
    )


def _older_search(folder: Path) -> bool:
    """A search folder of a ptune older than ``runfolder.MARKER``: its saved settings and its study."""
    from ..checkpoint import load_plain_yaml

    if not (folder / DB).is_file():
        return False
    try:
        saved = load_plain_yaml(folder / SAVED)
    except Exception:  # noqa: BLE001 - not ptune's settings: the folder is not an older ptune search
        return False
    return all(k in saved for k in ("name", "search", "overrides"))


def check_trials_match_study(folder: Path, storage: str | None = None) -> None:
    """Refuse, changing nothing, a folder whose trial folders the study does not know: its ``optuna.db`` was lost,
    emptied or replaced, and a new study would number its trials from 0 again over the finished ones."""
    db = folder / DB
    if not folder.is_dir():
        return
    if storage is not None:  # a journal or a database: counted through Optuna
        db = workers.describe(folder, storage, db)
        known = _count_trials(folder, storage)
    else:
        known = known_trials(db) if db.is_file() else None
    stray = sorted((e.name for e in folder.iterdir() if (m := TRIAL.fullmatch(e.name)) and int(m[1]) >= (known or 0)),
                   key=lambda n: int(n.split("_")[1]))
    if stray:
        has = (f"knows only {known} trial(s)" if known else "holds no trial" if known == 0
               else "holds no study" if storage is not None or Path(db).exists() else "is missing")
        raise PtuneError(
            f"search folder {str(folder)!r} holds {runfolder.list_names(stray)} but its study {str(db)!r} {has}: "
            "a search would number new trials over them. Nothing changed; the trials are in "
            f"{str(folder / stray[0])!r}: restore optuna.db, or name a new search.dir"
        )


def _count_trials(folder: Path, storage: str) -> int | None:
    """How many trials the study ``ptune`` holds in a journal or database (None: no such study, or no journal)."""
    import optuna

    journal = workers.journal_path(folder, storage)
    if journal is not None and not journal.is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        store = workers.make_storage(folder, storage, folder / DB)
        study_id = store.get_study_id_from_name(study_name(folder, storage))
    except KeyError:
        return None
    except Exception as exc:  # noqa: BLE001 - drivers raise many types for a damaged or unreachable store
        raise unreadable(workers.describe(folder, storage, folder / DB), exc) from None
    return len(store.get_all_trials(study_id, deepcopy=False))


def known_trials(db: Path) -> int | None:
    """How many trials the study ``ptune`` in ``db`` holds, read without writing (Optuna would add its tables to
    any SQLite file it opens); None when the file holds no such study."""
    import sqlite3
    import urllib.parse

    if db.stat().st_size == 0:
        return None
    try:
        con = sqlite3.connect("file:" + urllib.parse.quote(os.path.abspath(db)) + "?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            if not {"studies", "trials"} <= tables:
                return None
            row = con.execute("select study_id from studies where study_name = ?", (STUDY,)).fetchone()
            return None if row is None else con.execute(
                "select count(*) from trials where study_id = ?", (row[0],)).fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise unreadable(db, exc) from None


def sampler_seed(seed: int, trials: int) -> int:
    """The TPE sampler's seed for a study that already holds ``trials`` trials: ``search.seed`` for a new study,
    else a seed drawn from (seed, trials). Optuna keeps no sampler state in the study, so a resumed search seeded
    with ``search.seed`` again replayed the random draws of trial 0 onwards (its first new trial repeated trial 0's
    parameters). Pickling the sampler into the folder would continue the stream exactly, but loading a pickle from
    a folder runs whatever it holds (ptune refuses pickles in checkpoints for that reason) and breaks across Optuna
    versions; seeding from the trial count is deterministic (a folder resumed twice from the same state asks the
    same values), never reuses the first stream, and TPE rebuilds its model from the study's trials anyway."""
    if trials == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, trials]).generate_state(1)[0])


def distributions(params: dict[str, Any]) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, spec in params.items():
        kind = spec["type"]
        if kind == "categorical":
            out[key] = CategoricalDistribution(list(spec["choices"]))
        elif kind == "int":
            out[key] = IntDistribution(int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")),
                                       step=int(spec.get("step") or 1))
        else:
            out[key] = FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")),
                                         step=spec.get("step"))
    return out


def _split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(search overrides: +hparams_search=... and search.*, trial overrides: the rest)."""
    search, trial = [], []
    for a in argv:
        key = a.lstrip("+~").split("=", 1)[0]
        (search if key == "hparams_search" or key.startswith("search.") else trial).append(a)
    return search, trial


def _compose_search(search_args: list[str]) -> tuple[str, config.SearchConfig]:
    name = next((a.split("=", 1)[1] for a in search_args if a.lstrip("+").startswith("hparams_search=")), None)
    valid = sorted(p.stem for p in (config.config_dir() / "hparams_search").glob("*.yaml"))
    if not name:
        raise PtuneError(f"name a search space: ptune search +hparams_search=NAME (valid: {', '.join(valid)})")
    if name.endswith((".yaml", ".yml")):  # your own search space file, same keys as conf/hparams_search/*.yaml
        return Path(name).stem, _from_file(Path(name), [a.lstrip("+") for a in search_args
                                                        if a.lstrip("+").startswith("search.")])
    if name not in valid:
        raise PtuneError(f"hparams_search={name!r} is not a shipped search space: use one of {', '.join(valid)}")
    try:
        cfg = config.compose([_forced(a) for a in search_args])
    except Exception as exc:  # noqa: BLE001 - Hydra raises many types for bad overrides
        raise PtuneError(config.explain_composition_error(exc)) from None
    spec = config.section(cfg, "search", config.SearchConfig)
    if not spec.params:
        raise PtuneError("search.params is empty: name at least one override to search, e.g. trainer.lr")
    return name, spec


def _forced(arg: str) -> str:
    """``hparams_search=NAME`` is added (``+``); ``search.pruner_args=...`` and ``search.pruner_args.KEY=...`` are
    forced (``++``): Hydra's struct mode refuses a new key in the empty mapping the schema declares."""
    if arg.startswith(("+", "~")):
        return arg
    if "hparams_search=" in arg:
        return "+" + arg
    key = arg.split("=", 1)[0]
    return "++" + arg if key == "search.pruner_args" or key.startswith("search.pruner_args.") else arg


def _from_file(path: Path, overrides: list[str]) -> config.SearchConfig:

    if not path.is_file():
        raise PtuneError(f"hparams_search={str(path)!r}: no such file")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # noqa: BLE001 - yaml's parser and OmegaConf raise many types
        raise PtuneError(f"hparams_search={str(path)!r} is not valid YAML: {one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise PtuneError(f"hparams_search={str(path)!r} is not a mapping of search options")
    raw.pop("defaults", None)
    for item in overrides:
        key, _, _ = item.partition("=")
        name = key.split(".", 1)[1]
        if name.startswith("pruner_args."):  # one of the pruner's arguments
            raw.setdefault("pruner_args", {})[name.split(".", 1)[1]] = override_value(item)
        else:
            raw[name] = override_value(item)
    valid = [f.name for f in dataclasses.fields(config.SearchConfig)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise PtuneError(f"search.{unknown[0]} is not a search option: valid are {', '.join(valid)}")
    spec = config.SearchConfig(**raw)
    if not spec.params:
        raise PtuneError("search.params is empty: name at least one override to search, e.g. trainer.lr")
    return spec


def trial_overrides(spec: config.SearchConfig, user: list[str], params: dict[str, Any]) -> list[str]:
    head = [f"+experiment={spec.experiment}"] if spec.experiment else []
    return [*head, *spec.overrides, *user, *(f"{k}={v}" for k, v in params.items())]


def compose_trial(overrides: list[str]):
    try:
        cfg = config.compose(overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra raises many types for bad overrides
        raise PtuneError(config.explain_composition_error(exc)) from None
    config.validate(cfg)
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    return cfg


def _first_values(spec: config.SearchConfig) -> dict[str, Any]:
    return {k: (v["choices"][0] if v["type"] == "categorical" else v["low"]) for k, v in spec.params.items()}


# dataset.validation when the user sets none (fit_space): a fifth of the training split, as CB's 250 examples need
# to hold out a few of their 16 neutral ones (5 in 75 at 30%, 3 in 50 at 20%), at most 2000 examples, as many as the
# sst2_ptv2 search judged its trials on (docs/results/search.md); the rest stays training data.
AUTO_HOLD_OUT = 0.2
AUTO_HOLD_OUT_MAX = 2000


def fit_space(spec: config.SearchConfig, user: list[str]) -> config.SearchConfig:
    """A new search's space fitted to the trials it will run (the backbone, data set and template the space or
    your overrides name), saying each change on stdout:

    - without ``dataset.validation`` (a generic space such as ``+hparams_search=ptuning_v2`` on your data set),
      every trial holds out ``AUTO_HOLD_OUT`` of the training split (at most ``AUTO_HOLD_OUT_MAX`` examples),
      stratified by class as ``dataset.validation`` always is, and selects on it: dev is never read;
    - a searched key that the trials' template does not use (``trainer.head_lr`` without a head, class weights for
      ``readout=generate``) is dropped, so TPE does not spend trials on it and the report does not show it;
    - ``method=OTHER`` among your overrides, against a space that trains ``method=NAME``, is refused: the space's
      keys and ranges are NAME's.
    """
    from ..data.sources import load_split

    fixed = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in spec.overrides if "=" in o}
    for item in user:
        key, _, value = item.lstrip("+").partition("=")
        if key == "method" and "method" in fixed and value != fixed["method"]:
            raise PtuneError(f"{item!r}: this search space tunes method={fixed['method']}; drop {item!r}, or name "
                             f"the space of that method (+hparams_search={value})")
    cfg = compose_trial(trial_overrides(spec, user, _first_values(spec)))
    params = dict(spec.params)
    for key, why in unused_params(cfg).items():
        if params.pop(key, None) is not None:
            print(f"ptune search: {key} is not searched: {why}", flush=True)
    overrides = list(spec.overrides)
    if cfg.dataset.get("validation") is None:
        n = len(load_split(cfg.dataset, "train", cfg.data.get("root")).labels)
        value: float | int = AUTO_HOLD_OUT if AUTO_HOLD_OUT * n <= AUTO_HOLD_OUT_MAX else AUTO_HOLD_OUT_MAX
        overrides.append(f"dataset.validation={value}")
        held = round(value * n) if value < 1 else value
        how = "stratified by class" if cfg.dataset.get("validation_stratify", True) else "drawn at random"
        print(f"ptune search: dataset.validation is not set: every trial holds out the same {held} of the {n} "
              f"training examples (dataset.validation={value}, {how}) and is judged on them; dev is never read",
              flush=True)
    return dataclasses.replace(spec, overrides=overrides, params=params)


def unused_params(cfg) -> dict[str, str]:
    """Searchable keys that a trial config ``cfg`` does not use, with the reason."""
    from ..readouts import readout_class

    readout = str(cfg.template.get("readout"))
    kind = readout_class(readout)
    unused = {}
    if not kind.trains_own_parameters:
        unused["trainer.head_lr"] = f"template.readout={readout} trains no head"
    if not kind.weighs_classes:
        unused["trainer.class_weights"] = f"template.readout={readout} has no classes to weigh"
    return unused


# ------------------------------------------------------------------------------------------------------- run
def search_main(argv: list[str]) -> Path:
    """`ptune search` (and ``ptune.search``); returns the search folder."""

    resume_dir = None
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1:])
    if argv[:1] == ["--resume"]:
        if len(argv) < 2:
            raise PtuneError("usage: ptune search --resume DIR [search.n_trials=N]")
        resume_dir, argv = Path(argv[1]), argv[2:]
    search_args, user = _split_args(argv)
    given_dir = next((str(override_value(a)) for a in search_args if a.startswith("search.dir=")), None)
    folder = resume_dir or (Path(given_dir) if given_dir else None)
    if folder is not None:  # a folder of the user's (or another search's trials): refused before it is read
        runfolder.claim(folder, "search.dir", ours=_older_search)
    if folder is not None and (folder / SAVED).is_file():  # continue: the saved space and overrides
        name, spec, user = _resume(folder, search_args, user)
    else:
        if resume_dir is not None or any(a in ("search.resume=true", "search.resume=True") for a in search_args):
            raise PtuneError(f"nothing to resume: {str(folder)!r} holds no search ({SAVED})")
        name, spec = _compose_search(search_args)
        spec = fit_space(spec, user)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        folder = Path(spec.dir) if spec.dir else Path("outputs") / "search" / name / stamp
    run_search(folder, name, spec, user)
    return folder


THREADS = "trainer.num_threads"


def _worker_main(argv: list[str]) -> Path:
    """``ptune search --worker DIR [trainer.num_threads=N]``: join the study in DIR with its saved settings."""
    if not argv:
        raise PtuneError("usage: ptune search --worker DIR [trainer.num_threads=N]")
    folder, extra = Path(argv[0]), argv[1:]
    other = [a for a in extra if a.partition("=")[0] != THREADS]
    if other:
        raise PtuneError(f"a worker takes its settings from {str(folder / SAVED)!r}: {other[0]!r} cannot change "
                         f"them; only {THREADS}=N (this worker's threads) may follow --worker DIR")
    if not (folder / SAVED).is_file():
        raise PtuneError(f"nothing to join: {str(folder)!r} holds no search ({SAVED}); start one with `ptune search "
                         f"+hparams_search=NAME search.dir={folder}`")
    runfolder.claim(folder, "search.dir", ours=_older_search)  # ptune's search folder, writable
    name, spec, user = _resume(folder, [], [])
    if extra:  # this worker's threads replace the search's own setting
        user = [a for a in user if a.partition("=")[0] != THREADS] + extra[-1:]
    run_search(folder, name, spec, user, worker=True)
    return folder


def _resume(folder: Path, search_args: list[str], user: list[str]):
    from ..checkpoint import load_plain_yaml

    try:
        saved = load_plain_yaml(folder / SAVED)
        name = str(saved["name"])
        raw = OmegaConf.to_container(saved["search"])
        saved_overrides = list(saved["overrides"])
        if not isinstance(raw, dict):
            raise ValueError("search is not a mapping")
    except Exception as exc:  # noqa: BLE001 - YAML, missing keys, wrong types: the file is not ptune's settings
        raise PtuneError(
            f"{str(folder / SAVED)!r} is not the search settings ptune writes ({one_line(exc, 120)}): expected "
            "name, search and overrides; nothing changed"
        ) from None

    raw.setdefault("pruner", "none")  # saved by a ptune without pruning: its trials ran unpruned, and so go on
    for a in (a.lstrip("+") for a in search_args):
        key = a.partition("=")[0]
        if key in RESUME_MAY_CHANGE:
            raw[key.split(".", 1)[1]] = override_value(a)
        elif key.startswith("search.") and key not in ("search.dir", "search.resume"):
            if override_value(a) != raw.get(key.split(".", 1)[1]):
                raise PtuneError(f"a resumed search keeps its settings: {a!r} differs from the saved "
                                 f"{raw.get(key.split('.', 1)[1])!r}; only {', '.join(RESUME_MAY_CHANGE)} can change")
    kept = saved_overrides
    if user and user != kept:
        raise PtuneError(f"a resumed search keeps its trial overrides ({' '.join(kept) or 'none'}): drop {user}")
    try:
        spec = config.SearchConfig(**raw)
    except TypeError as exc:
        raise PtuneError(f"{str(folder / SAVED)!r} does not hold ptune's search settings: {exc}") from None
    return name, spec, kept


def train_run(overrides: list[str], run_dir: Path, on_eval=None) -> dict:
    """Compose ``overrides`` as ``ptune train`` would and train them into ``run_dir``, a normal run folder (its
    ``.hydra/config.yaml`` and ``overrides.yaml`` written first); ``on_eval``: run_training's evaluation hook."""
    from ..training import run_training

    cfg = compose_trial(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
    try:
        return run_training(cfg, run_dir, on_eval)
    finally:
        runfolder.release(run_dir)



def run_search(folder: Path, name: str, spec: config.SearchConfig, user: list[str], worker: bool = False) -> None:
    """Run the search in ``folder``: as its one plain search (new or continued; with ``search.workers=N`` it starts
    N worker processes and waits for them), or as one more ``worker`` of a running study (search_workers.py).
    The plain search writes the report at the end; a worker only runs trials."""
    started = time.perf_counter()  # search.timeout counts from here (in each worker: from its own start)
    first = compose_trial(trial_overrides(spec, user, _first_values(spec)))  # every key and value checked first
    dists = distributions(spec.params)
    pruner = make_pruner(spec)  # a bad search.pruner_args value is refused before anything is written
    pool = not worker and spec.workers > 1
    try:
        if worker:
            workers.become_worker(folder)
            workers.sigterm_interrupts()
            study = open_study(folder, spec, worker=True)
        else:
            study = _start(folder, name, spec, user, in_process=not pool)
        study.pruner = pruner  # not stored with the study: every process sets it from the saved settings
        if pool:
            from ..runtime import cpu_cores

            total = first.trainer.num_threads or cpu_cores()
            threads = workers.split_threads(total, spec.workers)
            print(f"ptune search: {spec.workers} workers on {total} thread(s) ({THREADS}, else every allowed "
                  f"core): {', '.join(map(str, threads))}", flush=True)
            bad = workers.exit_codes_line(workers.run_pool(folder, threads))
            if bad:
                print(f"ptune search: workers ended early: {bad}", file=sys.stderr, flush=True)
            with contextlib.suppress(PtuneError):  # no worker left anywhere: what they left running is dead
                with workers.no_workers(folder, then_work=False):
                    _fail_left_running(folder, study, retries=0)
        else:
            _work(folder, spec, user, study, dists, worker, started)
    finally:
        workers.stop_heartbeats()
        workers.leave(folder)
    if worker:
        print(f"ptune search: worker done; `ptune report {folder}` writes the report", flush=True)
        return
    if spec.confirm_seeds:
        search_confirm.confirm_best(folder, best_trial(study), spec.confirm_seeds, train_run)
    best = write_search_report(folder)
    runfolder.release(folder)
    if best is None:
        from optuna.trial import TrialState

        states = {t.state for t in study.get_trials(deepcopy=False)}
        if not states:
            raise PtuneError(f"the search in {folder} ran no trial: its budget was spent before the first")
        what = "failed" if states == {TrialState.FAIL} else "failed or was pruned"
        raise PtuneError(f"every trial of the search in {folder} {what} (see {folder}/search.md)")


def _start(folder: Path, name: str, spec: config.SearchConfig, user: list[str], in_process: bool):
    """The plain search's start: the folder checked and locked, the study opened or created, the settings saved;
    with no worker alive, the trials a killed search left running are failed (or retried)."""
    import optuna

    found = runfolder.claim(folder, "search.dir", ours=_older_search)  # new, empty or ptune's; writable
    holder = runfolder.holder_of(folder)
    if holder:
        raise PtuneError(f"search folder {str(folder)!r} is in use by another ptune search ({holder})")
    if workers.workers_alive(folder):
        raise workers.unusable_folder(folder)
    check_trials_match_study(folder, spec.storage)
    try:  # nothing is written before the checks above; a failure from here until the first trial undoes it all
        runfolder.acquire(folder)  # one plain search per folder
        with workers.no_workers(folder, then_work=in_process):
            runfolder.mark(folder, "search")
            study = open_study(folder, spec, worker=True, direction=spec.direction)
            seed = sampler_seed(spec.seed, len(study.get_trials(deepcopy=False)))
            study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.n_startup_trials,
                                                       constant_liar=spec.workers > 1)
            saved = {"name": name, "search": {**dataclasses.asdict(spec), "dir": str(folder)},
                     "overrides": user, "study": study.study_name}
            atomic_write_text(folder / SAVED, OmegaConf.to_yaml(OmegaConf.create(saved)))
            _fail_left_running(folder, study, spec.retries)
    except BaseException:
        found.undo(extra_names=(DB, f"{DB}-journal", SAVED, runfolder.MARKER, *workers.NAMES))
        raise
    return study


def _fail_left_running(folder: Path, study, retries: int) -> None:
    """Trials the study holds as running while no worker is alive: their processes were killed."""
    from optuna.trial import TrialState

    stale = workers.StaleTrial(folder, retries)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        stale(study, study.get_trials(deepcopy=False)[t.number])


def _work(folder: Path, spec: config.SearchConfig, user: list[str], study, dists: dict, worker: bool,
          started: float) -> None:
    """Run trials until the study's n_trials are done or a budget (search.timeout, search.max_examples: checked
    between trials only) is spent (this process is one worker of the study)."""
    import optuna
    from optuna.trial import TrialState

    beat = workers.Heartbeat(study, spec.heartbeat_interval)
    done = lambda: workers.budget(study.get_trials(deepcopy=False))[0]  # noqa: E731
    if done():
        print(f"ptune search: continuing {folder} ({done()} of {spec.n_trials} trials finished)", flush=True)

    def sampler(trials: int):  # a worker among others: each ask seeded from the trial count, see sampler_seed
        return optuna.samplers.TPESampler(seed=sampler_seed(spec.seed, trials), constant_liar=True,
                                          n_startup_trials=spec.n_startup_trials)

    reseed = sampler if worker else None  # the plain search keeps its one sampler (see sampler_seed)
    ran = 0
    while True:
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        spent = budget_spent(spec, finished, started, ran)
        if spent:  # checked between trials only: a trial that started runs to its end
            print(f"ptune search: {spent}: no new trial started ({done()} of {spec.n_trials} finished)", flush=True)
            break
        trial = workers.next_trial(study, dists, spec, folder, beat, reseed)
        if trial is None:
            break
        ran += 1
        run_dir = folder / f"trial_{trial.number:03d}"
        try:
            run_dir.mkdir()  # exclusive: a folder that exists (another process's) is never written into
        except FileExistsError:
            study.tell(trial, state=TrialState.FAIL)
            raise PtuneError(f"{str(run_dir)!r} already exists but the study has no trial {trial.number}: "
                             "ptune wrote nothing into it; name a new search.dir") from None
        trial.set_user_attr("run_dir", run_dir.name)
        trial.set_user_attr("worker", f"pid {os.getpid()} on {socket.gethostname()}")
        overrides = trial_overrides(spec, user, trial.params)
        print(f"ptune search: trial {trial.number} ({done() + 1}/{spec.n_trials}): "
              + " ".join(f"{k}={v}" for k, v in trial.params.items()), flush=True)
        hook = EvalReporter(trial)
        try:
            results = train_run(overrides, run_dir, hook)
            hook.record(results)
            value = float(results["best_metric"])
            if not math.isfinite(value):
                raise PtuneError(f"trial {trial.number} reached a non-finite {results['metric']}: {value}")
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as exc:  # noqa: BLE001 - a failed trial is recorded; the search goes on
            hook.record()
            msg = one_line(exc)
            print(f"ptune search: trial {trial.number} failed: {msg}", file=sys.stderr, flush=True)
            trial.set_user_attr("error", msg[:2000])
            detail = "" if isinstance(exc, PtuneError) else "\n\n" + traceback.format_exc()
            atomic_write_text(run_dir / "FAILED", f"{msg}{detail}\n")
            study.tell(trial, state=TrialState.FAIL)
            continue
        trial.set_user_attr("metric", results["metric"])
        trial.set_user_attr("best_step", results["best_step"])
        if hook.pruned_at is not None:
            print(f"ptune search: trial {trial.number} pruned at step {hook.pruned_at} ({results['metric']} "
                  f"{hook.value:.4f}, search.pruner={spec.pruner})", flush=True)
            atomic_write_text(run_dir / PRUNED, f"pruned by search.pruner={spec.pruner} at step {hook.pruned_at}: "
                                                f"{results['metric']} {hook.value}\n")
            study.tell(trial, state=TrialState.PRUNED)
            continue
        study.tell(trial, value)
    beat.stop()


# ---------------------------------------------------------------------------------------------------- report
def is_search(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / DB).is_file() or ((folder / SAVED).is_file() and (folder / runfolder.MARKER).is_file())


def best_trial(study):
    """The best COMPLETE trial (pruned and failed ones never win), or None."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = 1 if study.direction.name == "MAXIMIZE" else -1
    return max(complete, key=lambda t: sign * t.value) if complete else None


def write_search_report(folder: Path):
    """search.csv, search.md, search.png and a table on the terminal; returns the best FrozenTrial or None.
    Each trial's row shows its state (COMPLETE, PRUNED, FAIL) and compute (steps, training examples, seconds)."""
    from optuna.trial import TrialState

    folder = Path(folder)
    study = open_study(folder)
    trials = study.get_trials(deepcopy=False)
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = best_trial(study)
    metric = next((t.user_attrs["metric"] for t in complete if "metric" in t.user_attrs), "value")
    confirmed = search_confirm.confirmation(folder, best.number) if best is not None else None

    def row(t) -> list[str]:
        value = "" if t.value is None else f"{t.value:.6f}"
        return [str(t.number), t.state.name, value, *(str(t.params.get(k, "")) for k in keys),
                *(str(t.user_attrs.get(k, "")) for k in COMPUTE), t.user_attrs.get("run_dir", ""),
                t.user_attrs.get("error", "")]

    header = ["trial", "state", metric, *keys, *COMPUTE, "run_dir", "error"]
    import csv

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(row(t) for t in trials)
    atomic_write_text(folder / "search.csv", buf.getvalue())
    failed = sum(t.state == TrialState.FAIL for t in trials)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    total = compute_totals(trials)
    lines = [f"# Search {folder}", "",
             f"{len(complete)} complete, {pruned} pruned, {failed} failed of {len(trials)} trial(s); study "
             f"`{study.study_name}` in `{workers.describe(folder, saved_storage(folder), Path(DB))}`.", "",
             f"Compute, all trials: {total_line(total)}.", ""]
    if best is not None:
        lines += [f"**Best trial {best.number}**: held-out {metric} {best.value:.4f} (step "
                  f"{best.user_attrs.get('best_step')}, `{best.user_attrs.get('run_dir')}`): "
                  + " ".join(f"`{k}={v}`" for k, v in best.params.items()), ""]
        if confirmed:
            lines += [f"**Confirmed** ({', '.join(f'`{search_confirm.CONFIRM.format(s)}`' for s in confirmed['seeds'])}"
                      f"): {search_confirm.describe(confirmed, metric)}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row(t)) + " |" for t in trials]
    atomic_write_text(folder / "search.md", "\n".join(lines) + "\n")
    _plot(folder / "search.png", study, trials, keys, metric)
    console = _print_table(trials, keys, best, metric)
    console.print(f"compute, all trials: {total_line(total)}", highlight=False)
    if confirmed:
        console.print(f"confirmed: {search_confirm.describe(confirmed, metric)}", highlight=False)
    return best


def total_line(total: dict[str, float]) -> str:
    return f"{total['steps']:.0f} steps, {total['examples']:.0f} training examples, {total['seconds']:.0f} s"


def _plot(path: Path, study, trials, keys: list[str], metric: str) -> bool:
    from optuna.trial import TrialState

    from ..metrics import _pyplot, _save

    plt = _pyplot()
    if plt is None:
        print("ptune: matplotlib is not installed: search.png skipped", file=sys.stderr)
        return False
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    n = 1 + len(keys)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    ax = axes[0][0]
    ax.scatter([t.number for t in done], [t.value for t in done], label="trial")
    bad = [t.number for t in trials if t.state == TrialState.FAIL]
    if done:
        sign = 1 if study.direction.name == "MAXIMIZE" else -1
        best, run = [], None
        for t in sorted(done, key=lambda t: t.number):
            run = t.value if run is None else (max if sign > 0 else min)(run, t.value)
            best.append((t.number, run))
        ax.step(*zip(*best, strict=True), where="post", color="C1", label="best so far")
        for b in bad:
            ax.axvline(b, color="red", alpha=0.3, lw=1)
    ax.set_xlabel("trial" + (" (red: failed)" if bad else ""))
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    for i, key in enumerate(keys, start=1):
        ax = axes[i // cols][i % cols]
        xs = [t.params[key] for t in done if key in t.params]
        ys = [t.value for t in done if key in t.params]
        if xs and all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, ys)
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        elif xs:
            cats = list(dict.fromkeys(str(x) for x in xs))
            ax.scatter([cats.index(str(x)) for x in xs], ys)
            ax.set_xticks(range(len(cats)), cats)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def _print_table(trials, keys: list[str], best, metric: str):
    """The trials on the terminal, short enough to read: parameters by their last name (`lr` for `trainer.lr`,
    unless two keys share it) and numbers to 4 significant digits; search.csv keeps full precision."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    names = [n if last.count(n) == 1 else k for n, k in zip(last, keys, strict=True)]

    def cell(v) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    console = print_table(
        "ptune search",
        ["trial", "state", metric, *names, *COMPUTE],
        ([str(t.number), t.state.name, cell(t.value), *(cell(t.params.get(k)) for k in keys),
          *(cell(t.user_attrs.get(k)) for k in COMPUTE)] for t in trials),
    )
    if best is not None:
        console.print(f"best trial {best.number}: {metric} {best.value:.4f} "
                      + " ".join(f"{k}={v}" for k, v in best.params.items()), highlight=False)
    return console


def report_search_main(folder: Path) -> None:
    runfolder.claim(folder, "ptune report", ours=_older_search)  # a folder with an optuna.db that is not ptune's
    if write_search_report(folder) is None:
        print(f"ptune: no trial of {folder} has finished", file=sys.stderr)

