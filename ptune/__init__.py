"""ptune: config-driven prompt tuning of frozen pretrained transformers."""

__version__ = "0.1.0"
