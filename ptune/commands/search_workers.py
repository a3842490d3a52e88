"""Parallel `ptune search`: several worker processes on one Optuna study, in any storage Optuna takes.

A *worker* runs trials one after another until the study's budget is spent: ``ptune search --worker DIR`` (a
process of its own, on this machine or any other that sees DIR), the processes a search with ``search.workers=N``
starts, or the search process itself when ``search.workers=1``. What keeps them apart:

- **Storage** (``search.storage``): the SQLite file ``DIR/optuna.db`` by default (fine for the workers of one
  machine; SQLite's locks are unreliable on network file systems), Optuna's journal file (``journal``:
  ``DIR/optuna.journal``, or ``journal:///PATH``; made for NFS), or any SQLAlchemy URL (PostgreSQL, MySQL).
- **Asking**: a worker counts the study's trials and asks for a new one under an exclusive ``flock`` on
  ``DIR/.ptune-ask.lock``, so that ``search.n_trials`` counts across workers (trials ended plus running) and no
  two workers can both take the last slot. Optuna numbers trials in the storage (one number per trial whatever
  the process), and each trial's folder ``trial_NNN`` is made with an exclusive ``mkdir``: a folder that exists
  already fails that trial rather than being shared.
- **Dead workers**: a running trial records a heartbeat every ``search.heartbeat_interval`` seconds (Optuna's own
  for RDB storages; a system attribute of the trial for the journal, whose Optuna storage has no heartbeat). A
  worker about to ask fails every trial silent for ``search.grace_period`` seconds (its worker was killed, its
  node lost), writes ``FAILED`` into its folder, and with ``search.retries`` enqueues it again with the same values
  (Optuna's ``RetryHeartbeatStaleTrialCallback``). A worker with nothing left to ask waits while other workers'
  trials run, so that the last one alive notices a dead worker's trial and the study always ends.
- **Folder locks**: ``DIR/.ptune.lock`` (ptune/runfolder.py) stays the lock of the *search*: one plain ``ptune
  search`` per folder. Every worker holds a shared ``flock`` on ``DIR/.ptune-workers.lock`` for its life; a plain
  search must get it exclusively (no worker alive) before it fails the trials a killed search left running, and
  refuses a folder whose workers are alive (join them with ``--worker``). Each trial folder has its own run lock.
  The kernel drops all of these when a process dies, SIGKILL included.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import runfolder
from ..atomic import atomic_write_text
from ..errors import PtuneError

JOURNAL = "optuna.journal"
ASK_LOCK = ".ptune-ask.lock"
WORKERS_LOCK = ".ptune-workers.lock"
NAMES = (JOURNAL, f"{JOURNAL}.lock", ASK_LOCK, WORKERS_LOCK)  # what a search may add to its folder besides optuna.db
HEARTBEAT = "ptune:heartbeat"  # the journal's heartbeat: a trial system attribute, seconds since the epoch
STOP_SECONDS = 60  # how long an interrupted search waits for its workers to tell their trials failed


# ---------------------------------------------------------------------------------------------------- storage
def journal_path(folder: Path, storage: str | None) -> Path | None:
    """The journal file of ``search.storage`` (``journal``: in the folder; ``journal:///PATH``), else None."""
    if storage == "journal":
        return Path(folder) / JOURNAL
    if storage and storage.startswith("journal://"):
        return Path(storage[len("journal://"):] or ".")
    return None


def make_storage(folder: Path, storage: str | None, db: Path, spec: Any = None):
    """The Optuna storage of a search. With ``spec`` (the SearchConfig of a worker), RDB storages record heartbeats
    every ``spec.heartbeat_interval`` and fail trials silent for ``spec.grace_period`` through ``StaleTrial``."""
    import optuna

    journal = journal_path(folder, storage)
    if journal is not None:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    url = storage or runfolder.sqlite_url(db)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # several workers write: wait for SQLite's lock rather than fail after 5 s
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if spec is not None:
        kwargs.update(heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period,
                      heartbeat_stale_trial_callback=StaleTrial(folder, spec.retries))
    with _quiet_optuna():  # heartbeat_interval is "experimental" since Optuna 2.9
        return optuna.storages.RDBStorage(url, **kwargs)


def describe(folder: Path, storage: str | None, db: Path) -> str:
    """The storage in a message (an RDB URL without its password)."""
    journal = journal_path(folder, storage)
    if journal is not None:
        return str(journal)
    if not storage:
        return str(db)
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown by its scheme only
        return storage.split("://", 1)[0] + "://..."


# ---------------------------------------------------------------------------------------------- dead workers
class StaleTrial:
    """Optuna's callback for a trial failed for want of heartbeats: ``FAILED`` in its folder, then (``retries``)
    the same values enqueued again as a new trial."""

    def __init__(self, folder: Path, retries: int) -> None:
        self.folder = Path(folder)
        self.retries = retries

    def __call__(self, study, trial) -> None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        run_dir = trial.user_attrs.get("run_dir")
        if run_dir and (self.folder / run_dir).is_dir() and not (self.folder / run_dir / "FAILED").exists():
            atomic_write_text(self.folder / run_dir / "FAILED",
                              f"its worker stopped sending heartbeats (killed, or its machine lost): trial "
                              f"{trial.number} was failed by worker pid {os.getpid()}\n")
        print(f"ptune search: trial {trial.number} failed: its worker stopped sending heartbeats"
              + (" (retried)" if self.retries else ""), file=sys.stderr, flush=True)
        if self.retries:
            with _quiet_optuna():  # experimental since Optuna 2.8, unchanged since
                RetryHeartbeatStaleTrialCallback(max_retry=self.retries)(study, trial)


def fail_stale_trials(study, spec: Any, folder: Path) -> None:
    """Fail the running trials whose worker died: Optuna's own check on RDB storages; on the journal, trials whose
    ``HEARTBEAT`` (or start) is older than ``spec.grace_period`` seconds."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    if isinstance(storage, optuna.storages.RDBStorage):
        with _quiet_optuna():
            optuna.storages.fail_stale_trials(study)
        return
    now = time.time()
    callback = StaleTrial(folder, spec.retries)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = t.system_attrs.get(HEARTBEAT)
        if last is None and t.datetime_start is not None:
            last = t.datetime_start.timestamp()
        if last is None or now - float(last) <= spec.grace_period:
            continue
        try:
            failed = storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # another worker failed it first
            continue
        if failed:
            callback(study, copy.deepcopy(storage.get_trial(t._trial_id)))


class Heartbeat:
    """A daemon thread recording the heartbeat of this worker's current trial every ``interval`` seconds (a trial
    already finished is skipped quietly: the thread never stops a worker)."""

    def __init__(self, study, interval: int) -> None:
        self.study = study
        self.interval = interval
        self.trial_id: int | None = None
        self._stop = threading.Event()
        _beating.add(self)
        threading.Thread(target=self._run, name="ptune-heartbeat", daemon=True).start()

    def beat(self, trial_id: int | None = None) -> None:
        """Record one heartbeat now; with ``trial_id``, for that trial from now on."""
        import optuna

        if trial_id is not None:
            self.trial_id = trial_id
        tid = self.trial_id
        if tid is None:
            return
        storage = self.study._storage
        with contextlib.suppress(Exception):  # a finished trial, a storage hiccup: the next beat tries again
            if isinstance(storage, optuna.storages.RDBStorage):
                storage.record_heartbeat(tid)
            else:
                storage.set_trial_system_attr(tid, HEARTBEAT, time.time())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        _beating.discard(self)


_beating: set[Heartbeat] = set()


def stop_heartbeats() -> None:
    """Stop every heartbeat of this process (a search ended, or was interrupted, inside a longer-lived one)."""
    for beat in list(_beating):
        beat.stop()


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna warns that heartbeats are meant for ``Study.optimize``; ptune drives ask/tell and beats itself."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -------------------------------------------------------------------------------------------------- asking
def _flock(path: Path, mode: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def ask_lock(folder: Path) -> Iterator[None]:
    """One worker at a time counts the trials and asks (blocking: the others wait a moment)."""
    fd = _flock(Path(folder) / ASK_LOCK, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


def budget(trials: list) -> tuple[int, int, int]:
    """(ended, running, waiting) trials of a study as ``search.n_trials`` counts them: a trial retried after its
    worker died is counted once, by its last retry."""
    from optuna.trial import TrialState

    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    ended = sum(t.state.is_finished() and t.number not in replaced for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return ended, running, waiting


def next_trial(study, dists: dict, spec: Any, folder: Path, beat: Heartbeat, reseed=None):
    """The next trial for this worker, or None when the study is done. Waits (polling every heartbeat interval,
    failing dead workers' trials) while the budget is spent but other trials still run. ``reseed(n)``: the sampler
    for a study of ``n`` trials, set before each ask (workers asking at once would otherwise draw alike)."""
    while True:
        with ask_lock(folder):
            fail_stale_trials(study, spec, folder)
            trials = study.get_trials(deepcopy=False)
            ended, running, waiting = budget(trials)
            if waiting or ended + running < spec.n_trials:
                if reseed is not None:
                    study.sampler = reseed(len(trials))
                with _quiet_optuna():
                    trial = study.ask(dists)  # a waiting (retried) trial first
                beat.beat(trial._trial_id)  # before the lock goes: a trial is never seen running without a beat
                return trial
            if not running:
                return None
        time.sleep(min(spec.heartbeat_interval, 10))


# ------------------------------------------------------------------------------------------------ worker locks
def workers_alive(folder: Path) -> bool:
    """Whether a worker of ``folder`` holds its lock (anywhere the file system's locks reach); writes nothing."""
    path = Path(folder) / WORKERS_LOCK
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def no_workers(folder: Path, then_work: bool) -> Iterator[None]:
    """While it lasts no worker of ``folder`` is alive or can start (the workers lock held exclusively): the
    trials the study holds as running are a killed search's. Raises ``unusable_folder`` when workers are alive.
    With ``then_work`` this process stays a worker of the folder afterwards (the lock turned shared)."""
    try:
        fd = _flock(Path(folder) / WORKERS_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise unusable_folder(folder) from None
    try:
        yield
    except BaseException:
        os.close(fd)
        raise
    if then_work:
        fcntl.flock(fd, fcntl.LOCK_SH)
        _held[_key(folder)] = fd
    else:
        os.close(fd)


_held: dict[Path, int] = {}  # folder -> the workers lock this process holds


def _key(folder: Path) -> Path:
    return Path(os.path.abspath(folder))


def become_worker(folder: Path) -> None:
    """This process is a worker of ``folder`` until ``leave`` or its end (a shared lock: any number of workers)."""
    if _key(folder) not in _held:
        _held[_key(folder)] = _flock(Path(folder) / WORKERS_LOCK, fcntl.LOCK_SH)


def leave(folder: Path) -> None:
    fd = _held.pop(_key(folder), None)
    if fd is not None:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ local pool
def split_threads(total: int, workers: int) -> list[int]:
    """The threads of each of ``workers`` processes sharing ``total``: ``total // workers`` each, the first
    ``total % workers`` one more, at least 1 (more workers than threads oversubscribe the cores)."""
    return [max(1, total // workers + (i < total % workers)) for i in range(workers)]


def _pump(stream, sink, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sink.write(prefix + line)
        sink.flush()
    stream.close()


def run_pool(folder: Path, threads: list[int]) -> list[int]:
    """Run one ``ptune search --worker folder trainer.num_threads=K`` per entry of ``threads`` and wait for all;
    their lines come out prefixed ``[wI]``. Ctrl-C or SIGTERM here is passed on to every worker once (each tells its
    trial failed and ends); a worker still alive after ``STOP_SECONDS`` is killed. Returns the exit codes
    (negative: the signal that ended the worker)."""
    procs, pumps = [], []
    old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the workers as Ctrl-C
    try:
        for i, k in enumerate(threads):
            # a session of its own: the terminal's Ctrl-C reaches this process only, which passes it on once
            p = subprocess.Popen([sys.executable, "-m", "ptune", "search", "--worker", str(folder),
                                  f"trainer.num_threads={k}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, bufsize=1, start_new_session=True)
            procs.append(p)
            print(f"ptune search: worker w{i} (pid {p.pid}, {k} thread{'s' * (k > 1)})", flush=True)
            for stream, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(stream, sink, f"[w{i}] "), daemon=True)
                t.start()
                pumps.append(t)
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        for t in pumps:
            t.join(timeout=5)
    return [p.returncode for p in procs]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_SECONDS
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def sigterm_interrupts() -> None:
    """A worker told SIGTERM (``kill``, SLURM's preemption) stops as on Ctrl-C: its trial told failed, its locks
    released, rather than left running until the grace period."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def exit_codes_line(codes: list[int]) -> str | None:
    bad = [f"w{i} {'killed by ' + signal.Signals(-c).name if c < 0 else f'exit code {c}'}"
           for i, c in enumerate(codes) if c]
    return ", ".join(bad) or None


def unusable_folder(folder: Path) -> PtuneError:
    return PtuneError(
        f"search folder {str(folder)!r} has live workers (ptune search --worker): join them with `ptune search "
        f"--worker {folder}`, or wait for them to end"
    )
