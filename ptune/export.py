"""`ptune export PATH --format peft --output DIR`: a folder that ``peft.PeftModel.from_pretrained`` loads.

* Soft prompts (soft_prompt, and P-tuning v1 when all its soft tokens come first) become PEFT **prompt tuning**
  (``adapter_config.json`` + ``adapter_model.safetensors`` holding ``prompt_embeddings``). PEFT puts its virtual
  tokens before everything, while ptune puts them after the tokenizer's leading special tokens ([CLS], <bos>):
  the export folds those leading tokens' embeddings into the virtual tokens, so feed PEFT the rendered input
  *without* them (``ptune_export.json`` lists their ids under ``drop_leading_token_ids``). Soft tokens in the
  middle of a template cannot be expressed in PEFT and are refused.
* Deep prompts (P-tuning v2, prefix tuning; the folded prefix) become PEFT **prefix tuning** without projection
  (``prefix_projection=False``, past_key_values layout) for causal LMs with rotary positions (Llama, Gemma,
  SmolLM2, ...). PEFT keeps the prefix in the key/value cache, so the real tokens sit at positions P..P+L-1
  instead of 0..L-1; with rotary embeddings only relative positions matter between real tokens, and the export
  pre-rotates the prefix keys by P so query-prefix scores match too. Models with absolute position embeddings
  (BERT, GPT-2) and encoder-decoder models are refused: there the shift changes the model's inputs.
* The readout is not part of a PEFT adapter: ``ptune_export.json`` records the template, label words and token
  ids (verbalizer) or the head's pooling; a [CLS] head's weights go to ``ptune_head.safetensors``.

Before it finishes, the export reloads the folder with PEFT onto the backbone and checks that PEFT's class scores
equal ptune's on a few probe inputs (one row at a time, no padding: PEFT counts left padding in positions).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_folder, previous_version
from .errors import PtuneError
from .template import SOFT_ID

MANIFEST = "ptune_export.json"  # what marks a folder as a ptune export
PROBES = [
    {"text_a": "a gorgeous , witty , seductive movie .", "text_b": "it is good ."},
    {"text_a": "the acting is just bad", "text_b": "nothing works ."},
    {"text_a": "unflinchingly bleak and desperate", "text_b": "a film ."},
]


def _peft():
    try:
        import peft
    except ImportError:
        raise PtuneError("ptune export --format peft needs the peft package: pip install peft") from None
    return peft


def _sites(model) -> list[torch.nn.Module]:
    found = {m._ptune_site: m for m in model.modules() if getattr(m, "_ptune_site", None) is not None}
    return [found[i] for i in sorted(found)]


def rotate_prefix_keys(model, prefix: torch.Tensor) -> torch.Tensor:
    """Pre-rotate every site's prefix keys by P positions (P = prefix length), see the module docstring."""
    sites = _sites(model)
    p = prefix.shape[3]
    captured: dict[int, Any] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, _a, kw, i=i: captured.__setitem__(i, kw.get("position_embeddings")), with_kwargs=True
        )
        for i, m in enumerate(sites)
    ]
    try:
        ids = torch.ones(1, p + 1, dtype=torch.long, device=prefix.device)
        with torch.no_grad():
            model.base_model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    out = prefix.clone()
    for i, m in enumerate(sites):
        pe = captured.get(i)
        apply = getattr(sys.modules[type(m).__module__], "apply_rotary_pos_emb", None)
        if not (isinstance(pe, tuple) and len(pe) == 2) or apply is None:
            model_type = getattr(model.config, "model_type", "?")
            raise PtuneError(
                f"cannot export deep prompts of a {model_type} model to PEFT prefix tuning: PEFT moves the input "
                "to positions P..P+L-1 behind its cached prefix, which only rotary-position models tolerate "
                "(Llama, Gemma, ...); with absolute position embeddings the exported adapter would compute "
                "something else"
            )
        cos, sin = pe
        k = prefix[i, 0].unsqueeze(0).to(cos.dtype)  # [1, heads, P, head_dim]
        _, rotated = apply(k, k, cos[:, p : p + 1], sin[:, p : p + 1])
        out[i, 0] = rotated[0].to(out.dtype)
    return out


def _probe(task) -> list[tuple[list[int], int]]:
    out = []
    for ex in PROBES:
        r = task.renderer.render({f: ex.get(f, ex["text_a"]) for f in task.renderer.template.fields})
        out.append((r.input_ids, r.answer_pos))
    return out


def _soft_layout(task) -> int:
    """Number of leading special tokens before the soft block; refuses soft tokens elsewhere."""
    lead = len(task.renderer.prefix_ids)
    n = task.renderer.num_soft
    for ids, _ in _probe(task):
        pos = [i for i, t in enumerate(ids) if t == SOFT_ID]
        if pos != list(range(lead, lead + n)):
            raise PtuneError(
                f"template {task.renderer.template.source!r} puts soft tokens after text: PEFT prompt tuning only "
                "prepends virtual tokens, so this prompt cannot be exported (move all {soft} placeholders to the "
                "start of the template)"
            )
    return lead


def _readout_info(task, out: Path) -> dict[str, Any]:
    return task.model.readout.export_info(task.model, out)


def _class_scores(task, logits_or_hidden: torch.Tensor, answer_pos: int) -> torch.Tensor:
    """ptune's readout applied to PEFT's output for one row."""
    return task.model.readout.export_scores(task.model, logits_or_hidden, answer_pos)


def _peft_forward(peft_model, task, ids: list[int], drop: int) -> torch.Tensor:
    inp = torch.tensor([[t for t in ids[drop:] if t != SOFT_ID]])
    extra = task.model.family.forward_inputs(task.model.backbone, 1, inp.device)
    out = peft_model(input_ids=inp, attention_mask=torch.ones_like(inp), **extra)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def verify(task, out: Path, drop: int) -> float:
    """Reload ``out`` with PEFT on the backbone and return the largest class-score difference to ptune."""
    peft = _peft()
    task.model.eval()
    worst = 0.0
    peft_model = peft.PeftModel.from_pretrained(task.model.backbone, str(out))
    peft_model.eval()
    with torch.no_grad():
        for ids, answer in _probe(task):
            t = torch.tensor([ids])
            ours = task.model.readout.export_reference(task.model, t, answer)
            theirs = _class_scores(task, _peft_forward(peft_model, task, ids, drop), answer)
            worst = max(worst, float((ours.float() - theirs.float()).abs().max()))
    return worst


# Everything an export writes: a folder holding anything else is not (only) ptune's, and is never replaced.
EXPORT_NAMES = frozenset({"adapter_config.json", "adapter_model.safetensors", "ptune_head.safetensors", MANIFEST})


def check_output(out: Path) -> None:
    """``--output`` must be writable and new, empty, or an earlier ptune export holding only ptune's files (the
    whole folder is swapped for the new export); when there is one, the sibling that swap keeps the old version
    in (``.<name>.old``) must be absent or ptune's too."""
    from .runfolder import check_writable, list_names

    check_writable(out, "--output")
    if not out.exists():
        entries = set()
    else:
        try:
            entries = {e.name for e in out.iterdir()}
        except OSError as exc:
            raise PtuneError(f"--output {str(out)!r} cannot be read: {exc.strerror or exc}") from None
    if entries and MANIFEST not in entries:
        raise PtuneError(
            f"--output {str(out)!r} already exists and is not a ptune export: name a new folder "
            "(ptune replaces only its own earlier exports)"
        )
    foreign = entries - EXPORT_NAMES
    if foreign:
        raise PtuneError(
            f"--output {str(out)!r} is an earlier ptune export that also holds {list_names(foreign)}, which ptune "
            "did not write and would delete: move them away or name a new folder"
        )
    old = previous_version(out)
    if entries and os.path.lexists(old) and not (old.is_dir() and {e.name for e in old.iterdir()} <= EXPORT_NAMES):
        raise PtuneError(
            f"{str(old)!r} exists and is not ptune's (an export swap keeps the old version there): move it away "
            "or name another --output"
        )


def export_peft(path: str | Path, output: str | Path, overrides: list[str] | None = None, check: bool = True) -> dict:
    peft = _peft()
    from safetensors.torch import save_file

    from .inference import load_task

    out = Path(output)
    check_output(out)  # before the checkpoint is loaded and verified: a bad --output costs no waiting
    task, cfg, ckpt, meta = load_task(path, overrides or [])
    model = task.model.cpu().eval()
    backbone = model.backbone
    common = dict(
        task_type=model.family.peft_task_type,
        base_model_name_or_path=str(task.backbone.identity.get("name_or_path") or cfg.backbone.name),
        inference_mode=True,
    )
    info: dict[str, Any] = {
        "format": "peft",
        "peft_version": peft.__version__,
        "checkpoint": str(ckpt),
        "method": task.method.name,
        "backbone": meta.get("backbone", {}),
        "label_names": task.label_names,
        "template": task.renderer.template.source,
        "answer": model.family.answer_description,
    }
    if model.tuner.peft_type == "PROMPT_TUNING":
        vectors = model.tuner.peft_prompt().float()
        if vectors.shape[0] == 0:
            raise PtuneError(
                "this checkpoint has no soft tokens to export (prompt_length 0, no {soft} in the template)"
            )
        lead = _soft_layout(task)
        lead_ids = list(task.renderer.prefix_ids)
        with torch.no_grad():
            lead_vecs = model.embeddings(torch.tensor([lead_ids], dtype=torch.long))[0].float() if lead else None
        table = torch.cat([lead_vecs, vectors]) if lead_vecs is not None else vectors
        config = peft.PromptTuningConfig(
            num_virtual_tokens=table.shape[0],
            token_dim=table.shape[1],
            num_transformer_submodules=1,
            num_layers=int(task.backbone.identity.get("num_layers") or 0) or None,
            num_attention_heads=getattr(backbone.config, "num_attention_heads", None),
            **common,
        )
        weights = {"prompt_embeddings": table.contiguous()}
        drop = lead
        info.update(
            peft_type="PROMPT_TUNING",
            num_virtual_tokens=table.shape[0],
            drop_leading_token_ids=lead_ids,
            usage="render the input with the template (no soft tokens), tokenize it, drop the leading "
            "drop_leading_token_ids (their embeddings are the first virtual tokens), then call the PEFT model; "
            "outputs include the virtual positions, so the answer index is unchanged",
        )
    elif model.tuner.peft_type == "PREFIX_TUNING":
        prefix = model.tuner.peft_prompt().float()  # [sites, 2, heads, P, head_dim]
        if not model.family.peft_prefix_export:
            raise PtuneError(
                f"deep prompts on an {model.family} backbone cannot be exported to PEFT: PEFT prefix tuning shifts the "
                "input positions behind its cached prefix (and for encoder-decoders routes the prefix differently); "
                "only causal LMs with rotary positions (Llama, Gemma, ...) are supported"
            )
        n_layers = int(getattr(backbone.config.get_text_config(), "num_hidden_layers", 0))
        if prefix.shape[0] != n_layers:
            raise PtuneError(
                f"the deep prompt has {prefix.shape[0]} attention sites but the model has {n_layers} layers: "
                "PEFT's past_key_values layout needs one prefix per layer"
            )
        rotated = rotate_prefix_keys(backbone, prefix)
        sites, _, heads, p, dim = rotated.shape
        config = peft.PrefixTuningConfig(
            num_virtual_tokens=p,
            token_dim=heads * dim,
            num_layers=sites,
            num_attention_heads=heads,
            encoder_hidden_size=heads * dim,
            prefix_projection=False,
            num_transformer_submodules=1,
            **common,
        )
        # PEFT views the [P, layers*2*heads*dim] table as [P, layers*2, heads, dim] and permutes it to
        # per-layer [2, batch, heads, P, dim] key/value pairs.
        weights = {"prompt_embeddings": rotated.permute(3, 0, 1, 2, 4).reshape(p, -1).contiguous()}
        drop = 0
        info.update(
            peft_type="PREFIX_TUNING",
            num_virtual_tokens=p,
            drop_leading_token_ids=[],
            usage="render the input with the template, tokenize it as usual, call the PEFT model (one row, or "
            "right padding); keys are pre-rotated by P positions to undo PEFT's position shift",
        )
        if getattr(backbone.config.get_text_config(), "sliding_window", None):
            info["note"] = (
                "sliding-window layers: PEFT's cached prefix leaves the window of tokens more than "
                f"{backbone.config.get_text_config().sliding_window} - P positions in, where ptune keeps it visible"
            )
    else:
        raise PtuneError(f"method {task.method.name} has no exportable prompt tensors")

    check_output(out)  # again: loading took a while
    with atomic_folder(out, owns_old=False) as tmp:
        config.save_pretrained(str(tmp))
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        info["readout"] = _readout_info(task, tmp)
        if check:
            diff = verify(task, tmp, drop)
            tol = 1e-4 if next(backbone.parameters()).dtype == torch.float32 else 5e-2
            info["verified_max_abs_diff"] = diff
            if not diff <= tol:
                why = f" ({info['note']})" if "note" in info else ""
                raise PtuneError(
                    f"the PEFT adapter does not reproduce ptune's class scores (max difference {diff:.3g} > {tol})"
                    f"{why}; not exported"
                )
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info
