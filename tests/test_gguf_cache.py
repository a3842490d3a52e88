"""The GGUF cache's writer lock: leftovers of killed conversions are swept at the next start, live ones are kept.

A killed conversion leaves a ~0.5 GB temporary folder in the model cache. Converters hold an OS file lock, which the
kernel drops when the process dies, so the next process that gets the lock knows every temporary is a leftover.
These tests use a fake conversion (two small files) instead of a real GGUF model.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptune.atomic import TMP_PREFIX
from ptune.backbone import cache_base
from ptune.backbone import gguf as gguf_mod

SHA = "ab" * 32
FINAL_NAME = f"m-{SHA[:12]}"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that writes what makes a cache folder complete, in microseconds."""

    def convert(src: Path, out: Path, *, detect: bool) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(gguf_mod, "_convert_gguf", convert)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really gguf")
    return gguf


def _leftovers() -> list[Path]:
    """What killed writers leave: a conversion's temp folder (new and pre-lock naming), a swap's .old folder, an
    assembly's temp file."""
    models, ggufs = gguf_mod.models_dir(), gguf_mod.gguf_dir()
    made = [
        models / f"{TMP_PREFIX}{FINAL_NAME}.k1ll3d_1",
        models / ".m-tmp-k1ll3d_2",
        models / f".{FINAL_NAME}.old",
    ]
    for folder in made:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half written")
    ggufs.mkdir(parents=True)
    part = ggufs / f"{TMP_PREFIX}model.gguf.k1ll3d_3"
    part.write_bytes(b"half assembled")
    return [*made, part]


@contextlib.contextmanager
def _hold_lock() -> Iterator[None]:
    """Hold the writer lock as a live converter in another process would."""
    cache_base().mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_base() / gguf_mod.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


def test_conversion_sweeps_leftovers_and_a_stale_lock_file(source: Path, fake_convert: None) -> None:
    left = _leftovers()
    (cache_base() / gguf_mod.LOCK_NAME).write_text("pid 999999\n")  # its process died: nobody holds the lock
    final = gguf_mod.gguf_cache(source, "m", SHA)
    assert gguf_mod.cache_complete(final) and final.name == FINAL_NAME
    assert [p for p in left if p.exists()] == []
    assert sorted(p.name for p in gguf_mod.models_dir().iterdir()) == [FINAL_NAME]


def test_warm_lookup_sweeps_leftovers(source: Path, fake_convert: None) -> None:
    final = gguf_mod.gguf_cache(source, "m", SHA)
    left = _leftovers()
    assert gguf_mod.cached_folder("m", SHA) == final
    assert [p for p in left if p.exists()] == []


def test_temporaries_of_a_live_conversion_are_kept(source: Path, fake_convert: None) -> None:
    left = _leftovers()
    with _hold_lock():
        assert gguf_mod.cached_folder("m", SHA) is None  # lookup while another process converts
        assert gguf_mod.sweep_leftovers() == []
        assert all(p.exists() for p in left)


def test_second_converter_waits_then_sweeps(source: Path, fake_convert: None) -> None:
    left = _leftovers()
    done: list[Path] = []
    waiter = threading.Thread(target=lambda: done.append(gguf_mod.gguf_cache(source, "m", SHA)), daemon=True)
    with _hold_lock():
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not done  # waits for the holder instead of converting beside it
        assert all(p.exists() for p in left)
    waiter.join(timeout=30)  # the holder has ended
    assert done and gguf_mod.cache_complete(done[0])
    assert [p for p in left if p.exists()] == []


_KILLED_CONVERTER = """
import sys, time
from pathlib import Path
from ptune.backbone import gguf

def convert(src, out, *, detect):
    (out / "model.safetensors").write_bytes(b"x" * 4096)
    print(out, flush=True)
    time.sleep(600)

gguf._convert_gguf = convert
gguf.gguf_cache(Path(sys.argv[1]), "m", sys.argv[2])
"""


def test_kill_9_mid_conversion_leaves_nothing_after_next_lookup(source: Path) -> None:
    env = {**os.environ, "PTUNE_CACHE": str(cache_base())}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CONVERTER, str(source), SHA], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        tmp = Path(proc.stdout.readline().strip())  # the converter is inside its temp folder now
        assert tmp.name.startswith(TMP_PREFIX) and tmp.is_dir()
        assert gguf_mod.sweep_leftovers() == [] and tmp.is_dir()  # alive: its folder is not touched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert gguf_mod.cached_folder("m", SHA) is None
    assert not tmp.exists()
    assert list(gguf_mod.models_dir().iterdir()) == []
