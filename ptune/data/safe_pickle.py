"""Restricted unpickling: pickles shipped by third-party packages must not be able to run code on load."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from ptune.errors import PtuneError


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves no globals at all.

    Every way a pickle can call code (REDUCE, INST/OBJ, NEWOBJ, EXT codes, class instances) first looks up
    a callable through ``find_class``; refusing all lookups leaves only the builtin containers, strings,
    bytes, numbers, booleans and None that pickle encodes natively.
    """

    def __init__(self, file: io.BufferedIOBase, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> object:
        raise PtuneError(
            f"refusing to unpickle {module}.{name} from {self._path}: "
            "only plain lists/dicts/strings/numbers are allowed"
        )

    def persistent_load(self, pid: object) -> object:
        raise PtuneError(
            f"refusing to unpickle persistent id {pid!r} from {self._path}: "
            "only plain lists/dicts/strings/numbers are allowed"
        )


def safe_load(path: str | Path) -> object:
    """Load a pickle holding only plain data; anything else raises PtuneError instead of executing."""
    path = str(path)
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, path).load()
    except PtuneError:
        raise
    except FileNotFoundError:
        raise PtuneError(f"pickle file not found: {path}") from None
    except OSError as exc:
        raise PtuneError(f"cannot read pickle file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # corrupt/truncated data: UnpicklingError, EOFError, ValueError, ...
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise PtuneError(f"{path} is not a valid pickle file ({detail})") from None
