"""ptune: config-driven prompt tuning of frozen pretrained transformers.

The Python API (ptune/api.py; docs/api.md): ``ptune.train(overrides) -> Run``, ``ptune.load(path) -> Predictor``
(``.predict``, ``.evaluate``), ``ptune.search(overrides) -> Search``. It is imported on first use, so that
``import ptune`` (every CLI command) does not import torch, Hydra or transformers before it needs them.
"""

import logging as _logging
import sys as _sys
import types as _types

__version__ = "0.1.0"

# transformers imports torchao (optional: backbone.quantize) whenever it is installed, and then torchao logs a
# warning for each CUDA extension its CPU wheel lacks, and torch one for each enum torchao registers: noise on
# every command, before ptune has even parsed its arguments.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

_API = ("train", "load", "search", "Run", "Predictor", "Search", "PtuneError")
# ptune.train and ptune.search are also the modules of the training loop and of the search (ptune/train.py,
# ptune/search.py), which the import system binds to those names when they load: those two modules are made
# callable, so that `ptune.train(...)` runs the API whichever was imported first, and `from ptune import train`
# (or `ptune.train.run_training`) still reaches the module.
_CALLABLE_MODULES = ("train", "search")


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        from . import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        if name in _CALLABLE_MODULES and isinstance(value, _types.ModuleType) and value.__name__ == f"ptune.{name}":
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


def __getattr__(name):
    """The API, imported on first use."""
    if name in _CALLABLE_MODULES:
        import importlib

        return importlib.import_module(f"ptune.{name}")  # bound (and made callable) by _Package.__setattr__
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ptune' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_API})


_sys.modules[__name__].__class__ = _Package
