"""PromptModel: frozen backbone + prompt-tuning method + readout, one forward for all three families."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from .families import Family, position_ids
from .readouts import Readout
from .template import SOFT_ID
from .tuners import Tuner
from .tuners import deep_attention as da


class PromptModel(nn.Module):
    """``shared_prefix``: (tokens, soft tokens) that open every rendered input: the tokenizer's leading special
    tokens, then the soft tokens that come before any text. On a causal LM nothing else influences them, so
    ``forward`` computes them once per batch instead of once per row (see ``_forward_shared_prefix``)."""

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        tuner: Tuner,
        readout: Readout,
        pad_id: int,
        shared_prefix: tuple[int, int] = (0, 0),
    ):
        super().__init__()
        self.backbone = model
        self.family = family
        self.tuner = tuner
        self.readout = readout
        self.pad_id = pad_id
        self.embeddings = model.get_input_embeddings()
        self.body = family.body(model)
        # whether the body takes position ids (ones that skip padding; a packed forward restarts them per row)
        self.takes_positions = "position_ids" in inspect.signature(self.body.forward).parameters
        self.shared_prefix = shared_prefix
        self.share_prefix = (
            family.causal_attention and shared_prefix[1] > 0 and not tuner.is_deep and self.takes_positions
        )
        self._prefix_kv: dict | None = None  # inside frozen_prompt(): shared-prefix keys/values per prefix

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in list(self.tuner.parameters()) + list(self.readout.parameters()) if p.requires_grad]

    def train(self, mode: bool = True) -> PromptModel:
        """The frozen backbone always stays in eval mode (no dropout): only the prompt and head train."""
        super().train(mode)
        self.backbone.eval()
        return self

    def embed(self, input_ids: torch.Tensor, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the soft vectors written into the SOFT_ID slots.

        ``vectors``: the tuner's [N, H] by default; or per-row [B, N, H] (multi-prompt serving), where row b
        fills its k_b soft slots with its first k_b vectors (rows of shorter prompts are padded).
        """
        soft = input_ids == SOFT_ID
        embeds = self.embeddings(input_ids.masked_fill(soft, self.pad_id))
        if vectors is None:
            vectors = self.tuner.soft_vectors()
        if vectors is not None and vectors.dim() == 3:
            keep = torch.arange(vectors.shape[1], device=soft.device)[None, :] < soft.sum(1, keepdim=True)
            embeds = embeds.masked_scatter(soft.unsqueeze(-1), vectors.to(embeds.dtype)[keep])
        elif vectors is not None:
            b = input_ids.shape[0]
            src = vectors.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
            embeds = embeds.masked_scatter(soft.unsqueeze(-1), src)
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor):
        if self.share_prefix and self.readout.shares_prefix:
            split = self._split_shared_prefix(input_ids, attention_mask)
            if split is not None:
                return self._forward_shared_prefix(*split, answer_pos)
        embeds = self.embed(input_ids)
        prefixes = self.tuner.deep_prefixes() if self.tuner.is_deep else None
        with da.prefixes(prefixes):
            states = self.readout.run(self, embeds, attention_mask, answer_pos)
        return self.read_out(states, attention_mask, answer_pos)

    def hidden_states(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The body's last hidden states; ``positions`` default to ones that skip padding (where the body takes
        position ids at all)."""
        kwargs = {}
        if self.takes_positions:
            kwargs["position_ids"] = position_ids(attention_mask) if positions is None else positions
        return self.body(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs).last_hidden_state

    def _split_shared_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(prefix ids [1, K], rest ids [B, W-K], rest mask [B, W-K]) when every row opens with the same K real
        tokens (left or right padded), else None; the rest keeps each row's padding on its side."""
        k = self.shared_prefix[0]
        b, w = input_ids.shape
        window = getattr(self.backbone.config, "sliding_window", None)
        if w <= k or (window is not None and w > window):  # a sliding window would hide the prefix from late rows
            return None
        start = attention_mask.argmax(1)  # first real token (0 for right padding)
        cols = torch.arange(w, device=input_ids.device)[None, :]
        head = (cols >= start[:, None]) & (cols < start[:, None] + k)
        prefix = input_ids[head].view(b, k)
        if not bool(attention_mask[head].all()) or not bool((prefix == prefix[:1]).all()):
            return None
        rest = ~head
        return prefix[:1], input_ids[rest].view(b, w - k), attention_mask[rest].view(b, w - k)

    @contextlib.contextmanager
    def frozen_prompt(self) -> Iterator[None]:
        """Evaluation: the prompt does not change between batches, so a causal LM's shared prefix runs once for
        all of them (its keys and values are kept while the context lasts; only without autograd)."""
        self._prefix_kv = {}
        try:
            yield
        finally:
            self._prefix_kv = None

    def _shared_prefix_kv(self, prefix_ids: torch.Tensor):
        """(keys/values per attention site, soft vectors) of the shared prefix."""
        cache = self._prefix_kv if not torch.is_grad_enabled() else None
        key = (tuple(prefix_ids[0].tolist()), torch.is_autocast_enabled(prefix_ids.device.type))
        if cache is not None and key in cache:
            return cache[key]
        k, n_soft = self.shared_prefix
        vectors = self.tuner.soft_vectors()
        with da.recording(keep_grad=True) as kv:
            self.hidden_states(
                self.embed(prefix_ids, vectors[:n_soft]),
                torch.ones_like(prefix_ids),
                torch.arange(k, device=prefix_ids.device)[None, :],
            )
        out = ([kv[i] for i in range(len(kv))], vectors)
        if cache is not None:
            cache[key] = out
        return out

    def _forward_shared_prefix(self, prefix_ids, input_ids, attention_mask, answer_pos):
        """The shared prefix runs once (one row); its keys and values at every attention site, gradients kept,
        are then prepended to each row's attention like deep prompts, with the rows' positions shifted past it.
        Under causal attention this equals running every row whole, at a fraction of the tokens (a 20-token
        prompt before 20-token inputs halves them), in training and in evaluation."""
        k, n_soft = self.shared_prefix
        per_site, vectors = self._shared_prefix_kv(prefix_ids)
        embeds = self.embed(input_ids, vectors[n_soft:])  # soft tokens later in the template, if any
        with da.prefixes(per_site):
            hidden = self.hidden_states(embeds, attention_mask, position_ids(attention_mask, offset=k))
        return self.read_out(hidden, attention_mask, answer_pos - k)

    def read_out(self, states: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor) -> torch.Tensor:
        """Class scores from what ``readout.run`` returned (hidden states, or a seq2seq model's answer logits)."""
        return self.readout.read(self, states, attention_mask, answer_pos)

    def answer_ids(self, device: torch.device) -> torch.Tensor | None:
        """The vocabulary ids whose logits the verbalizer reads, where the family computes only those."""
        return self.readout.verbalizer.flat_ids.to(device) if self.family.label_rows_only else None
