from __future__ import annotations

from dataclasses import dataclass

from ..base import INITS, MethodConfig


@dataclass
class SoftPromptConfig(MethodConfig):
    """Lester et al. 2021: ``prompt_length`` trainable vectors prepended to the input embeddings."""

    name: str = "soft_prompt"
    prompt_length: int = 20  # trainable vectors prepended to the input embeddings
    init: str = "vocab"  # random | vocab (sampled token embeddings) | text (init_text's) | labels (label words')
    init_text: str = ""  # init=text: words whose embeddings start the prompt (repeated to fill it)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("init", self.init, INITS)
