"""Assemble a PromptModel from the resolved config: backbone, template, readout and method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .backbone import Backbone, load_backbone
from .batching import Encoded
from .config import BackboneConfig, TemplateConfig, section
from .errors import PtuneError
from .families import Family
from .prompt_model import PromptModel
from .readouts import Verbalizer, readout_class
from .runtime import settle_backbone_dtype
from .template import TemplateRenderer, parse_template
from .token_cache import render_split
from .tuners import MethodConfig, TunerContext, build_tuner, method_config, soft_token_methods, tuner_class
from .tuners import deep_attention as da
from .tuners.base import SiteShape


@dataclass
class Task:
    model: PromptModel
    backbone: Backbone
    renderer: TemplateRenderer
    verbalizer: Verbalizer | None
    label_names: list[str]
    method: MethodConfig

    @property
    def left_pad(self) -> bool:
        """Whether batches pad on the left: the family's fact (``Family.left_pad``), read there, never copied."""
        return self.model.family.left_pad


def as_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def build_task(cfg: DictConfig, label_names: list[str], seed: int, backbone: Backbone | None = None) -> Task:
    """``backbone``: an already loaded one to reuse (multi-prompt serving shares one across checkpoints)."""
    method = method_config(as_dict(cfg.method))
    if backbone is None:
        settle_backbone_dtype(cfg)  # backbone.dtype=auto: training settled it already; a checkpoint saves it settled
    tcfg: TemplateConfig = section(cfg, "template")
    bcfg: BackboneConfig = section(cfg, "backbone")
    readout_cls = readout_class(tcfg.readout)
    if backbone is None:
        backbone = load_backbone(
            bcfg.name, with_lm_head=readout_cls.needs_lm_head, dtype=bcfg.dtype, quantize=bcfg.quantize
        )
    family = backbone.family
    tuner_cls = tuner_class(method)
    tok = backbone.tokenizer
    readout_cls.check_backbone(family, backbone, cfg.backbone.name)
    answer_mode = readout_cls.answer_mode(family)
    max_len = max_input_length(backbone, bcfg.max_length) - readout_cls.target_length(tcfg, family)
    template = parse_template(tcfg.text)
    if not tuner_cls.uses_soft_tokens and any(s.kind == "soft" for s in template.segments):
        suggest = " or ".join(f"method={name}" for name in soft_token_methods())
        raise PtuneError(
            f"template {template.source!r} has soft tokens, which method {method.name} does not use: "
            f"use {suggest}, or remove the {{soft}} placeholders"
        )
    renderer = TemplateRenderer(
        template,
        tok,
        answer_mode,
        max_length=max_len,
        prepend_soft=method.prompt_length if tuner_cls.uses_soft_tokens else 0,
        truncate_side=tcfg.truncate,
    )
    readout = readout_cls.create(tcfg, list(label_names), backbone, template, seed)
    model = backbone.model
    sites: list[SiteShape] = []
    site_init = None
    # soft tokens that open every input of a causal LM are computed once per batch (PromptModel.share_prefix)
    lead = renderer.leading_soft() if family.causal_attention and not tuner_cls.is_deep else 0
    if tuner_cls.is_deep or lead:
        da.enable(model)  # deep prompts, or a causal LM's shared soft-prompt prefix, go through ptune_sdpa
    if tuner_cls.is_deep:
        sites, site_init = _probe_sites(model, family, tok, seed)
    torch.manual_seed(seed)
    ctx = TunerContext(
        embeddings=model.get_input_embeddings(),
        hidden_size=model.get_input_embeddings().embedding_dim,
        num_soft=renderer.num_soft,
        soft_init_ids=renderer.soft_init_ids,
        label_word_ids=readout.label_word_ids(),
        no_label_words=readout.no_label_words,
        vocab_size=len(tok),
        special_ids=list(tok.all_special_ids),
        sites=sites,
        site_init=site_init,
    )
    tuner = build_tuner(method, ctx, tok, seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompt_model = PromptModel(model, family, tuner, readout, pad_id, (len(renderer.prefix_ids) + lead, lead))
    return Task(prompt_model, backbone, renderer, readout.verbalizer, list(label_names), method)


def max_input_length(backbone: Backbone, configured: int) -> int:
    """``backbone.max_length`` (checked by BackboneConfig) capped by the model's position limit."""
    limit = getattr(backbone.model.config, "max_position_embeddings", None) or configured
    return min(configured, int(limit))


def _probe_sites(model, family: Family, tok, seed: int):
    """Run the frozen backbone once to learn each attention site's key/value shape; offer real-token init."""

    def run(ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad(), da.recording() as rec:
            model(**family.probe_inputs(ids))
        return rec

    special = set(tok.all_special_ids)
    pool = [i for i in range(min(len(tok), 5000 + len(special))) if i not in special]
    rec = run(torch.tensor([pool[:2]]))
    sites = [SiteShape(heads=k.shape[1], head_dim=k.shape[3]) for _, (k, _) in sorted(rec.items())]
    if len({(s.heads, s.head_dim) for s in sites}) > 1:
        raise PtuneError("deep prompts need the same head count and size in every attention layer")

    def site_init(length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.tensor([[pool[i] for i in torch.randint(len(pool), (length,), generator=g).tolist()]])
        rec = run(ids)
        return [(k.float().clone(), v.float().clone()) for _, (k, v) in sorted(rec.items())]

    return sites, site_init


def encode(task: Task, examples: list[dict[str, str]], labels: list[int]) -> Encoded:
    """Render a split: fields tokenised in batches, and cached on disk so a second run does not re-tokenise."""
    ids, answers = render_split(task.renderer, examples)
    return task.model.readout.encode(task.renderer, examples, labels, ids, answers)
