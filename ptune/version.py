"""ptune's version, in a module of its own: checkpoints and token caches stamp it, and importing it from the package
(``from . import __version__``) would make every such module depend on ptune/__init__.py, which loads the API."""

__version__ = "0.1.0"
