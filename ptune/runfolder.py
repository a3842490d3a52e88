"""The run folder: checked before a run writes anything, locked while it runs, and cleaned after a failure of only
what the run itself created.

A run folder may be a fresh timestamped folder, an existing run being resumed, or any folder the user names
(``hydra.run.dir=.``). So ptune records what existed before the run (``RunFolder.survey``) and a failed run removes
only entries that did not exist then and that ptune or Hydra write (``OUTPUT_NAMES``, Hydra's log, temporaries);
the folder and its parents are removed only if the run created them and they are left empty. Hydra rewrites
``.hydra/`` at every start, so the previous ``.hydra/`` files are kept in memory and put back after a failure.

A search folder is ptune's only if ptune made it, found it empty, or it carries ptune's marker file (``MARKER``,
written when ptune takes the folder): ``claim`` refuses any other folder that holds something, with one line,
before anything is written (a sweep's folder must be new or empty: ptune/cli.py). A run started in a folder of the
user's may add new names only: ``refuse_replacing`` refuses one that would replace a user's entry (``train_log.csv``,
``.hydra/``).

The lock is an OS file lock (``flock``) on ``.ptune.lock`` inside the folder: the kernel releases it when the
process ends in any way, kill -9 included, so a crashed run never leaves a stale lock behind. The lock file holds
the holder's pid, host and start time, to name it to a second writer.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import re
import socket
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import TMP_PREFIX, atomic_write_bytes, atomic_write_text, remove_entry, sweep_temporaries
from .errors import PtuneError

LOCK_NAME = ".ptune.lock"
HYDRA_DIR = ".hydra"
MARKER = ".ptune-folder"  # in a folder ptune made or took empty (a search's): ptune may write there
MLFLOW_DB = "mlflow.db"  # the default MLflow store (ptune/tracking.py) and its artifacts, beside the runs
MLFLOW_ARTIFACTS = "mlartifacts"
# Everything a run writes into its folder (besides Hydra's log and temporaries); a failed run may remove these,
# and only these, when they did not exist before it started.
OUTPUT_NAMES = (
    "checkpoint",
    ".checkpoint.old",
    "resume",
    ".resume.old",
    "metrics.jsonl",
    "results.json",
    "tensorboard",
    "train_log.csv",
    "mlflow.json",
    "curves.png",
    "confusion.png",
    "FAILED",
    MLFLOW_DB,
    MLFLOW_ARTIFACTS,
    HYDRA_DIR,
    LOCK_NAME,
)
# Outputs that mean "a run already lives here": a new run must not write over them.
RUN_MARKERS = ("checkpoint", ".checkpoint.old", "resume", ".resume.old", "metrics.jsonl", "results.json")
# Temporaries of ptune versions before TMP_PREFIX: '.<name>.<random>[.tmp]' beside these outputs.
_LEGACY_TMP = re.compile(
    r"\.(?:checkpoint|resume|metrics\.jsonl|results\.json|eval\.json)\.[a-z0-9_]{8}(?:\.tmp)?"
)

_held: dict[Path, int] = {}  # folder -> fd of the lock this process holds


def _key(folder: Path) -> Path:
    return Path(os.path.abspath(folder))


def holder_of(folder: Path) -> str | None:
    """Who holds the lock on ``folder`` (a description), or None when nobody does (or no lock file exists)."""
    lock = Path(folder) / LOCK_NAME
    if _key(folder) in _held or not lock.is_file():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            lines = lock.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            text = lines[0][:200] if lines else ""
        except OSError:
            text = ""
        return text or "another process"
    finally:
        os.close(fd)
    return None


def acquire(folder: Path) -> None:
    """Lock ``folder`` for this process (re-entrant) and sweep the temporaries that killed writes left in it.

    Raises PtuneError naming the holder when another process holds it."""
    key = _key(folder)
    if key in _held:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PtuneError(
            f"run folder {str(folder)!r} is in use by another ptune run ({holder_of(folder) or 'unknown holder'}): "
            "wait for it to end, or choose another hydra.run.dir"
        ) from None
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    info = f"pid {os.getpid()} on {socket.gethostname()}, started {stamp}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    _held[key] = fd
    sweep_temporaries(folder)
    _sweep_legacy_temporaries(folder)


def release(folder: Path) -> None:
    """Release the lock (the lock file stays: unlinking it would let two processes lock two different files)."""
    fd = _held.pop(_key(folder), None)
    if fd is not None:
        os.close(fd)


def _sweep_legacy_temporaries(folder: Path) -> None:
    """Temporaries of older ptune versions: exactly tempfile's names ('.<output>.' + 8 random characters, '.tmp'
    for files), so a user's own '.checkpoint.notes' in a folder named as the run folder stays."""
    for entry in folder.iterdir():
        if _LEGACY_TMP.fullmatch(entry.name):
            remove_entry(entry)


def check_writable(folder: Path, what: str = "hydra.run.dir") -> None:
    """Fail with one line before anything starts when ``folder`` cannot hold a run: a file in the way, a
    read-only or full file system, a pseudo file system such as /proc."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PtuneError(f"{what}={str(folder)!r} is a file, not a folder: name a folder for the run")
    probe_dir = folder
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise PtuneError(f"{what}={str(folder)!r} cannot be created: {str(probe_dir)!r} is a file")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=f"{TMP_PREFIX}probe.")
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        reason = {
            errno.ENOSPC: "the disk is full",
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.EDQUOT: "the disk quota is exhausted",
        }.get(exc.errno, exc.strerror or type(exc).__name__)
        raise PtuneError(f"{what}={str(folder)!r} is not writable ({reason} in {str(probe_dir)!r})") from None


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of the SQLite file ``path`` (Optuna's and MLflow's stores), whatever its characters.

    The path is percent-escaped: SQLAlchemy would read a ``?`` as the start of query options (the database then
    lands outside its folder, or in a user's file), decode ``%2F`` to ``/``, and Optuna formats the URL with
    ``str.format`` (a ``{`` is an error). The explicit ``+pysqlite`` driver keeps MLflow from creating the
    escaped path's parent folders itself (it does so for URLs that start ``sqlite:///``)."""
    return "sqlite+pysqlite:///" + urllib.parse.quote(os.path.abspath(path), safe="/")


def list_names(entries: Iterable[str], limit: int = 3) -> str:
    names = sorted(entries)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def claim(folder: Path, what: str, ours: Callable[[Path], bool] | None = None) -> RunFolder:
    """Check that ptune may write into ``folder`` (named ``what`` in messages, e.g. ``search.dir``) before anything
    is written: writable, and new, empty, marked as ptune's, or recognised by ``ours`` (a folder an older ptune
    made before the marker existed). Returns what existed there, for ``RunFolder.undo``; ``mark`` it once taken."""
    check_writable(folder, what)
    found = RunFolder.survey(folder)
    if found.entries_before and MARKER not in found.entries_before and not (ours and ours(found.path)):
        raise PtuneError(
            f"{what}={str(folder)!r} holds files ptune did not write ({list_names(found.entries_before)}): "
            "name a new or empty folder; ptune writes only into folders it made"
        )
    return found


def mark(folder: Path, kind: str) -> None:
    """Make ``folder`` (and its parents) if needed and record that it is ptune's (``MARKER``)."""
    if not (Path(folder) / MARKER).is_file():
        atomic_write_text(Path(folder) / MARKER, f"made by ptune for a {kind}: ptune may write here\n")


def refuse_replacing(found: RunFolder, names: Iterable[str], what: str) -> None:
    """A new run in a folder that is not ptune's adds new names only: refuse (one line, nothing written) when one
    of the ``names`` it would write is already there, a user's file or folder."""
    clash = [n for n in names if n in found.entries_before]
    if clash:
        raise PtuneError(
            f"{what}={str(found.path)!r} already holds {list_names(clash)}, which this run would overwrite: "
            "move it away or name another folder (ptune never replaces files it did not write)"
        )


@dataclass
class RunFolder:
    """What existed before a run started in ``path``, so that a failure can undo exactly what the run added."""

    path: Path
    existed: bool = False
    created_parents: list[Path] = field(default_factory=list)  # deepest first
    entries_before: set[str] = field(default_factory=set)
    hydra_files: dict[str, bytes] | None = None  # .hydra/'s files (relative paths) before Hydra rewrote them

    @classmethod
    def survey(cls, path: Path) -> RunFolder:
        path = Path(os.path.abspath(path))
        found = cls(path)
        parent = path.parent
        while not parent.exists():
            found.created_parents.append(parent)
            parent = parent.parent
        if path.is_dir():
            found.existed = True
            found.entries_before = {e.name for e in path.iterdir()}
            found.hydra_files = _read_tree(path / HYDRA_DIR)
        return found

    def has_run(self) -> str | None:
        """The first run output already in the folder (a run lives here), or None."""
        return next((n for n in RUN_MARKERS if n in self.entries_before), None)

    def undo(self, extra_names: tuple[str, ...] = ()) -> None:
        """Remove what the run added: new entries among ptune's own names (plus ``extra_names``, e.g. Hydra's log)
        and temporaries; put back the previous ``.hydra/`` as it was, byte for byte; remove the folder and the
        parents the run created, only if nothing else is left in them (MLflow's store, which a run creates
        beside the runs, goes with a parent the run created)."""
        if not self.path.is_dir():
            return
        if holder_of(self.path) is not None:
            # Another live ptune holds the folder (this start was refused, or lost the race for the lock): what
            # appeared since the survey is that run's, not ours, so nothing is removed or put back.
            return
        release(self.path)
        ours = set(OUTPUT_NAMES) | set(extra_names)
        for entry in list(self.path.iterdir()):
            if entry.name in self.entries_before:
                continue
            if entry.name in ours or entry.name.startswith(TMP_PREFIX):
                remove_entry(entry)
        if self.hydra_files is not None:  # .hydra/ existed and was read whole: back to exactly those files
            remove_entry(self.path / HYDRA_DIR)
            (self.path / HYDRA_DIR).mkdir(exist_ok=True)
            for name, data in self.hydra_files.items():
                with contextlib.suppress(OSError):
                    atomic_write_bytes(self.path / HYDRA_DIR / name, data)
        if not self.existed:
            for folder in (self.path, *self.created_parents):
                if folder != self.path:
                    for name in (MLFLOW_DB, MLFLOW_ARTIFACTS):
                        remove_entry(folder / name)
                try:
                    folder.rmdir()  # only if empty: whatever someone else put there stays
                except OSError:
                    break


def _read_tree(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` by relative path, or None when it is not a plain folder or something in it
    cannot be read (then ``undo`` leaves it as it is rather than put back part of it)."""
    if not folder.is_dir() or folder.is_symlink():
        return None
    files: dict[str, bytes] = {}
    try:
        for f in folder.rglob("*"):
            if f.is_symlink() or not (f.is_file() or f.is_dir()):
                return None
            if f.is_file():
                files[f.relative_to(folder).as_posix()] = f.read_bytes()
    except OSError:
        return None
    return files
