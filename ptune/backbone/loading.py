"""Load the frozen pretrained backbone (model + tokenizer) that every tuner wraps.

All tuners need the same things from a backbone -- a frozen model in eval mode, a tokenizer that can pad, the
model family (which decides how prompts are injected and which loss applies), whether a real MLM/LM head was
loaded (verbalizer-style tuning needs one) and a stable identity to stamp into checkpoints so a soft prompt is
never reused on a different model. This module turns a name into that ``Backbone``; the registry of packaged
models, the GGUF cache and the identity live in their own modules.

A backbone name is one of
  * a packaged short name (``minilm``, ``cassette-bert``, ``smollm2``, ``gemma3-270m`` and aliases): the
    weights ship in pip packages, so runs work offline;
  * a local folder written by ``save_pretrained`` (or holding exactly one ``.gguf`` file), or a ``.gguf``
    file path;
  * a Hugging Face Hub id (needs network or the local Hub cache).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ptune.errors import PtuneError, one_line

from ..efficiency.quantize import check_available as check_quantize
from ..efficiency.quantize import quantize_backbone
from ..families import Family, detect_family
from .gguf import cached_folder, gguf_cache
from .heads import is_lm_model, missing_head_keys
from .identity import identity, sha256_cached
from .packaged import Packaged, chunk_layout, lookup_packaged, package_dir, packaged_names, resolve_packaged

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_ERROR_LIMIT = 160  # characters of a library's error quoted inside ptune's one-line messages


@dataclass
class Backbone:
    """A frozen model plus what tuners need to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: Family
    has_lm_head: bool
    identity: dict[str, Any]


def load_backbone(name: str, *, with_lm_head: bool, dtype: str = "float32", quantize: str = "none") -> Backbone:
    """Load ``name`` frozen and in eval mode; ``with_lm_head`` asks for the MLM head of an encoder.

    Causal and seq2seq models always come with their LM head. ``has_lm_head`` reports whether the head
    weights really came from the checkpoint (a bare encoder such as minilm gets a random head that the
    caller must refuse). ``quantize`` (none | int8 | nf4, ``ptune.efficiency.quantize``) stores the transformer blocks'
    weights in 8 or 4 bits right after loading, where the model was loaded (the CPU), so that only the quantised
    weights travel to the GPU.
    """
    torch_dtype = _parse_dtype(dtype)
    check_quantize(quantize)
    backbone = _load(name, with_lm_head, torch_dtype)
    quantize_backbone(backbone.model, quantize)
    return backbone


def _load(name: str, with_lm_head: bool, torch_dtype: torch.dtype) -> Backbone:
    _quiet_transformers()
    entry = lookup_packaged(name)
    if entry is not None:
        return _load_packaged(entry, name, with_lm_head, torch_dtype)

    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path, name, with_lm_head, torch_dtype)
    if _looks_like_path(name):
        raise PtuneError(
            f"cannot load backbone '{name}': no such file or folder "
            f"(packaged models: {packaged_names()}; or a save_pretrained folder, a .gguf file, a Hub id)"
        )
    return _load_hub(name, with_lm_head, torch_dtype)


# ----------------------------------------------------------------------------------------------------
# loading paths
# ----------------------------------------------------------------------------------------------------


def _load_packaged(entry: Packaged, name: str, with_lm_head: bool, torch_dtype: torch.dtype) -> Backbone:
    """Packaged HF folders load directly; packaged GGUFs go through the safetensors cache."""
    extra: dict[str, Any] = {"packaged": entry.key}
    if entry.subdir is not None:
        folder, _ = resolve_packaged(entry.key) or ("", None)
        return _load_folder(Path(folder), name, with_lm_head, torch_dtype, extra)
    if entry.chunked:
        # The expected sha256 is known up front, so a warm cache needs neither the chunks nor a hash.
        layout = chunk_layout(package_dir(entry.package, entry.dist, entry.key))
        sha = layout["EXPECTED_SHA256"]
        gguf_name = layout["MODEL_NAME"]
        cache = cached_folder(entry.key, sha)
        if cache is None:
            folder, gguf_file = resolve_packaged(entry.key) or ("", None)
            assert gguf_file is not None
            cache = gguf_cache(Path(folder) / gguf_file, entry.key, sha)
    else:
        folder, gguf_file = resolve_packaged(entry.key) or ("", None)
        assert gguf_file is not None
        gguf_name = gguf_file
        sha = sha256_cached(Path(folder) / gguf_file)
        cache = gguf_cache(Path(folder) / gguf_file, entry.key, sha)
    extra.update(weights_file=gguf_name, sha256=sha, cache_path=str(cache))
    return _load_folder(cache, name, with_lm_head, torch_dtype, extra)


def _load_local(path: Path, name: str, with_lm_head: bool, torch_dtype: torch.dtype) -> Backbone:
    """A save_pretrained folder, a folder with exactly one .gguf, or a .gguf file."""
    gguf: Path | None = None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise PtuneError(
                f"cannot load backbone '{name}': it is a file but not a .gguf file "
                "(expected a save_pretrained folder, a .gguf file, a packaged name or a Hub id)"
            )
        gguf = path
    elif not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            found = f"{len(ggufs)} .gguf files" if ggufs else "no .gguf file"
            raise PtuneError(
                f"cannot load backbone '{name}': the folder has no config.json and {found} "
                "(expected a folder written by save_pretrained, or one holding exactly one .gguf file)"
            )
        gguf = ggufs[0]
    if gguf is None:
        return _load_folder(path, name, with_lm_head, torch_dtype, {})
    sha = sha256_cached(gguf)
    key = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem).strip("-.") or "model"
    cache = gguf_cache(gguf, key, sha, detect=True)
    extra = {"weights_file": gguf.name, "sha256": sha, "cache_path": str(cache)}
    return _load_folder(cache, name, with_lm_head, torch_dtype, extra, resolved=gguf.resolve().parent)


def _load_hub(name: str, with_lm_head: bool, torch_dtype: torch.dtype) -> Backbone:
    """Hub ids go through transformers (network or local Hub cache); failures become one-line errors."""
    try:
        AutoConfig.from_pretrained(name)
    except Exception as exc:  # any failure here means "cannot get it from the Hub"
        raise PtuneError(_hub_error(name, exc)) from None
    backbone = _load_folder(name, name, with_lm_head, torch_dtype, {})
    return backbone


def _hub_error(name: str, exc: Exception) -> str:
    """One line telling the user every way ``name`` was tried and why the Hub failed."""
    msg = str(exc)
    head = f"cannot load backbone '{name}': not a packaged model ({packaged_names()}), not a local folder, and"
    if "Repo id must" in msg or type(exc).__name__ == "HFValidationError":
        return f"{head} not a valid Hugging Face Hub id"
    reason = one_line(msg, _ERROR_LIMIT)
    if _hub_offline():
        reason = "HF_HUB_OFFLINE is set and the model is not in the local Hub cache"
    if _hub_offline() or "connect" in msg.lower() or "offline" in msg.lower():
        return f"{head} the Hugging Face Hub is unreachable ({reason})"
    return f"{head} the Hugging Face Hub could not provide it ({reason})"


def _load_folder(
    source: str | Path,
    name: str,
    with_lm_head: bool,
    torch_dtype: torch.dtype,
    extra: dict[str, Any],
    resolved: Path | None = None,
) -> Backbone:
    """Load config, model (head class by family) and tokenizer from a folder or Hub id, then freeze."""
    where = str(source)
    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as exc:
        raise PtuneError(
            f"cannot load backbone '{name}': config of {where} is unreadable ({one_line(exc, _ERROR_LIMIT)})"
        ) from None
    if isinstance(source, Path) and not _has_tokenizer_files(source):
        # transformers 5 would silently build an empty tokenizer (special tokens only) from the config
        raise PtuneError(
            f"cannot load the tokenizer of backbone '{name}': {where} holds no tokenizer files "
            "(save the tokenizer there too: tokenizer.save_pretrained(folder))"
        )
    family = detect_family(config)
    want_head = family.wants_head(with_lm_head)
    model, missing = _load_model(where, name, config, family, want_head, torch_dtype)
    has_lm_head = want_head and is_lm_model(model) and not missing_head_keys(model, missing)

    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as exc:
        raise PtuneError(
            f"cannot load the tokenizer of backbone '{name}' from {where} ({one_line(exc, _ERROR_LIMIT)})"
        ) from None
    _ensure_pad_token(tokenizer, model, name)

    model.requires_grad_(False)
    model.eval()

    folder = Path(source) if isinstance(source, Path) else _hub_snapshot_dir(where)
    ident = identity(name, folder, resolved, config, family, tokenizer, hash_weights="sha256" not in extra)
    ident.update(extra)
    return Backbone(model=model, tokenizer=tokenizer, family=family, has_lm_head=has_lm_head, identity=ident)


def _load_model(
    where: str, name: str, config: PretrainedConfig, family: Family, want_head: bool, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, set[str]]:
    """Pick the auto class; fall back to the bare model when transformers has no head class for the type."""
    auto: Any = family.auto_class(want_head)
    try:
        try:
            model, info = auto.from_pretrained(where, dtype=torch_dtype, output_loading_info=True)
        except ValueError as exc:
            if auto is AutoModel or "Unrecognized configuration class" not in str(exc):
                raise
            model, info = AutoModel.from_pretrained(where, dtype=torch_dtype, output_loading_info=True)
    except Exception as exc:
        raise PtuneError(
            f"cannot load backbone '{name}' (model_type {getattr(config, 'model_type', '?')}) "
            f"from {where} ({one_line(exc, _ERROR_LIMIT)})"
        ) from None
    return model, set(info.get("missing_keys") or ())


def _has_tokenizer_files(folder: Path) -> bool:
    prefixes = ("tokenizer", "vocab", "spiece", "merges", "sentencepiece")
    return any(p.is_file() and (p.name.startswith(prefixes) or p.suffix == ".model") for p in folder.iterdir())


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, name: str) -> None:
    """Batching needs a pad token; reuse eos (or unk) rather than growing a frozen vocabulary."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise PtuneError(
                f"the tokenizer of backbone '{name}' has no pad, eos or unk token to pad batches with "
                "(use a model whose tokenizer defines one of them)"
            )
        tokenizer.pad_token = fallback
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------


def _parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise PtuneError(f"backbone dtype '{dtype}' is not supported (valid: {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def _quiet_transformers() -> None:
    """Load progress bars and head-missing warnings are noise here; has_lm_head reports the latter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _looks_like_path(name: str) -> bool:
    """Names that can only be paths (a Hub id is ``name`` or ``org/name``)."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or name.lower().endswith(".gguf")


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _hub_snapshot_dir(repo_id: str) -> Path | None:
    """Local snapshot folder of a Hub model (for hashing); None if transformers cannot say."""
    try:
        from transformers.utils import cached_file

        found = cached_file(repo_id, "config.json")
    except Exception:
        return None
    return Path(found).parent if found else None
