"""Where ptune keeps what it derives from inputs and can rebuild: converted backbones, assembled GGUF files, hash
sidecars and tokenised splits.

One function, so every cache user (backbone loading, the token cache) agrees on the folder: ``$PTUNE_CACHE``, else
``~/.cache/ptune``. It is read at each call, not at import, so a test or a user can point it elsewhere at any time.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_base() -> Path:
    """The ptune cache folder (not created here: callers create the subfolder they write)."""
    return Path(os.environ.get("PTUNE_CACHE") or Path.home() / ".cache" / "ptune").expanduser()
