"""GGUF checkpoints, made fast to load: dequantised once into a float32 safetensors folder in the ptune cache.

Dequantising takes ~20-60 s per load while the cached folder loads in ~1-2 s. A folder is published by rename only
after the conversion reloaded it, found the dequantised weights in it bit for bit and reproduced the GGUF model's
logits to fp32 rounding, and ``ptune_cache.json`` is
written last inside it, so a complete-looking folder is a correct one. Packaged GGUFs split across several pip
packages are concatenated here too, once, sha256-verified.

Writers hold one OS file lock (``flock`` on ``<cache>/gguf.lock``) while they convert or assemble. The kernel drops
it when its process ends in any way, kill -9 included, so whoever holds it knows that every hidden entry in the
cache folders (temporary folders and files, ``.old`` swaps, the ``.<key>-tmp-*`` folders of ptune versions before
the lock) is a killed writer's leftover -- a killed conversion leaves ~0.5 GB -- and sweeps it at once. The lock
file lives beside the cache folders, not in them, and stays: unlinking it would let two processes lock two files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ptune.atomic import TMP_PREFIX, atomic_folder
from ptune.errors import PtuneError, one_line

from ..families import CAUSAL, detect_family
from .cache import cache_base
from .heads import is_lm_model
from .identity import WEIGHT_FILES, WEIGHT_INDEXES, sha256_cached

CACHE_META = "ptune_cache.json"
LOCK_NAME = "gguf.lock"
# How far the converted model's probe logits may stray from the GGUF model's, relative to the largest logit.
# Same weights, other instance or thread count: only the kernels' reduction order differs, which moves fp32 logits by
# a few ulps of the largest one (Gemma-3-270m, 1 vs 2 threads: 3.3e-5 of a largest logit of 29.5, 1.1e-6 of it or 9.5
# ulps). A wrong conversion moves them by whole units. 1e-4 (~840 ulps) is far above the one, far below the other.
LOGIT_RTOL = 1e-4


def models_dir() -> Path:
    """Converted safetensors folders, one per (name, GGUF sha256)."""
    return cache_base() / "models"


def gguf_dir() -> Path:
    """GGUF files assembled from chunked packages."""
    return cache_base() / "gguf"


def cache_complete(folder: Path) -> bool:
    """The meta file is written last inside the temp folder, and the folder appears by rename."""
    return (
        (folder / CACHE_META).is_file()
        and (folder / "config.json").is_file()
        and any((folder / f).is_file() for f in (*WEIGHT_FILES, *WEIGHT_INDEXES))
    )


def cached_folder(key: str, sha: str) -> Path | None:
    """The converted folder of the GGUF with this sha256 when it is complete, else None.

    Every lookup also sweeps the leftovers of killed writers, unless a writer is at work right now.
    """
    sweep_leftovers()
    final = models_dir() / f"{key}-{sha[:12]}"
    return final if cache_complete(final) else None


def gguf_cache(gguf: Path, key: str, sha: str, *, detect: bool = False) -> Path:
    """Return the dequantised float32 safetensors folder for ``gguf``, converting it once (atomically).

    ``detect`` reads the family from the GGUF's config; without it the model is causal (the packaged GGUFs are).
    A second process that needs the same folder waits for the first one's conversion instead of repeating it.
    """
    final = models_dir() / f"{key}-{sha[:12]}"
    if cached_folder(key, sha) is not None:
        return final
    with _writer_lock(models_dir()):
        if cache_complete(final):  # converted by the process we waited for
            return final
        with atomic_folder(final) as tmp:
            _convert_gguf(gguf, tmp, detect=detect)
            meta = {
                "source": str(gguf.resolve()),
                "source_sha256": sha,
                "created": time.time(),
                "transformers_version": _transformers_version(),
            }
            (tmp / CACHE_META).write_text(json.dumps(meta, indent=2))
    return final


def assembled_gguf(name: str, expected_sha: str) -> Path | None:
    """The assembled GGUF ``name`` when it is in the cache with the expected sha256, else None."""
    target = gguf_dir() / name
    return target if target.is_file() and sha256_cached(target) == expected_sha else None


def assemble_gguf(chunks: list[Path], name: str, expected_sha: str, reinstall: str) -> Path:
    """Concatenate ``chunks`` into ``<cache>/gguf/<name>`` once, check its sha256, publish it by rename.

    ``reinstall`` names what to reinstall when the digest is wrong. The digest is taken while writing, so the file
    is read once; it is then recorded as the file's hash sidecar.
    """
    target = gguf_dir() / name
    with _writer_lock(target.parent):
        if assembled_gguf(name, expected_sha) is not None:  # assembled by the process we waited for
            return target
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f"{TMP_PREFIX}{target.name}.")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    with chunk.open("rb") as fh:
                        while block := fh.read(1 << 20):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != expected_sha:
                raise PtuneError(
                    f"assembled {name} has sha256 {digest.hexdigest()[:16]}..., expected "
                    f"{expected_sha[:16]}... (reinstall {reinstall})"
                )
            tmp.chmod(0o644)  # mkstemp makes owner-only files; published files get the usual mode
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    sha256_cached(target, known=expected_sha)
    return target


# ----------------------------------------------------------------------------------------------------
# the writer lock and the sweep of leftovers
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _writer_lock(folder: Path) -> Iterator[None]:
    """Create ``folder``, wait for the writer lock, sweep leftovers, and hold the lock for the block.

    Not re-entrant: a holder that asks again would wait for itself (flock locks open files, not processes).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_base() / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        reason = one_line(exc, 160)
        raise PtuneError(f"cannot create the model cache folder {folder} ({reason}; set PTUNE_CACHE)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            print(f"ptune: waiting for {holder}, which is writing to the model cache {cache_base()}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):  # who holds it is only shown to waiters
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        _sweep()
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def sweep_leftovers() -> list[Path]:
    """Remove killed writers' leftovers now if no writer is at work (else they may be its live files).

    Returns what was removed. Never raises: a read-only or missing cache simply has nothing to sweep.
    """
    if not (models_dir().is_dir() or gguf_dir().is_dir()):
        return []
    try:
        fd = os.open(cache_base() / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return []
    else:
        return _sweep()
    finally:
        os.close(fd)


def _sweep() -> list[Path]:
    """With the lock held: every hidden entry of the cache folders belongs to a writer, and none is at work."""
    removed: list[Path] = []
    for folder in (models_dir(), gguf_dir()):
        try:
            entries = [e for e in folder.iterdir() if e.name.startswith(".")]
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
    return removed


# ----------------------------------------------------------------------------------------------------
# the conversion
# ----------------------------------------------------------------------------------------------------


def _convert_gguf(gguf: Path, out: Path, *, detect: bool) -> None:
    """Dequantise with transformers, save as plain safetensors + tokenizer, and prove the saved folder is the same
    model (``_conversion_problem``)."""
    folder, fname = str(gguf.parent), gguf.name
    family = CAUSAL
    try:
        with _no_gguf_progress_bar():
            if detect:
                family = detect_family(AutoConfig.from_pretrained(folder, gguf_file=fname))
            auto = family.auto_class(family.wants_head(with_lm_head=False))
            model = auto.from_pretrained(folder, gguf_file=fname, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    except Exception as exc:
        raise PtuneError(f"cannot convert GGUF file {gguf} ({one_line(exc, 160)})") from None
    # save_pretrained refuses GGUF-quantised models; the weights are already dequantised float32 here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    reloaded = auto.from_pretrained(out, dtype=torch.float32).eval()
    problem = _conversion_problem(model, reloaded, family.probe_inputs(_probe_ids(tokenizer)))
    if problem is not None:
        raise PtuneError(f"converting GGUF file {gguf} changed the model ({problem}; transformers bug?); not cached")


def _conversion_problem(converted: PreTrainedModel, reloaded: PreTrainedModel, inputs: dict[str, Any]) -> str | None:
    """What differs between the dequantised model and the folder it was saved to, or None when nothing does.

    Three checks, each exact where exactness is promised and no stricter: the weights the folder holds are the
    dequantised ones bit for bit (a save or load is a copy, so any difference is a bug); tied embeddings stay tied;
    and the logits of a probe agree to ``LOGIT_RTOL``, which catches what the weights cannot show (a config value
    saved or read wrongly, such as a rope base or a norm epsilon, moves logits by whole units). The logits are not
    compared bit for bit: oneDNN/MKL pick kernels and reduction orders per call (thread count, memory alignment), so
    two instances of the same fp32 weights may differ in the last bits, and a correct conversion then failed at random.
    """
    before, after = converted.state_dict(), reloaded.state_dict()
    unmatched = sorted(before.keys() ^ after.keys())
    if unmatched:
        name = unmatched[0]
        return f"tensor {name} is {'missing from' if name in before else 'new in'} the saved folder"
    for name, tensor in before.items():
        if tensor.dtype != after[name].dtype or not torch.equal(tensor, after[name]):
            return f"tensor {name} differs after saving"
    if bool(getattr(converted.config, "tie_word_embeddings", False)) and is_lm_model(converted):
        if reloaded.get_output_embeddings().weight is not reloaded.get_input_embeddings().weight:
            return "the output embedding is no longer tied to the input embedding"
    with torch.no_grad():
        expected, got = _probe_logits(converted, inputs), _probe_logits(reloaded, inputs)
    scale = max(expected.abs().max().item(), 1.0)
    diff = (expected - got).abs().max().item()
    if not diff <= LOGIT_RTOL * scale:  # NaN-safe: a NaN difference fails
        return f"probe logits differ by {diff:.3g}, more than fp32 rounding allows ({LOGIT_RTOL:g} x {scale:.3g})"
    return None


@contextlib.contextmanager
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


def _probe_logits(model: PreTrainedModel, inputs: dict[str, Any]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
