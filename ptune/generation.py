"""Decoding for template.readout=generate (ptune/readouts/generate.py): the backbone writes the target text.

Decoding (greedy, beam search, seeded sampling) is owned here. With ``use_cache`` the backbone's own cache
(DynamicCache / EncoderDecoderCache) holds the keys and values of the real tokens only; deep prompts never enter
it: their key/value prefixes are computed once per ``generate`` call (``tuner.deep_prefixes()``, a folded or
MLP-reparameterised prompt included), held as [1, heads, P, head_dim] in the deep-attention state for the whole
decode, and prepended by ``ptune_sdpa`` at every step (an ``expand``, no copy per row or per beam). Soft tokens
are ordinary input positions: they are computed once at the prefill and then live in the cache like any token.
A batch whose rows use different prompts on one backbone (``ptune serve``'s completions, ``server.decode``) gives
``_Decoder`` per-row soft vectors and holds per-row prefixes [B, heads, P_max, head_dim] with a mask of each row's
padding slots, the same way for the whole decode; positions and masks come from the real tokens only (left
padding), so a row decodes as it would beside rows of its own prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput

from .batching import Encoded, eval_batches
from .errors import PtuneError
from .families import position_ids
from .template import SOFT_ID
from .tuners import deep_attention as da

STRATEGIES = ("greedy", "beam", "sample")


@dataclass
class GenEncoded(Encoded):
    """Rendered prompts plus each example's target tokens (ending with the stop token) and text."""

    target_ids: list[list[int]] | None = None
    targets: list[str] | None = None


def prompt_rows(ids: list[list[int]], answers: list[int]) -> list[list[int]]:
    """The rendered prompts up to the answer slot: a causal LM writes the target right after it, so special
    tokens a tokenizer appends after the text ([SEP]) are dropped; seq2seq inputs (no slot) stay whole."""
    return [r[: a + 1] if a >= 0 else r for r, a in zip(ids, answers, strict=True)]


def collate_prompts(input_ids: list[list[int]], pad_id: int, left_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in input_ids)
    ids, mask = [], []
    for r in input_ids:
        pad = width - len(r)
        ids.append([pad_id] * pad + r if left_pad else r + [pad_id] * pad)
        mask.append([0] * pad + [1] * len(r) if left_pad else [1] * len(r) + [0] * pad)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def _prefixes(pm, bare: bool):
    return pm.tuner.deep_prefixes() if pm.tuner.is_deep and not bare else None


# ------------------------------------------------------------------------------------------------ decoding
class _Decoder:
    """One family's incremental forward: ``start`` returns the first next-token logits, ``step`` feeds the
    chosen tokens, ``select`` reorders rows (beam search).

    ``vectors``: per-row soft vectors [B, N, H] for a batch whose rows use different prompts on ``pm``'s backbone
    (``PromptModel.embed``; the matching per-row prefixes are the caller's ``deep_attention.prefixes``); by default
    ``pm``'s own prompt fills every row."""

    def __init__(self, pm, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool, bare: bool,
                 vectors: torch.Tensor | None = None):
        self.pm, self.use_cache = pm, use_cache
        if bare:  # the backbone alone: soft slots removed, deep prefixes off
            keep = ids != SOFT_ID
            rows = [r[k].tolist() for r, k in zip(ids, keep & (mask > 0), strict=True)]
            ids, mask = collate_prompts(rows, pm.pad_id, pm.family.left_pad)
            ids, mask = ids.to(keep.device), mask.to(keep.device)
        self.seq2seq = pm.family.writes_in_decoder
        self.embeds = pm.embed(ids, vectors)
        self.mask = mask
        self.cache = None
        self.generated: torch.Tensor = ids.new_zeros(ids.shape[0], 0)
        if self.seq2seq:
            enc = pm.backbone.get_encoder()(inputs_embeds=self.embeds, attention_mask=mask).last_hidden_state
            self.enc = enc

    def _logits(self, new: torch.Tensor | None) -> torch.Tensor:
        pm = self.pm
        if self.seq2seq:
            start = pm.family.decoder_start(pm.backbone, self.mask.shape[0], self.mask.device)
            dec = torch.cat([start, self.generated], 1)
            if self.use_cache and self.cache is not None:
                dec = dec[:, -1:]
            out = pm.backbone(
                encoder_outputs=BaseModelOutput(last_hidden_state=self.enc), attention_mask=self.mask,
                decoder_input_ids=dec, cache=self.cache, use_cache=self.use_cache,
            )
            if self.use_cache:
                self.cache = out.past_key_values
            return out.logits[:, -1].float()
        if new is not None:
            self.embeds = torch.cat([self.embeds, pm.embeddings(new[:, None]).to(self.embeds.dtype)], 1)
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        pos = position_ids(self.mask)
        kwargs = {"position_ids": pos} if pm.takes_positions else {}
        if self.use_cache:
            embeds = self.embeds if self.cache is None else self.embeds[:, -1:]
            if self.cache is not None and "position_ids" in kwargs:
                kwargs["position_ids"] = pos[:, -1:]
            out = pm.body(inputs_embeds=embeds, attention_mask=self.mask, cache=self.cache, use_cache=True,
                          **kwargs)
            self.cache = out.past_key_values
        else:
            out = pm.body(inputs_embeds=self.embeds, attention_mask=self.mask, use_cache=False, **kwargs)
        return pm.family.head_logits(pm.backbone, out.last_hidden_state[:, -1], None).float()

    def start(self) -> torch.Tensor:
        return self._logits(None)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.generated = torch.cat([self.generated, tokens[:, None]], 1)
        return self._logits(tokens)

    def select(self, rows: torch.Tensor) -> None:
        self.mask, self.embeds, self.generated = self.mask[rows], self.embeds[rows], self.generated[rows]
        if self.seq2seq:
            self.enc = self.enc[rows]
        if self.cache is not None:
            self.cache.reorder_cache(rows)


@torch.no_grad()
def generate(
    pm, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, stop_id: int,
    strategy: str = "greedy", num_beams: int = 4, seed: int = 0, temperature: float = 1.0,
    use_cache: bool = True, bare: bool = False,
) -> list[list[int]]:
    """Generated token ids per row (without the stop token). ``bare``: the backbone alone (no prompt)."""
    if strategy not in STRATEGIES:
        raise PtuneError(f"decoding strategy {strategy!r} is not valid: use one of {', '.join(STRATEGIES)}")
    b = input_ids.shape[0]
    k = num_beams if strategy == "beam" else 1
    if k > 1:
        input_ids, attention_mask = input_ids.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0)
    gen = torch.Generator(device=input_ids.device).manual_seed(seed) if strategy == "sample" else None
    with da.prefixes(_prefixes(pm, bare)):
        dec = _Decoder(pm, input_ids, attention_mask, use_cache, bare)
        logits = dec.start()
        n = input_ids.shape[0]
        done = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
        scores = torch.zeros(b, k, device=input_ids.device)
        scores[:, 1:] = float("-inf")
        lengths = torch.zeros(n, device=input_ids.device)
        for t in range(max_new_tokens):
            if strategy == "beam":
                logp = torch.log_softmax(logits, -1)
                forced = torch.full_like(logp, float("-inf"))
                forced[:, stop_id] = 0.0
                logp = torch.where(done[:, None], forced, logp)
                v = logp.shape[-1]
                cand = (scores.view(-1, 1) + logp).view(b, k * v)
                top, flat = cand.topk(k, -1)
                rows = (torch.arange(b, device=flat.device)[:, None] * k + flat // v).view(-1)
                tokens = (flat % v).view(-1)
                scores = top
                done, lengths = done[rows], lengths[rows]
                dec.select(rows)
            elif strategy == "sample":
                probs = torch.softmax(logits / max(temperature, 1e-6), -1)
                tokens = torch.multinomial(probs, 1, generator=gen).view(-1)
            else:
                tokens = logits.argmax(-1)
            tokens = torch.where(done, torch.full_like(tokens, stop_id), tokens)
            lengths = lengths + (~done).float()
            done = done | (tokens == stop_id)
            if t == max_new_tokens - 1 or bool(done.all()):
                dec.generated = torch.cat([dec.generated, tokens[:, None]], 1)
                break
            logits = dec.step(tokens)
        out = dec.generated
    if k > 1:
        best = (scores / lengths.view(b, k).clamp(min=1)).argmax(-1)
        out = out.view(b, k, -1)[torch.arange(b), best]
    result = []
    for row in out.tolist():
        result.append(row[: row.index(stop_id)] if stop_id in row else row)
    return result


# ------------------------------------------------------------------------------------------------ evaluation
def generate_texts(pm, data: Encoded, batch_size: int, device, amp, bare: bool = False,
                   use_cache: bool = True, **overrides) -> list[str]:
    """Decode every example of ``data`` (sorted-by-length batches) and return texts in the data's order;
    decoding settings come from the template (``GenerateReadout.settings``) unless ``overrides`` name them."""
    from .runtime import autocast

    tok, settings = pm.readout.tokenizer, {**pm.readout.settings, **overrides}
    out: list[str] = [""] * len(data.input_ids)
    was_training = pm.training
    pm.eval()
    lengths = [len(x) for x in data.input_ids]
    with torch.inference_mode(), autocast(device, amp):
        for idx in eval_batches(lengths, batch_size):
            ids, mask = collate_prompts([data.input_ids[i] for i in idx], pm.pad_id, pm.family.left_pad)
            rows = generate(
                pm, ids.to(device), mask.to(device), max_new_tokens=settings["max_new_tokens"],
                stop_id=pm.readout.stop_id, strategy=settings["strategy"], num_beams=settings["num_beams"],
                seed=settings["seed"], use_cache=use_cache, bare=bare,
            )
            for i, r in zip(idx, rows, strict=True):
                out[i] = tok.decode(r, skip_special_tokens=True).strip()
    pm.train(was_training)
    return out


def evaluate_generation(pm, data: GenEncoded, batch_size: int, device, amp, bare: bool = False) -> dict:
    """Decode the split and score the texts against the targets (generation_metrics)."""
    import time

    start = time.perf_counter()
    preds = generate_texts(pm, data, batch_size, device, amp, bare)
    wall = time.perf_counter() - start
    res = generation_metrics(preds, list(data.targets or []))
    res["eval_examples_per_s"] = len(preds) / max(wall, 1e-9)
    return res


class _Chars:
    """rouge-score tokenizer: every non-space character is a token (character-level ROUGE for Chinese)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def _rouge_scorer():
    """rouge-score's scorer module, imported so that its logging library cannot close the caller's stderr.

    rouge-score imports absl, whose logging handler keeps the ``sys.stderr`` of the moment of import and closes it
    when logging is reconfigured (Hydra does that on every run). When stderr is redirected (pytest's capture, a
    notebook, ``ptune search`` under a parent that captures), that closed another owner's stream: pointing the handler
    at the process's own stderr, which absl never closes, keeps it from doing so."""
    import sys

    import absl.logging
    from rouge_score import rouge_scorer

    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__
    return rouge_scorer


def generation_metrics(preds: list[str], refs: list[str]) -> dict:
    """exact_match (also reported as accuracy: comparable with a verbalizer on label-word targets),
    character-level ROUGE-L F1 (rouge-score's LCS) and corpus BLEU (sacrebleu, its Chinese tokenizer ``zh``)."""
    import sacrebleu

    rouge_scorer = _rouge_scorer()
    n = max(len(refs), 1)
    exact = sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True)) / n
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Chars())
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)) / n
    bleu = sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score if refs else 0.0
    return {"accuracy": exact, "exact_match": exact, "rouge_l": rouge, "bleu": bleu}


@torch.no_grad()
def first_step_logits(pm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of the first generated token (what ``ptune export`` compares with PEFT's)."""
    with da.prefixes(_prefixes(pm, False)):
        return _Decoder(pm, input_ids, attention_mask, use_cache=False, bare=False).start()
