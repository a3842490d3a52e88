"""A backbone's identity: the JSON facts stamped into every checkpoint so a prompt is never reused on another model,
and the checks that compare two of them (loading a checkpoint, serving several on one backbone).

The strongest fact is the sha256 of the weights. Hashing a model takes seconds, so each digest is remembered in a
sidecar keyed by (path, size, mtime) under the ptune cache; sidecars live there, not beside the file, because
package and user folders may be read-only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from ptune.atomic import atomic_write_text
from ptune.errors import PtuneError

from ..families import Family
from .cache import cache_base

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# what two identities must agree on, after the weights' sha256 (name_or_path may differ: a copy of the same model)
IDENTITY_KEYS = ("model_type", "hidden_size", "num_layers", "vocab_size")


def identity(
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
        weights_file, sha = weights_sha(folder)
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
        "family": family.name,
        "hidden_size": getattr(text, "hidden_size", None),
        "num_layers": num_layers,
        "vocab_size": getattr(text, "vocab_size", None),
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_vocab_size": len(tokenizer),
    }


def identity_mismatch(a: dict, b: dict) -> str | None:
    """The first identity key on which two backbone identities disagree, or None (a key either lacks is skipped:
    identities written by older versions have fewer)."""
    for key in ("sha256", *IDENTITY_KEYS):
        if key in a and key in b and a[key] != b[key]:
            return key
    return None


def check_same_backbone(saved: dict, current: dict, where: Path) -> None:
    """Refuse to load the checkpoint at ``where`` (identity ``saved``) on a backbone of identity ``current``."""
    key = identity_mismatch(saved, current)
    if key is not None:
        raise PtuneError(
            f"checkpoint {str(where)!r} was trained on a different backbone: {key} {saved[key]!r} there, "
            f"{current[key]!r} for {current.get('name_or_path')!r}"
        )


def weights_sha(folder: Path) -> tuple[str | None, str | None]:
    """sha256 of the folder's weights file; for sharded checkpoints, a digest of the per-shard digests."""
    for fname in WEIGHT_FILES:
        if (folder / fname).is_file():
            return fname, sha256_cached(folder / fname)
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError):
                return index, None
            digest = hashlib.sha256()
            for shard in shards:
                digest.update(f"{shard}:{sha256_cached(folder / shard)}\n".encode())
            return index, digest.hexdigest()
    return None, None


def sha256_cached(path: Path, *, known: str | None = None) -> str:
    """sha256 of ``path``, computed once and remembered in a sidecar keyed by (path, size, mtime).

    ``known`` records a digest the caller has just computed while writing the file (no second read).
    """
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
        atomic_write_text(side, json.dumps(rec))
    except OSError:
        pass  # a read-only cache only costs re-hashing next time
    return sha


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _hash_sidecar(path: Path) -> Path:
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
    return cache_base() / "hashes" / f"{key}.json"
