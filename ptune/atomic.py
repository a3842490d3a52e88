"""Atomic file and folder writes: a reader (or a later run after a kill) sees the old version or the whole new one.

Every temporary entry starts with ``TMP_PREFIX``, so the leftovers of a killed write can be recognised, and only
those, when the owner of the folder sweeps it (``sweep_temporaries``): nothing else in a folder is ever removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".ptune-tmp-"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync it and rename it over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; published files get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """JSON with ``allow_nan=False``: a NaN or Inf would make the file invalid JSON for every other reader."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_folder(directory: Path, owns_old: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success swap it in for ``directory``.

    The previous folder is kept as ``.<name>.old`` until the new one is in place, so a kill at any moment
    leaves one complete version (readers fall back to ``.old`` when ``directory`` is missing: ``readable_folder``).
    ``owns_old``: a ``.<name>.old`` already there is a killed swap's leftover, removed once the new version is in
    (in a run folder); False where that name may be a user's (an export's parent folder): then it stays.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f"{TMP_PREFIX}{directory.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = previous_version(directory)
        replacing = directory.exists()
        if replacing:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        if replacing or owns_old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def previous_version(directory: Path) -> Path:
    """Where ``atomic_folder`` keeps the previous version during a swap."""
    return directory.with_name(f".{directory.name}.old")


def readable_folder(directory: Path, marker: str) -> Path | None:
    """``directory`` if it holds ``marker``, else the previous version a swap killed between its two renames
    left behind, else None."""
    for cand in (directory, previous_version(directory)):
        if (cand / marker).is_file():
            return cand
    return None


def sweep_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files and folders that killed atomic writes left directly in ``folder``.

    Call it only while holding the folder (the run lock, the cache lock): a live writer's temporary has the
    same name shape. Only entries named ``TMP_PREFIX...`` are touched. Returns what was removed.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX):
            remove_entry(entry)
            removed.append(entry)
    return removed


def remove_entry(entry: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder tree; what is already gone is fine."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
