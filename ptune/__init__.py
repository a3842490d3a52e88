"""ptune: config-driven prompt tuning of frozen pretrained transformers.

The Python API (ptune/api.py; docs/api.md): ``ptune.train(overrides) -> Run``, ``ptune.load(path) -> Predictor``
(``.predict``, ``.evaluate``), ``ptune.search(overrides) -> Search``. It is imported on first use, so that
``import ptune`` (every CLI command) does not import torch, Hydra or transformers before it needs them.
"""

import logging as _logging

from .version import __version__  # noqa: F401 - the package's version, read by pyproject.toml

# transformers imports torchao (optional: backbone.quantize) whenever it is installed, and then torchao logs a
# warning for each CUDA extension its CPU wheel lacks, and torch one for each enum torchao registers: noise on
# every command, before ptune has even parsed its arguments.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

_API = ("train", "load", "search", "Run", "Predictor", "Search", "PtuneError")


def __getattr__(name):
    """The API, imported on first use. No module of ptune is named after an API function (the training loop is
    ptune/training.py, the search command ptune/commands/search.py), so the import system never binds a module
    over these names."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ptune' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_API})
