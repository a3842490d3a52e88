from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig
from ..soft_prompt.config import INITS


@dataclass
class PTuningV1Config(MethodConfig):
    """Liu et al. 2021 (GPT Understands, Too): virtual tokens produced by a prompt encoder.

    The template places the virtual tokens ({soft}, {soft:N}, {soft:"anchor words"}); ``prompt_length`` more are
    prepended. The encoder (bi-LSTM + MLP, or MLP) is a training-time reparameterisation folded away at save.
    """

    name: str = "ptuning_v1"
    prompt_length: int = 0
    encoder: str = "lstm"
    encoder_hidden: int = 0  # 0: the backbone's hidden size
    init: str = "vocab"
    init_text: str = ""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("encoder", self.encoder, ("lstm", "mlp"))
        self.check_choice("init", self.init, INITS)
        self.check_range("encoder_hidden", self.encoder_hidden, 0)
        self.check_range("dropout", self.dropout, 0.0, 0.99)
