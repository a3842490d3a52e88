"""The run folder: checked before a run writes anything, locked while it runs, and cleaned after a failure of only
what the run itself created.

A run folder may be a fresh timestamped folder, an existing run being resumed, or any folder the user names
(``hydra.run.dir=.``). So ptune records what existed before the run (``RunFolder.survey``) and a failed run removes
only entries that did not exist then and that ptune or Hydra write (``OUTPUT_NAMES``, Hydra's log, temporaries);
the folder and its parents are removed only if the run created them and they are left empty. Hydra rewrites
``.hydra/`` at every start, so the previous ``.hydra/`` files are kept in memory and put back after a failure.

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
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import TMP_PREFIX, atomic_write_bytes, remove_entry, sweep_temporaries
from .errors import PtuneError

LOCK_NAME = ".ptune.lock"
HYDRA_DIR = ".hydra"
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


@dataclass
class RunFolder:
    """What existed before a run started in ``path``, so that a failure can undo exactly what the run added."""

    path: Path
    existed: bool = False
    created_parents: list[Path] = field(default_factory=list)  # deepest first
    entries_before: set[str] = field(default_factory=set)
    hydra_files: dict[str, bytes] = field(default_factory=dict)  # .hydra/ before Hydra rewrote it

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
            hydra = path / HYDRA_DIR
            if hydra.is_dir():
                for f in hydra.iterdir():
                    if f.is_file() and not f.is_symlink():
                        with contextlib.suppress(OSError):
                            found.hydra_files[f.name] = f.read_bytes()
        return found

    def has_run(self) -> str | None:
        """The first run output already in the folder (a run lives here), or None."""
        return next((n for n in RUN_MARKERS if n in self.entries_before), None)

    def undo(self, extra_names: tuple[str, ...] = ()) -> None:
        """Remove what the run added: new entries among ptune's own names (plus ``extra_names``, e.g. Hydra's log)
        and temporaries; put back the previous ``.hydra/`` files; remove the folder and the parents the run
        created, only if nothing else is left in them."""
        if not self.path.is_dir():
            return
        release(self.path)
        ours = set(OUTPUT_NAMES) | set(extra_names)
        for entry in list(self.path.iterdir()):
            if entry.name in self.entries_before:
                continue
            if entry.name in ours or entry.name.startswith(TMP_PREFIX):
                remove_entry(entry)
        if self.hydra_files:
            for name, data in self.hydra_files.items():
                with contextlib.suppress(OSError):
                    atomic_write_bytes(self.path / HYDRA_DIR / name, data)
        if not self.existed:
            for folder in (self.path, *self.created_parents):
                try:
                    folder.rmdir()  # only if empty: whatever someone else put there stays
                except OSError:
                    break
