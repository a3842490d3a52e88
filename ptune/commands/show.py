"""`ptune show-template [--n N] [Hydra overrides]`: the exact tokens fed to the model for the first examples."""

from __future__ import annotations

from ..show import show_template_text, split_args


def show_template_main(argv: list[str]) -> None:
    n, overrides = split_args(argv)
    print(show_template_text(overrides, n), end="")
