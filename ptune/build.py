"""Assemble a PromptModel from the resolved config: backbone, template, readout and method."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .backbone import Backbone, load_backbone
from .batching import Encoded
from .errors import PtuneError
from .prompt_model import PromptModel
from .readout import ClsHead, VerbalizerReadout
from .template import TemplateRenderer, parse_template
from .token_cache import render_split
from .tuners import DEEP_METHODS, MethodConfig, TunerContext, build_tuner, method_config
from .tuners import deep_attention as da
from .tuners.base import SiteShape
from .verbalizer import Verbalizer, build_verbalizer


@dataclass
class Task:
    model: PromptModel
    backbone: Backbone
    renderer: TemplateRenderer
    verbalizer: Verbalizer | None
    label_names: list[str]
    method: MethodConfig
    left_pad: bool


def as_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def readout_kind(template_cfg: Mapping) -> str:
    kind = template_cfg.get("readout", "verbalizer")
    if kind not in ("verbalizer", "head"):
        raise PtuneError(f"template.readout={kind!r} is not valid: use verbalizer or head")
    return kind


def build_task(cfg: DictConfig, label_names: list[str], seed: int, backbone: Backbone | None = None) -> Task:
    """``backbone``: an already loaded one to reuse (multi-prompt serving shares one across checkpoints)."""
    method = method_config(as_dict(cfg.method))
    tcfg = as_dict(cfg.template)
    kind = readout_kind(tcfg)
    if backbone is None:
        backbone = load_backbone(
            str(cfg.backbone.name),
            with_lm_head=kind == "verbalizer",
            dtype=str(cfg.backbone.get("dtype", "float32")),
        )
    family = backbone.family
    tok = backbone.tokenizer
    if kind == "head" and family != "encoder":
        raise PtuneError(
            f"template.readout=head (a [CLS] linear head) needs an encoder backbone, but "
            f"{cfg.backbone.name!r} is {family}: use template.readout=verbalizer"
        )
    if kind == "verbalizer" and family == "encoder" and not backbone.has_lm_head:
        raise PtuneError(
            f"backbone {cfg.backbone.name!r} has no MLM head, so a verbalizer cannot read it: use "
            "template.readout=head or a backbone with an MLM head (e.g. backbone=cassette_bert)"
        )
    answer_mode = (
        "none" if kind == "head" else {"encoder": "mask", "causal": "end", "seq2seq": "drop"}[family]
    )
    template = parse_template(str(tcfg.get("text", "")))
    if method.name in DEEP_METHODS and any(s.kind == "soft" for s in template.segments):
        raise PtuneError(
            f"template {template.source!r} has soft tokens, which method {method.name} does not use: "
            "use method=soft_prompt or method=ptuning_v1, or remove the {soft} placeholders"
        )
    truncate = tcfg.get("truncate", "tail")
    if truncate not in ("head", "tail"):
        raise PtuneError(f"template.truncate={truncate!r} is not valid: use tail (cut the end) or head")
    renderer = TemplateRenderer(
        template,
        tok,
        answer_mode,
        max_length=max_input_length(backbone, int(cfg.backbone.get("max_length", 256))),
        prepend_soft=0 if method.name in DEEP_METHODS else method.prompt_length,
        truncate_side=truncate,
    )
    verbalizer = None
    calibrate = tcfg.get("calibrate", False)
    if not isinstance(calibrate, bool) or (calibrate and kind != "verbalizer"):
        raise PtuneError(
            f"template.calibrate={calibrate!r} is not valid: contextual calibration is true/false and needs "
            "template.readout=verbalizer"
        )
    if kind == "verbalizer":
        words = tcfg.get("label_words")
        if not words:
            raise PtuneError("template.label_words is empty: map every class to one or more label words")
        if tcfg.get("multi_token") == "full" and family == "encoder":
            raise PtuneError(
                "template.multi_token=full (whole-word log-likelihood) needs a causal or seq2seq backbone; "
                "an MLM reads the single [MASK] slot: use multi_token=first or mean"
            )
        verbalizer = build_verbalizer(
            words,
            label_names,
            tok,
            leading_space=family != "encoder" and template.text_before_mask().endswith(" "),
            multi_token=tcfg.get("multi_token", "first"),
        )
        readout: torch.nn.Module = VerbalizerReadout(verbalizer)
    else:
        hidden = backbone.model.get_input_embeddings().embedding_dim
        readout = ClsHead(
            hidden, len(label_names), tcfg.get("pooling", "cls"), float(tcfg.get("head_dropout", 0.1))
        )
    model = backbone.model
    sites: list[SiteShape] = []
    site_init = None
    lead = renderer.leading_soft() if family == "causal" and method.name not in DEEP_METHODS else 0
    if method.name in DEEP_METHODS or lead:
        da.enable(model)  # deep prompts, or a causal LM's shared soft-prompt prefix, go through ptune_sdpa
    if method.name in DEEP_METHODS:
        sites, site_init = _probe_sites(model, family, tok, seed)
    torch.manual_seed(seed)
    ctx = TunerContext(
        embeddings=model.get_input_embeddings(),
        hidden_size=model.get_input_embeddings().embedding_dim,
        num_soft=renderer.num_soft,
        soft_init_ids=renderer.soft_init_ids,
        label_word_ids=verbalizer.token_ids[..., 0][verbalizer.word_mask].tolist() if verbalizer else [],
        vocab_size=len(tok),
        special_ids=list(tok.all_special_ids),
        sites=sites,
        site_init=site_init,
    )
    tuner = build_tuner(method, ctx, tok, seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompt_model = PromptModel(model, family, tuner, readout, pad_id, (len(renderer.prefix_ids) + lead, lead))
    return Task(prompt_model, backbone, renderer, verbalizer, list(label_names), method, family == "causal")


def max_input_length(backbone: Backbone, configured: int) -> int:
    if configured <= 0:
        raise PtuneError(f"backbone.max_length={configured} must be > 0")
    limit = getattr(backbone.model.config, "max_position_embeddings", None) or configured
    return min(configured, int(limit))


def _probe_sites(model, family: str, tok, seed: int):
    """Run the frozen backbone once to learn each attention site's key/value shape; offer real-token init."""

    def run(ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad(), da.recording() as rec:
            if family == "seq2seq":
                model(input_ids=ids, decoder_input_ids=ids)
            else:
                model(input_ids=ids)
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
    return Encoded(ids, answers, list(labels))
