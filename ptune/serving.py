"""Multi-prompt serving: several prompt checkpoints on one frozen backbone, mixed in one batch.

The backbone is loaded once. Every request names the prompt it wants; a batch may mix prompts freely:

* each row is rendered by its own checkpoint's template (so rows differ in template words and soft slots);
* soft prompts: a per-row [B, N, H] table (shorter prompts padded) fills each row's soft slots
  (``PromptModel.embed``);
* deep prompts (P-tuning v2, prefix tuning): per-row key/value prefixes, padded to the longest prompt with the
  padding slots masked out (``deep_attention.prefixes(..., mask)``);
* readouts per row group: each checkpoint's verbalizer (or [CLS] head) reads its own rows;
* on families that pack rows (encoders, decoders), a batch whose rows differ in length runs packed
  (``ptune.packing``): rows end to end in one sequence, attention per row (each with its own deep prefix), the
  hidden states put back in the padded layout for the readouts.

``padded_tables`` stacks the prompts' soft vectors and prefixes; ``ptune serve``'s completions stack them the same
way to decode rows of several generate prompts in one batch (ptune/server/decode.py).

A batch of one prompt, unpacked, runs exactly the computation of that prompt's own ``PromptModel``; a mixed or
packed batch gives the same class scores up to float rounding (tests/test_serving.py checks 1e-5). Prompts read with
``template.multi_token=full`` (teacher-forced label words) are run per prompt inside a mixed batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import packing as packed
from .backbone import Backbone, load_backbone
from .backbone.identity import identity_mismatch
from .batching import Encoded, collate, eval_batches
from .build import Task
from .config import section, trainer_config
from .data import input_columns
from .efficiency.frozen import prepare_frozen_backbone
from .errors import PtuneError
from .inference import read_saved, rebuild
from .prompt_model import PromptModel
from .readouts import readout_class
from .runtime import autocast, pick_amp, pick_device
from .tuners import deep_attention as da


@dataclass
class ServedPrompt:
    name: str  # the path as given
    checkpoint: Path
    task: Task
    cfg: DictConfig
    meta: dict

    @property
    def label_names(self) -> list[str]:
        return self.task.label_names

    @property
    def fields(self) -> list[str]:
        return self.task.renderer.template.fields

    @functools.cached_property
    def columns(self) -> dict[str, list[str]]:
        """Where each template field may be found in an input object (``data.input_columns``), read once."""
        return input_columns(self.cfg.dataset, self.fields)

    @property
    def mixable(self) -> bool:
        """False for readouts that need their own forward (``Readout.mixable``: multi_token=full, a seq2seq head)."""
        return self.task.model.readout.mixable(self.task.model.family)

    @property
    def decodes_mixed(self) -> bool:
        """Whether its completions may decode in one batch with other prompts' (``Readout.decodes_mixed``)."""
        return self.task.model.readout.decodes_mixed(self.task.model.family)


def load_prompts(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> tuple[list[ServedPrompt], Backbone]:
    """Rebuild every checkpoint's prompt on one shared backbone; refuse checkpoints of another backbone. Each goes
    through the one loader (``inference.read_saved`` and ``inference.rebuild``, as ``load_task``)."""
    if not paths:
        raise PtuneError("no checkpoint given: pass one or more run folders or checkpoint/ folders")
    loaded = [(str(p), read_saved(p, overrides)) for p in paths]
    first_name, first = loaded[0]
    ref, shared = first.meta.get("backbone", {}), section(first.cfg, "backbone")
    for name, saved in loaded[1:]:
        key = identity_mismatch(ref, saved.meta.get("backbone", {}))
        if key is not None:
            raise PtuneError(
                f"checkpoints {first_name!r} and {name!r} were trained on different backbones ({key} "
                f"{ref.get(key)!r} vs {saved.meta['backbone'].get(key)!r}): one batch can only mix prompts of the "
                "same backbone; run them in separate calls"
            )
        key = _loading_mismatch(first.cfg, saved.cfg)
        if key is not None:
            raise PtuneError(
                f"checkpoints {first_name!r} and {name!r} use different backbone.{key} values: pass the same "
                f"backbone.{key}=... override for all of them"
            )
    need_lm_head = any(_needs_lm_head(s.cfg) for _, s in loaded)
    backbone = load_backbone(shared.name, with_lm_head=need_lm_head, dtype=shared.dtype, quantize=shared.quantize)
    prompts = []
    for name, saved in loaded:
        task = rebuild(saved, backbone)
        task.model.eval()
        prompts.append(ServedPrompt(name, saved.checkpoint, task, saved.cfg, saved.meta))
    return prompts, backbone


def _loading_mismatch(shared: DictConfig, own: DictConfig) -> str | None:
    """The ``backbone`` key (dtype, quantize) on which ``own`` would load the shared backbone otherwise, or None:
    one backbone is loaded for every served prompt."""
    a, b = section(shared, "backbone"), section(own, "backbone")
    return next((key for key in ("dtype", "quantize") if getattr(a, key) != getattr(b, key)), None)


def _needs_lm_head(cfg: DictConfig) -> bool:
    return readout_class(section(cfg, "template").readout).needs_lm_head


def padded_tables(
    vectors: Sequence[torch.Tensor | None],
    deep: Sequence[list[tuple[torch.Tensor, torch.Tensor]] | None],
    hidden: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None, torch.Tensor | None, list[int]]:
    """Several prompts' tensors stacked for one mixed batch (index them with each row's prompt).

    ``vectors``: each prompt's soft vectors [N_i, H] or None; ``deep``: each prompt's per-site key/value prefixes
    [1, heads, P_i, head_dim] or None. Returns the soft table [n, N_max, H] (zero padded: ``PromptModel.embed``
    fills a row's soft slots from the front), the per-site prefixes [n, heads, P_max, head_dim] (None when no
    prompt is deep), ``keep`` [n, P_max] (False on each prompt's padding slots, for ``deep_attention.prefixes``;
    None when no prompt is deep) and the prefix lengths P_i. ``dtype``: the tables' dtype (default: one that holds
    every input exactly)."""
    if dtype is None:  # every input's values exactly (a bf16 prompt beside an fp32 one under autocast)
        given = [v.dtype for v in vectors if v is not None] + [d[0][0].dtype for d in deep if d is not None]
        dtype = functools.reduce(torch.promote_types, given, given[0]) if given else torch.float32
    n_max = max((v.shape[0] for v in vectors if v is not None), default=0)
    soft = torch.zeros(len(vectors), n_max, hidden, device=device, dtype=dtype)
    for i, v in enumerate(vectors):
        if v is not None:
            soft[i, : v.shape[0]] = v.detach().to(dtype)
    prefix_len = [d[0][0].shape[-2] if d else 0 for d in deep]
    if all(d is None for d in deep):
        return soft, None, None, prefix_len
    p_max = max(prefix_len)
    template = next(d for d in deep if d is not None)
    tables = []
    for site, (k0, _) in enumerate(template):
        shape = (len(deep), k0.shape[1], p_max, k0.shape[3])
        ks, vs = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        for i, d in enumerate(deep):
            if d is not None:
                ks[i, :, : prefix_len[i]] = d[site][0][0].to(dtype)
                vs[i, :, : prefix_len[i]] = d[site][1][0].to(dtype)
        tables.append((ks, vs))
    keep = torch.arange(p_max, device=device)[None, :] < torch.tensor(prefix_len, device=device)[:, None]
    return soft, tables, keep, prefix_len


class PromptServer:
    """Serve several prompts of one backbone; ``scores(requests)`` runs them in mixed batches."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        overrides: Sequence[str] = (),
        device: str | None = None,
        precision: str | None = None,
        pack: bool = True,
    ):
        """``pack``: run mixed batches of rows of different lengths packed where the family can (``packs_rows``)."""
        self.pack = pack
        self.prompts, self.backbone = load_prompts(paths, overrides)
        tr = trainer_config(self.prompts[0].cfg)
        self.device = pick_device(device or tr.device)
        self.amp = pick_amp(precision or tr.precision, self.device)
        self.base: PromptModel = self.prompts[0].task.model
        self.left_pad = self.prompts[0].task.left_pad
        self.pad_id = self.base.pad_id
        self.overrides = list(overrides)
        # whether the shared backbone was loaded with its LM head (a later prompt that needs one cannot get it)
        self.lm_head_loaded = any(_needs_lm_head(p.cfg) for p in self.prompts)
        for p in self.prompts:
            p.task.model.to(self.device).eval()
        prepare_frozen_backbone(self.base.backbone, self.amp, tr.cast_frozen_weights, tr.fuse_projections)
        if self.packs_rows:
            da.enable(self.base.backbone)  # packed rows attend per row through ptune's attention function
        self._build_tables()

    # ------------------------------------------------------------------ prompts added and removed while serving
    def add_checkpoint(self, path: str | Path, name: str | None = None) -> ServedPrompt:
        """Serve one more checkpoint on the backbone already loaded (``ptune serve``'s POST /v1/models): refused with
        a PtuneError when it was trained on another backbone or needs the backbone loaded otherwise."""
        saved = read_saved(path, self.overrides)  # the one loader, as load_prompts
        cfg = saved.cfg
        key = _loading_mismatch(self.prompts[0].cfg, cfg)
        if key is not None:
            own, shared = section(cfg, "backbone"), section(self.prompts[0].cfg, "backbone")
            raise PtuneError(
                f"checkpoint {str(path)!r} uses backbone.{key}={getattr(own, key)!r}, the served backbone "
                f"{getattr(shared, key)!r}: serve it from another server"
            )
        if _needs_lm_head(cfg) and not self.lm_head_loaded:
            raise PtuneError(
                f"checkpoint {str(path)!r} reads the backbone's LM head, which this server did not load: restart the "
                "server with it among the first checkpoints"
            )
        task = rebuild(saved, backbone=self.backbone)  # refused when trained on another backbone
        task.model.to(self.device).eval()
        prompt = ServedPrompt(name or str(path), saved.checkpoint, task, cfg, saved.meta)
        self.prompts.append(prompt)
        self._build_tables()
        return prompt

    def remove(self, prompt: ServedPrompt) -> None:
        """Stop serving ``prompt`` (indices of the prompts after it shift down by one); the last one stays."""
        if len(self.prompts) == 1:
            raise PtuneError(f"{prompt.name!r} is the only prompt served: a server keeps at least one")
        self.prompts.remove(prompt)
        self.base = self.prompts[0].task.model
        self._build_tables()

    # ------------------------------------------------------------------ per-prompt tensors, padded and stacked
    def _build_tables(self) -> None:
        with torch.no_grad():
            vectors = [p.task.model.tuner.soft_vectors() for p in self.prompts]
            deep = [p.task.model.tuner.deep_prefixes() if p.task.model.tuner.is_deep else None for p in self.prompts]
        self.soft, self.deep, self.keep, self.prefix_len = padded_tables(
            vectors, deep, self.base.embeddings.embedding_dim, self.device, torch.float32
        )

    # ------------------------------------------------------------------ encoding
    def encode(self, requests: Sequence[tuple[int, dict[str, str]]]) -> Encoded:
        """Render each (prompt index, example) with that prompt's own template."""
        ids, answers = [], []
        for i, example in requests:
            r = self.prompts[i].task.renderer.render(example)
            ids.append(r.input_ids)
            answers.append(r.answer_pos)
        return Encoded(ids, answers, [i for i, _ in requests])  # "labels" carry the prompt index

    # ------------------------------------------------------------------ the mixed forward
    def forward(
        self, prompt_idx: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor
    ) -> list[torch.Tensor]:
        """Class scores for every row ([classes of that row's prompt]); rows may use different prompts."""
        dev = self.device
        prompt_idx, input_ids = prompt_idx.to(dev), input_ids.to(dev)
        attention_mask, answer_pos = attention_mask.to(dev), answer_pos.to(dev)
        used = sorted(set(prompt_idx.tolist()))
        out: list[torch.Tensor | None] = [None] * len(prompt_idx)
        mixable = [i for i in used if self.prompts[i].mixable]
        for i in used:
            if i not in mixable:  # own forward for the rows of this prompt
                rows = (prompt_idx == i).nonzero().squeeze(1)
                scores = self.prompts[i].task.model(input_ids[rows], attention_mask[rows], answer_pos[rows])
                for r, s in zip(rows.tolist(), scores, strict=True):
                    out[r] = s
        if mixable:
            rows = torch.isin(prompt_idx, torch.tensor(mixable, device=dev)).nonzero().squeeze(1)
            if len(rows) == len(prompt_idx):
                rows = None  # the whole batch (no copy)
            sel = (lambda t: t) if rows is None else (lambda t: t[rows])
            groups = self._mixed(sel(prompt_idx), sel(input_ids), sel(attention_mask), sel(answer_pos))
            index = torch.arange(len(prompt_idx), device=dev) if rows is None else rows
            for local, scores in groups:
                for r, s in zip(index[local].tolist(), scores, strict=True):
                    out[r] = s
        return out  # type: ignore[return-value]

    def _mixed(self, pidx, input_ids, attention_mask, answer_pos) -> list[tuple[torch.Tensor, torch.Tensor]]:
        base = self.base
        used = sorted(set(pidx.tolist()))
        if len(used) == 1:  # batch dim 1, broadcast: exactly the single-prompt computation
            vectors = self.soft[used[0] : used[0] + 1].expand(len(pidx), -1, -1)
        else:
            vectors = self.soft[pidx]
        embeds = base.embed(input_ids, vectors)
        packing = packed.plan(attention_mask, base.family.causal_attention) if self.packs_rows else None
        if packing is not None:
            states = self._run_packed(packing, pidx, used, embeds)
        else:
            states = self._run_padded(pidx, used, embeds, attention_mask)
        # Where the family reads the whole vocabulary (MLM head, seq2seq decoder), one call covers every
        # verbalizer row: the head's [vocab, H] weight is read once per batch.
        shared = [] if base.family.label_rows_only else [i for i in used if self._verbalized(i)]
        if shared:
            vocab_rows = torch.isin(pidx, torch.tensor(shared, device=pidx.device)).nonzero().squeeze(1)
            vocab = base.family.answer_logits(base.backbone, states[vocab_rows], answer_pos[vocab_rows], None)
            where = torch.full((len(pidx),), -1, dtype=torch.long, device=pidx.device)
            where[vocab_rows] = torch.arange(len(vocab_rows), device=pidx.device)
        groups = []
        for i in used:
            rows = (pidx == i).nonzero().squeeze(1)
            model = self.prompts[i].task.model
            if i in shared:
                scores = model.readout(vocab[where[rows]])
            else:
                scores = model.read_out(states[rows], attention_mask[rows], answer_pos[rows])
            groups.append((rows, scores))
        return groups

    @property
    def packs_rows(self) -> bool:
        """Whether mixed batches run packed (``ptune.packing``): rows of different lengths end to end, not padded."""
        return self.pack and self.base.family.packs_rows and self.base.takes_positions

    def _row_prefixes(self, pidx: torch.Tensor, used: list[int]
                      ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, torch.Tensor | None]:
        """Each row's deep prefix, per site ([B, heads, P, D], or [1, ...] when one prompt serves every row), padded
        to the batch's longest, and which slots each row attends to ([B, P]; None when every row's are all real)."""
        lengths = {self.prefix_len[i] for i in used}
        if self.deep is None or lengths == {0}:
            return None, None
        if len(used) == 1:  # batch dim 1, broadcast
            i, p = used[0], self.prefix_len[used[0]]
            return [(k[i : i + 1, :, :p], v[i : i + 1, :, :p]) for k, v in self.deep], None
        p = max(lengths)
        prefixes = [(k[pidx, :, :p], v[pidx, :, :p]) for k, v in self.deep]
        return prefixes, (self.keep[pidx, :p] if len(lengths) > 1 else None)

    def _run_padded(self, pidx: torch.Tensor, used: list[int], embeds: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
        """The hidden states of a padded forward; each row attends to its prompt's deep prefix."""
        with da.prefixes(*self._row_prefixes(pidx, used)):
            return self.base.family.run(self.base, embeds, attention_mask)

    def _run_packed(self, packing: packed.Packing, pidx: torch.Tensor, used: list[int], embeds: torch.Tensor
                    ) -> torch.Tensor:
        """The hidden states of a packed forward, in the padded layout; attention runs per row, bucket by bucket,
        each row with its own prompt's deep prefix."""
        with da.prefixes(*self._row_prefixes(pidx, used), buckets=packing.buckets):
            hidden = self.base.family.run_packed(self.base, packing.pack(embeds), packing.mask(), packing.positions)
        return packing.unpack(hidden)

    def _verbalized(self, i: int) -> bool:
        return self.prompts[i].task.model.readout.reads_vocabulary

    # ------------------------------------------------------------------ batched scoring
    def scores(self, requests: Sequence[tuple[int, dict[str, str]]], batch_size: int = 32) -> list[torch.Tensor]:
        """Class scores for every request, in request order; batches mix prompts and are sorted by length."""
        return self.score_encoded(self.encode(requests), batch_size)

    def score_encoded(self, data: Encoded, batch_size: int = 32) -> list[torch.Tensor]:
        """``scores`` for already rendered requests (``encode``)."""
        out: list[torch.Tensor | None] = [None] * len(data)
        lengths = [len(x) for x in data.input_ids]
        with torch.inference_mode(), autocast(self.device, self.amp):
            for idx in eval_batches(lengths, batch_size):
                b = collate(data, idx, self.pad_id, self.left_pad)
                rows = self.forward(b["labels"], b["input_ids"], b["attention_mask"], b["answer_pos"])
                for j, s in zip(idx, rows, strict=True):
                    out[j] = s.float().cpu()
        return out  # type: ignore[return-value]
