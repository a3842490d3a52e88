"""Run folders: a failed run removes only what it created, one writer at a time, resume refuses what it would
silently ignore, and a checkpoint's config is read as plain data (issue 12, cases 1-6)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from ptune import runfolder
from ptune.atomic import TMP_PREFIX
from ptune.errors import PtuneError

from .helpers import ptune_here
from .test_cli import csv_overrides, ptune
from .test_resume import _kill_at_step

# Passes validation; the tiny data (labels negative, positive) fails inside the run, after .hydra/ is written.
FAILING = "dataset.label_names=[negative]"


def _base(tiny_models, tiny_csv) -> list[str]:
    return csv_overrides(tiny_models, tiny_csv)


def _one_error_line(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptune: error:"), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock file's (it names its latest holder) and killed saves' temporaries (any
    start sweeps them)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.name != runfolder.LOCK_NAME
        and not any(part.startswith(TMP_PREFIX) for part in p.relative_to(folder).parts)
    }


def test_failed_run_keeps_an_existing_folder_and_its_files(tiny_models, tiny_csv, tmp_path):
    target = tmp_path / "x" / "d"
    target.mkdir(parents=True)
    (target / "f").write_text("user data")
    res = ptune("train", *_base(tiny_models, tiny_csv), FAILING, f"hydra.run.dir={target}", cwd=tmp_path)
    assert "unknown label" in _one_error_line(res)
    assert (target / "f").read_text() == "user data"
    assert sorted(p.name for p in target.iterdir()) == ["f"], "the run's own files are removed, nothing else"


def test_failed_run_in_the_current_folder_keeps_it(tiny_models, tiny_csv, tmp_path):
    work = tmp_path / "work"
    (work / ".git").mkdir(parents=True)
    (work / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (work / "notes.txt").write_text("mine")
    res = ptune("train", *_base(tiny_models, tiny_csv), FAILING, "hydra.run.dir=.", cwd=work)
    _one_error_line(res)
    assert sorted(p.name for p in work.iterdir()) == [".git", "notes.txt"]
    assert (work / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"


def test_failed_run_removes_the_folders_it_created(tiny_models, tiny_csv, tmp_path):
    (tmp_path / "keep").mkdir()
    res = ptune("train", *_base(tiny_models, tiny_csv), FAILING, "hydra.run.dir=keep/a/b/c", cwd=tmp_path)
    _one_error_line(res)
    assert (tmp_path / "keep").is_dir() and not any((tmp_path / "keep").iterdir())


@pytest.fixture()
def killed_run(tiny_models, tiny_csv, tmp_path) -> tuple[Path, list[str]]:
    """A run killed at step 3 of 40, before its first evaluation, with a resumable state."""
    run = tmp_path / "run"
    skip = ("trainer.max_steps", "trainer.eval")
    args = [a for a in _base(tiny_models, tiny_csv) if not a.startswith(skip)]
    args += ["trainer.max_steps=40", "trainer.eval_every=20", "trainer.save_every=1", "trainer.log_every=1"]
    assert _kill_at_step([*args, f"hydra.run.dir={run}"], tmp_path, 3)
    assert (run / "resume" / "state.json").is_file() and not (run / "checkpoint").exists()
    return run, args


def test_resume_with_a_bad_override_keeps_the_run(killed_run, tmp_path):
    run, args = killed_run
    before = _snapshot(run)
    res = ptune("train", *args, "trainer.resume=true", FAILING, f"hydra.run.dir={run}", cwd=tmp_path)
    _one_error_line(res)
    assert _snapshot(run) == before, "resume/ and .hydra/ are as they were"


def test_resume_refuses_settings_it_would_ignore(killed_run, tmp_path):
    run, args = killed_run
    before = _snapshot(run)
    res = ptune("train", *args, "trainer.resume=true", "trainer.lr=0.5", f"hydra.run.dir={run}", cwd=tmp_path)
    line = _one_error_line(res)
    assert "trainer.lr=0.5" in line and "saved" in line
    assert _snapshot(run) == before
    # a setting that takes effect on resume is accepted and said
    res = ptune(
        "train", *args, "trainer.resume=true", "trainer.max_steps=6", "trainer.eval_every=3",
        f"hydra.run.dir={run}", cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert re.search(r"resuming from step [1-3]; changed: trainer.eval_every, trainer.max_steps", res.stdout)
    assert json.loads((run / "results.json").read_text())["steps"] == 6
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 6, ".hydra/config.yaml records what the run did"


def test_resume_of_a_finished_run_changes_nothing(tiny_models, tiny_csv, tmp_path):
    run = tmp_path / "done"
    res = ptune("train", *_base(tiny_models, tiny_csv), f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    before = _snapshot(run)
    line = _one_error_line(ptune("train", "--resume", str(run), cwd=tmp_path))
    assert "is finished" in line
    line = _one_error_line(
        ptune("train", *_base(tiny_models, tiny_csv), "trainer.resume=true", f"hydra.run.dir={run}", cwd=tmp_path)
    )
    assert "is finished" in line
    # a new run (no resume) into a folder that holds a run is refused before anything is written
    line = _one_error_line(ptune("train", *_base(tiny_models, tiny_csv), f"hydra.run.dir={run}", cwd=tmp_path))
    assert "already holds a run" in line
    assert _snapshot(run) == before


def test_a_second_writer_is_refused_while_a_run_holds_the_folder(tiny_models, tiny_csv, killed_run, tmp_path):
    run, args = killed_run
    before = _snapshot(run)
    fd = os.open(run / runfolder.LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"pid 4242 on testhost, started now\n", 0)
    try:
        for cmd in (
            ["train", *args, "trainer.resume=true", f"hydra.run.dir={run}"],
            ["train", "--resume", str(run)],
        ):
            line = _one_error_line(ptune(*cmd, cwd=tmp_path))
            assert "in use by another ptune run" in line and "pid 4242" in line
    finally:
        os.close(fd)
    assert _snapshot(run) == before
    # released (the holder ended): the run resumes
    res = ptune("train", "--resume", str(run), cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_undo_of_a_start_refused_by_the_lock_leaves_the_live_runs_files(tmp_path):
    """A second ``ptune train --resume RUN`` that finds the lock held gets a PtuneError and undoes its start; what
    the live run wrote since the second one surveyed the folder (a first checkpoint, a save's temporary, a new
    .hydra/ file) is the live run's and must stay."""
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("trainer: {}\n")
    survey = runfolder.RunFolder.survey(tmp_path)  # the second start looks first ...
    fd = os.open(tmp_path / runfolder.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ... while the live run holds the folder and goes on writing
    try:
        (tmp_path / "checkpoint").mkdir()
        (tmp_path / "checkpoint" / "prompt.safetensors").write_bytes(b"weights")
        (tmp_path / f"{TMP_PREFIX}metrics.jsonl.abc").write_text("{}")
        (tmp_path / ".hydra" / "overrides.yaml").write_text("[]\n")
        with pytest.raises(PtuneError, match="in use by another ptune run"):
            runfolder.acquire(tmp_path)
        survey.undo()
        assert (tmp_path / "checkpoint" / "prompt.safetensors").read_bytes() == b"weights"
        assert (tmp_path / f"{TMP_PREFIX}metrics.jsonl.abc").is_file()
        assert (tmp_path / ".hydra" / "overrides.yaml").is_file()
    finally:
        os.close(fd)


def test_lock_is_exclusive_reentrant_and_released(tmp_path):
    runfolder.acquire(tmp_path)
    runfolder.acquire(tmp_path)  # the same process again: fine
    fd = os.open(tmp_path / runfolder.LOCK_NAME, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    runfolder.release(tmp_path)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once released
    os.close(fd)


def test_resume_sweeps_what_killed_saves_left(killed_run, tmp_path):
    run, _ = killed_run
    (run / f"{TMP_PREFIX}metrics.jsonl.abc").write_text("partial")
    (run / f"{TMP_PREFIX}checkpoint.xyz").mkdir()
    (run / ".metrics.jsonl.k2j3ab7x.tmp").write_text("partial")  # an older ptune's temporaries (tempfile names)
    (run / ".checkpoint.q1w2e3r4").mkdir()
    (run / ".checkpoint.notes").write_text("the user's")  # not a temporary's name: kept
    (run / "user.txt").write_text("kept")
    res = ptune("train", "--resume", str(run), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in run.iterdir())
    assert not [n for n in names if n.startswith((TMP_PREFIX, ".metrics.jsonl.", ".checkpoint.q1"))], names
    assert (run / "user.txt").read_text() == "kept"
    assert (run / ".checkpoint.notes").read_text() == "the user's"


def test_run_folder_that_cannot_be_written_is_one_line(tiny_models, tiny_csv, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    for target in ("afile", "afile/sub", "/proc/ptune-run"):
        args = ("train", *_base(tiny_models, tiny_csv), f"hydra.run.dir={target}")
        if target == "afile":  # one in a real process, the others in this one
            res = ptune(*args, cwd=tmp_path)
        else:
            res = ptune_here(*args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
        assert "hydra.run.dir=" in _one_error_line(res)
    assert (tmp_path / "afile").read_text() == "x"


@pytest.fixture(scope="module")
def finished_checkpoint(tiny_models, tmp_path_factory) -> Path:
    from .conftest import write_csv
    from .helpers import SENTENCES

    root = tmp_path_factory.mktemp("ckpt")
    rows = [(s, ["negative", "positive"][i % 2]) for i, s in enumerate(SENTENCES * 4)]
    csv = {"train": write_csv(root / "train.csv", rows), "dev": write_csv(root / "dev.csv", rows[:12])}
    res = ptune("train", *_base(tiny_models, csv), f"hydra.run.dir={root / 'run'}", cwd=root)
    assert res.returncode == 0, res.stderr
    return root / "run"


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / "checkpoint", dst / "checkpoint")
    return dst


def test_eval_never_replaces_an_eval_json_it_did_not_write(finished_checkpoint, tmp_path, capsys, monkeypatch):
    """A checkpoint/ copied into a folder of the user's: ptune eval prints its metrics, keeps the user's eval.json
    (or a link of that name) and says so in one line; an eval.json of its own it replaces."""
    run = _copy_run(finished_checkpoint, tmp_path / "r")
    mine = run / "eval.json"
    args = ("eval", str(run), f"dataset.dev_file={finished_checkpoint.parent / 'dev.csv'}")
    for content in ("my own notes", '{"accuracy": 1.0}', "[1, 2]"):
        mine.write_text(content)
        res = ptune_here(*args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
        assert "was not written by ptune eval" in _one_error_line(res)
        assert "accuracy=" in res.stdout and mine.read_text() == content
    mine.unlink()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    mine.symlink_to(elsewhere)
    assert "was not written" in _one_error_line(ptune_here(*args, cwd=tmp_path, capsys=capsys,
                                                          monkeypatch=monkeypatch))
    assert mine.is_symlink() and elsewhere.read_text() == "{}"
    mine.unlink()
    for _ in range(2):  # written, then replaced: it is ptune's own
        res = ptune_here(*args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
        assert res.returncode == 0, res.stderr
        assert json.loads(mine.read_text())["checkpoint"].endswith("checkpoint")


def test_checkpoint_config_is_not_interpolated(finished_checkpoint, tmp_path):
    run = _copy_run(finished_checkpoint, tmp_path / "r")
    cfg = run / "checkpoint" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("name: csv", "name: ${oc.env:SECRET_TOKEN}", 1))
    env_secret = "s3cr3t-value-123"
    os.environ["SECRET_TOKEN"] = env_secret
    try:
        res = ptune("eval", str(run), cwd=tmp_path)
    finally:
        del os.environ["SECRET_TOKEN"]
    line = _one_error_line(res)
    assert env_secret not in res.stderr + res.stdout
    assert "interpolation" in line


def test_checkpoint_config_alias_bomb_is_refused_fast(finished_checkpoint, tmp_path, capsys, monkeypatch):
    run = _copy_run(finished_checkpoint, tmp_path / "r")
    bomb = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    bomb += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    cfg = run / "checkpoint" / "config.yaml"
    cfg.write_text(cfg.read_text() + "\n".join(bomb) + "\n")
    t0 = time.perf_counter()
    line = _one_error_line(ptune_here("eval", str(run), cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch))
    assert "anchors/aliases" in line
    assert time.perf_counter() - t0 < 120  # refused while parsing events, never expanded (expanded: minutes)


def test_checkpoint_data_paths_are_not_followed(finished_checkpoint, tmp_path):
    run = _copy_run(finished_checkpoint, tmp_path / "r")
    cfg_path = run / "checkpoint" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    secret = tmp_path / "secret.csv"
    secret.write_text("text,label\nTOPSECRETLINE,negative\n")
    cfg["dataset"]["dev_file"] = str(secret)
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = ptune("eval", str(run), cwd=tmp_path)
    line = _one_error_line(res)
    assert "dev_file" in line and "does not follow data paths stored in a checkpoint" in line
    assert "TOPSECRETLINE" not in res.stderr + res.stdout
    # named by the user, the same file is used
    dev = finished_checkpoint.parent / "dev.csv"
    res = ptune("eval", str(run), f"dataset.dev_file={dev}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("trainer"), "no trainer"),
        (lambda d: d["method"].update(name=["x"]), "method.name must be a string"),
    ],
)
def test_malformed_checkpoint_config_is_one_line(finished_checkpoint, tmp_path, edit, expected, capsys, monkeypatch):
    run = _copy_run(finished_checkpoint, tmp_path / "r")
    cfg_path = run / "checkpoint" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert expected in _one_error_line(ptune_here("eval", str(run), cwd=tmp_path, capsys=capsys,
                                                  monkeypatch=monkeypatch))


@pytest.mark.parametrize("meta", ['{"label_names": "ab"}', "[1, 2]", "{" * 100000, '{"label_names": [NaN]}'])
def test_malformed_checkpoint_meta_is_one_line(finished_checkpoint, tmp_path, meta, capsys, monkeypatch):
    run = _copy_run(finished_checkpoint, tmp_path / "r")
    (run / "checkpoint" / "meta.json").write_text(meta)
    res = ptune_here("eval", str(run), cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert "meta.json" in _one_error_line(res)


def test_non_finite_checkpoint_tensors_are_refused(finished_checkpoint, tmp_path):
    from ptune.checkpoint import read_checkpoint

    run = _copy_run(finished_checkpoint, tmp_path / "r")
    weights = run / "checkpoint" / "prompt.safetensors"
    state = load_file(str(weights))
    key = next(iter(state))
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(PtuneError, match="NaN or Inf"):
        read_checkpoint(run / "checkpoint")


def test_eval_falls_back_to_the_checkpoint_a_killed_swap_left(finished_checkpoint, tmp_path):
    from ptune.checkpoint import find_checkpoint

    run = tmp_path / "r"
    run.mkdir()
    (finished_checkpoint / "checkpoint").rename(run / ".checkpoint.old")  # killed between the two renames
    try:
        assert find_checkpoint(run) == run / ".checkpoint.old"
    finally:
        (run / ".checkpoint.old").rename(finished_checkpoint / "checkpoint")


def test_non_finite_loss_message_is_true():
    from ptune.resume import LoopState
    from ptune.training import TrainerConfig, non_finite_loss

    tr = TrainerConfig()
    assert "no checkpoint had been saved yet" in non_finite_loss(float("nan"), 4, LoopState(step=3), tr)
    assert "step 2) is kept" in non_finite_loss(float("nan"), 4, LoopState(step=3, best_step=2), tr)
