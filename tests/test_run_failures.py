"""Runs that fail inside the run (after Hydra wrote .hydra/): the run folder goes back to what it was, a resumed
run keeps what it had, a crash that is not a PtuneError is still one `ptune: error:` line (no Hydra
"HYDRA_FULL_ERROR" epilogue, no traceback), and two real ptune processes compete for a run folder's lock.

Each test names the mutation of ptune/runfolder.py or ptune/cli.py it kills (issue 30)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import write_csv
from .helpers import SENTENCES
from .test_cli import ENV, csv_overrides, ptune
from .test_resume import _kill_at_step
from .test_runfolder import FAILING, _one_error_line, _snapshot

# The training forward raises, as a library bug or an unforeseen input would: a subprocess runs the real CLI
# with PromptModel.forward replaced first (in-process, so nothing in ptune needs a test hook).
BROKEN_FORWARD = """
import sys
from ptune import prompt_model

def broken(self, *args, **kwargs):
    raise RuntimeError("broken on purpose\\nsecond line of the message")

prompt_model.PromptModel.forward = broken
from ptune.cli import main
main(sys.argv[1:])
"""


def _broken_forward(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BROKEN_FORWARD, *args], cwd=cwd, env=env or ENV, capture_output=True, text=True,
        timeout=600,
    )


def test_failing_override_fails_inside_the_run(tiny_models, tiny_csv, tmp_path):
    """FAILING (tests/test_runfolder.py) passes config validation and fails on the data, inside run_training: the
    undo tests reach RunFolder.undo (a probe raising in undo fails them)."""
    res = ptune("train", *csv_overrides(tiny_models, tiny_csv), FAILING, "hydra.run.dir=r", cwd=tmp_path)
    line = _one_error_line(res)
    assert "unknown label 'positive'" in line and str(tiny_csv["train"]) in line, line
    assert not (tmp_path / "r").exists()


def test_failed_run_keeps_an_existing_empty_folder(tiny_models, tiny_csv, tmp_path):
    """Kills `if not self.existed:` -> `if True:` in RunFolder.undo (a folder the user made is not removed)."""
    target = tmp_path / "mine"
    target.mkdir()
    res = ptune("train", *csv_overrides(tiny_models, tiny_csv), FAILING, f"hydra.run.dir={target}", cwd=tmp_path)
    _one_error_line(res)
    assert target.is_dir() and not any(target.iterdir()), "the user's empty folder stays, empty"


def test_failed_resume_keeps_the_runs_checkpoint_state_and_metrics(tiny_models, tmp_path):
    """Kills dropping `if entry.name in self.entries_before: continue` in RunFolder.undo: a `ptune train --resume`
    that fails inside the run (its dev file now holds a label the run does not know) keeps checkpoint/, resume/
    and metrics.jsonl as they were."""
    rows = [(s, ["negative", "positive"][i % 2]) for i, s in enumerate(SENTENCES * 4)]
    csv = {"train": write_csv(tmp_path / "train.csv", rows), "dev": write_csv(tmp_path / "dev.csv", rows[:12])}
    run = tmp_path / "run"
    skip = ("trainer.max_steps", "trainer.eval")
    args = [a for a in csv_overrides(tiny_models, csv) if not a.startswith(skip)]
    args += ["trainer.max_steps=40", "trainer.eval_every=2", "trainer.save_every=1", "trainer.log_every=1"]
    assert _kill_at_step([*args, f"hydra.run.dir={run}"], tmp_path, 3)
    for name in ("checkpoint", "resume", "metrics.jsonl", ".hydra"):
        assert (run / name).exists(), name
    before = _snapshot(run)
    write_csv(csv["dev"], [("a new kind of row", "neutral")])
    line = _one_error_line(ptune("train", "--resume", str(run), cwd=tmp_path))
    assert "unknown label 'neutral'" in line, line
    assert _snapshot(run) == before, "the run's files are as they were"


def test_crash_in_the_forward_is_one_line_and_undone(tiny_models, tiny_csv, tmp_path):
    """Issue 30, item 5: an error that is not a PtuneError (here the training forward raises) ends in one
    `ptune: error:` line naming it, exit 1, and the run folder it created is removed; HYDRA_FULL_ERROR=1 still
    shows the traceback."""
    args = ["train", *csv_overrides(tiny_models, tiny_csv), "hydra.run.dir=crash"]
    res = _broken_forward(*args, cwd=tmp_path)
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptune: error:"), res.stderr
    assert "RuntimeError: broken on purpose" in lines[0] and "second line" not in lines[0]
    assert "Traceback" not in res.stderr and "for a complete stack trace" not in res.stderr
    assert not (tmp_path / "crash").exists(), "the failed run's folder is removed"
    full = _broken_forward(*args, cwd=tmp_path, env={**ENV, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "broken on purpose" in full.stderr


def test_crash_of_a_resumed_run_is_one_line_and_keeps_the_run(tiny_models, tiny_csv, tmp_path):
    run = tmp_path / "run"
    skip = ("trainer.max_steps", "trainer.eval")
    args = [a for a in csv_overrides(tiny_models, tiny_csv) if not a.startswith(skip)]
    args += ["trainer.max_steps=40", "trainer.eval_every=20", "trainer.save_every=1", "trainer.log_every=1"]
    assert _kill_at_step([*args, f"hydra.run.dir={run}"], tmp_path, 3)
    before = _snapshot(run)
    res = _broken_forward("train", "--resume", str(run), cwd=tmp_path)
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "RuntimeError: broken on purpose" in lines[0], res.stderr
    assert _snapshot(run) == before


@pytest.mark.parametrize("second", ["--resume", "trainer.resume=true"])
def test_two_ptune_processes_compete_for_the_lock(tiny_models, tiny_csv, tmp_path, second):
    """Kills LOCK_EX -> LOCK_SH in runfolder.acquire: while one real ptune run trains in a folder, a second ptune
    process resuming the same folder is refused in one line naming the first one's pid, and changes nothing."""
    run = tmp_path / "run"
    skip = ("trainer.max_steps", "trainer.eval", "trainer.save")
    args = [a for a in csv_overrides(tiny_models, tiny_csv) if not a.startswith(skip)]
    # A long run that writes nothing while it trains (no evaluation or save before step 100000).
    args += ["trainer.max_steps=100000", "trainer.eval_every=100000", "trainer.save_every=0", "trainer.log_every=1"]
    first = subprocess.Popen(
        [sys.executable, "-m", "ptune", "train", *args, f"hydra.run.dir={run}"], cwd=tmp_path, env=ENV,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    watchdog = threading.Timer(300, first.kill)
    watchdog.start()
    try:
        assert first.stdout is not None
        for line in first.stdout:
            if line.startswith("step 1:"):
                break
        assert first.poll() is None, "the first run ended before the second one started"
        before = _snapshot(run)
        cmd = ["train", "--resume", str(run)] if second == "--resume" else [
            "train", *args, "trainer.resume=true", f"hydra.run.dir={run}"]
        try:  # refused at once; a second process let in would train for as long as the first one
            res = subprocess.run([sys.executable, "-m", "ptune", *cmd], cwd=tmp_path, env=ENV, capture_output=True,
                                 text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the second ptune process was let into the locked run folder")
        line = _one_error_line(res)
        assert "in use by another ptune run" in line and f"pid {first.pid} " in line, line
        assert first.poll() is None, "the first run still trains"
        assert _snapshot(run) == before
    finally:
        watchdog.cancel()
        first.kill()
        first.wait(timeout=60)
