"""What every prompt-tuning method provides to the PromptModel, and what it is built from."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import PtuneError


@dataclass
class MethodConfig:
    """Base for per-method configs: built from the Hydra ``method`` group and validated on creation."""

    name: str = ""  # the method's name in METHODS (ptune/tuners/__init__.py), set by method=NAME
    prompt_length: int = 0  # trained prompt positions

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_length, int) or isinstance(self.prompt_length, bool):
            raise PtuneError(f"method.prompt_length={self.prompt_length!r} must be an integer >= 0")
        if self.prompt_length < 0:
            raise PtuneError(f"method.prompt_length={self.prompt_length} must be >= 0")

    @classmethod
    def from_mapping(cls, cfg: dict[str, Any]) -> MethodConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise PtuneError(
                f"method.{unknown[0]} is not an option of method {cfg.get('name')!r}: valid are {sorted(known)}"
            )
        return cls(**cfg)

    @staticmethod
    def check_choice(key: str, value: Any, valid: tuple) -> None:
        if value not in valid:
            raise PtuneError(f"method.{key}={value!r} is not valid: use one of {', '.join(map(str, valid))}")

    @staticmethod
    def check_range(key: str, value: Any, low: float, high: float | None = None) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise PtuneError(f"method.{key}={value!r} must be a number {bound}")


@dataclass
class SiteShape:
    heads: int
    head_dim: int


@dataclass
class TunerContext:
    """Everything a method may need from the backbone and template to build and initialise itself."""

    embeddings: nn.Module  # the backbone's input embedding module (its output is what soft tokens replace)
    hidden_size: int
    num_soft: int  # soft-token slots in every rendered input
    soft_init_ids: list[int | None]  # per slot: a token id to initialise from, or None
    label_word_ids: list[int]  # first token of every label word (for init=labels)
    vocab_size: int
    special_ids: list[int]
    sites: list[SiteShape]  # deep-prompt attention sites, in model order
    site_init: Any = None  # callable(prompt_length) -> list[(k, v)] from real tokens, for deep init="vocab"
    no_label_words: str = ""  # why label_word_ids is empty (the readout's Readout.no_label_words), for the error

    def embed(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            w = self.embeddings(torch.tensor([ids], device=_device(self.embeddings)))[0]
        return w.detach().float()

    def sample_vocab(self, n: int, generator: torch.Generator) -> list[int]:
        """Token ids drawn from the first 5,000 non-special ids (frequent words in most vocabularies)."""
        special = set(self.special_ids)
        pool = [i for i in range(min(self.vocab_size, 5000 + len(special))) if i not in special]
        idx = torch.randint(len(pool), (n,), generator=generator)
        return [pool[i] for i in idx.tolist()]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class Tuner(nn.Module):
    """A prompt-tuning method: it produces soft-token vectors and/or per-layer key/value prefixes.

    ``export_state`` folds any reparameterisation (LSTM/MLP) into plain tensors; a tuner restored from such a
    state serves those tensors directly.

    The class attributes describe the method to the rest of ptune (template rendering, the attention hook,
    training, export), which asks them instead of testing method names: a new method declares them and is
    registered in ``ptune/tuners/__init__.py``, and nothing outside its folder changes.
    """

    config_class: ClassVar[type[MethodConfig]]
    """Its config (``method`` group); the config's default ``name`` is the method's registry name."""
    is_deep: ClassVar[bool] = False
    """Key/value prefixes in every attention layer (``deep_prefixes``): attention goes through the prefix-aware
    function and the prefixes are sized by probing the backbone's attention sites."""
    uses_soft_tokens: ClassVar[bool] = False
    """Fills soft-token slots (``soft_vectors``): ``prompt_length`` of them prepended to every input, plus the
    template's {soft} placeholders; a template with placeholders is refused for the other methods."""
    folds_at_save: ClassVar[bool] = False
    """``export_state`` folds a training-time reparameterisation away, so the saved checkpoint computes
    (slightly, in low precision) different scores than the model trained: training re-evaluates it."""
    peft_type: ClassVar[str | None] = None
    """The PEFT adapter ``ptune export --format peft`` writes from ``peft_prompt()``: PROMPT_TUNING (soft vectors)
    or PREFIX_TUNING (deep key/value prefixes); None when the method has no PEFT counterpart."""

    config: MethodConfig

    def soft_vectors(self) -> torch.Tensor | None:
        """[num_soft, hidden] vectors for the soft-token slots, or None."""
        return None

    def deep_prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per attention site (key, value) of shape [1, heads, prompt_length, head_dim], or None."""
        return None

    def export_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_exported(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def peft_prompt(self) -> torch.Tensor:
        """The tensor a ``peft_type`` adapter holds: the one tensor of ``export_state`` (reparameterisation
        folded): soft vectors [N, H], or key/value prefixes [sites, 2, heads, P, head_dim]."""
        (tensor,) = self.export_state().values()
        return tensor


def init_soft_vectors(
    ctx: TunerContext, init: str, init_text: str, tokenizer, generator: torch.Generator
) -> torch.Tensor:
    """Lester et al. initialisations for every soft slot; template {soft:"words"} slots use their words."""
    n, h = ctx.num_soft, ctx.hidden_size
    if n == 0:
        return torch.zeros(0, h)
    table = ctx.embed(list(range(min(ctx.vocab_size, 5000))))
    std = float(table.std())
    if init == "random":
        base = torch.randn(n, h, generator=generator) * std
    elif init == "vocab":
        base = ctx.embed(ctx.sample_vocab(n, generator))
    elif init == "text":
        ids = list(tokenizer(init_text, add_special_tokens=False)["input_ids"]) if init_text else []
        if not ids:
            raise PtuneError("method.init=text needs a non-empty method.init_text")
        base = ctx.embed([ids[i % len(ids)] for i in range(n)])
    elif init == "labels":
        ids = ctx.label_word_ids
        if not ids:
            why = f": {ctx.no_label_words}" if ctx.no_label_words else ""
            raise PtuneError(f"method.init=labels needs label words{why}; use method.init=vocab, random or text")
        base = ctx.embed([ids[i % len(ids)] for i in range(n)])
    else:
        raise PtuneError(f"method.init={init!r} is not valid: use random, vocab, text or labels")
    fixed = [(i, t) for i, t in enumerate(ctx.soft_init_ids) if t is not None]
    if fixed:
        base[[i for i, _ in fixed]] = ctx.embed([t for _, t in fixed])
    return base


# ------------------------------------------------------------------------ shared by the method folders
# Method folders never import each other: what two of them share lives here.

INITS = ("random", "vocab", "text", "labels")  # how soft tokens start (soft_prompt, and ptuning_v1's encoder seeds)


def initial_prefixes(ctx: TunerContext, length: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """[sites, 2, heads, length, head_dim]: keys/values of real tokens (well scaled), or small noise."""
    s = ctx.sites
    heads, dim = s[0].heads, s[0].head_dim
    if init == "vocab" and ctx.site_init is not None and length > 0:
        kv = ctx.site_init(length)
        return torch.stack([torch.stack([k[0], v[0]]) for k, v in kv]).float()
    return torch.randn(len(s), 2, heads, length, dim, generator=generator) * 0.02


def split_sites(prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[sites, 2, heads, length, dim] -> per site (key, value) [1, heads, length, dim].

    Under autocast the whole prefix is cast once here (not once per site and layer), and ``unbind`` views
    backpropagate as one stack rather than one full-size zero gradient per indexed site."""
    device = prefix.device.type
    if torch.is_autocast_enabled(device):
        prefix = prefix.to(torch.get_autocast_dtype(device))
    return [(k, v) for k, v in (site.unbind(0) for site in prefix.unsqueeze(2).unbind(0))]
