from __future__ import annotations

from dataclasses import dataclass

from ..base import INITS, MethodConfig


@dataclass
class PTuningV1Config(MethodConfig):
    """Liu et al. 2021 (GPT Understands, Too): virtual tokens produced by a prompt encoder.

    The template places the virtual tokens ({soft}, {soft:N}, {soft:"anchor words"}); ``prompt_length`` more are
    prepended. The encoder (bi-LSTM + MLP, or MLP) is a training-time reparameterisation folded away at save.
    """

    name: str = "ptuning_v1"
    prompt_length: int = 0  # virtual tokens prepended besides the template's own {soft} slots
    encoder: str = "lstm"  # the prompt encoder: lstm (2-layer bi-LSTM, then an MLP) | mlp
    encoder_hidden: int = 0  # the encoder's hidden size (0: the backbone's)
    init: str = "vocab"  # the encoder's seed vectors: random | vocab | text | labels (as soft_prompt's init)
    init_text: str = ""  # init=text: words whose embeddings seed the virtual tokens
    dropout: float = 0.0  # dropout between the LSTM's two layers

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("encoder", self.encoder, ("lstm", "mlp"))
        self.check_choice("init", self.init, INITS)
        self.check_range("encoder_hidden", self.encoder_hidden, 0)
        self.check_range("dropout", self.dropout, 0.0, 0.99)
