"""Deterministic fault injection into ptune's atomic writes: the checkpoint save, the resume-state swap, metrics /
results files and the sweep report are replayed once per file-system step, with that step failing (an OSError, as
from a full disk) or the process dying there (nothing after it runs, cleanup handlers included, as under kill -9).
Every time, a reader finds the complete old version or the complete new one, and the next start cleans up and
writes again. The "killed between the two renames" state of a folder swap is also run end to end: a resumed
training reproduces the uninterrupted run, and ``ptune eval`` reads the previous checkpoint.

No production seam: the steps are counted by wrapping the functions ptune's atomic writes call (``os``, ``shutil``
and ``tempfile`` as ``ptune.atomic`` sees them, ``pathlib.Path`` writes, safetensors' ``save_file`` in the
checkpoint and resume modules), only while the operation under test runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import random
import shutil
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ptune import atomic, checkpoint, report, resume, runfolder
from ptune.atomic import TMP_PREFIX, sweep_temporaries
from ptune.checkpoint import find_checkpoint, read_checkpoint, save_checkpoint
from ptune.errors import PtuneError
from ptune.resume import LoopState

from .helpers import LABELS, make_cfg, make_task
from .test_report import fake_run


class Killed(BaseException):
    """The process died at this step: it runs nothing more (every later file-system step is refused too)."""


class Faults:
    """Counts file-system steps; at step ``at`` fails with an OSError (``mode="fail"``) or dies (``"kill"``)."""

    def __init__(self, at: int | None = None, mode: str = "kill"):
        self.at, self.mode = at, mode
        self.steps: list[str] = []
        self.dead = False

    def wrap(self, name: str, fn: Callable) -> Callable:
        def step(*args, **kwargs):
            shown = [a for a in args[:2] if isinstance(a, Path) or isinstance(a, str) and "\n" not in a[:80]]
            label = name + "(" + ", ".join(Path(str(a)).name for a in shown) + ")"
            if self.dead:
                raise Killed(f"{label} after death")
            index = len(self.steps)
            self.steps.append(label)
            if index == self.at:
                if self.mode == "kill":
                    self.dead = True
                    torn_write(name, fn, args, kwargs)
                    raise Killed(label)
                if kwargs.get("ignore_errors"):  # rmtree(..., ignore_errors=True) swallows its failure
                    return None
                raise OSError(errno.EIO, f"injected failure at {label}")
            return fn(*args, **kwargs)

        return step


def torn_write(name: str, fn: Callable, args, kwargs) -> None:
    """What a kill in the middle of a file write leaves: the file's first half (a plain write_text/write_bytes or
    safetensors' save_file over the target would leave it torn; ptune's writes go to temporaries)."""
    if name in ("Path.write_text", "Path.write_bytes"):
        path, data = args[0], args[1]
        fn(path, data[: len(data) // 2], *args[2:], **kwargs)
    elif name == "save_file":
        fn(*args, **kwargs)
        target = Path(str(args[1]))
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


OS_STEPS = ("replace", "rename", "fsync", "chmod", "fdopen", "unlink", "remove", "mkdir", "makedirs", "rmdir")
PATH_STEPS = ("write_text", "write_bytes", "unlink", "mkdir", "rename", "replace", "touch", "rmdir", "chmod")


@contextlib.contextmanager
def injected(faults: Faults) -> Iterator[Faults]:
    """Route the file-system steps of ptune's atomic writes through ``faults`` while the block runs."""

    def proxy(module, names):
        ns = types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
        for n in names:
            setattr(ns, n, faults.wrap(f"{module.__name__}.{n}", getattr(module, n)))
        return ns

    saved_modules = {name: getattr(atomic, name) for name in ("os", "shutil", "tempfile")}
    saved_path = {n: getattr(pathlib.Path, n) for n in PATH_STEPS}
    saved_save = {m: m.save_file for m in (checkpoint, resume)}
    atomic.os = proxy(os, OS_STEPS)
    atomic.shutil = proxy(shutil, ("rmtree", "move", "copytree"))
    atomic.tempfile = proxy(tempfile, ("mkstemp", "mkdtemp"))
    for n, fn in saved_path.items():
        setattr(pathlib.Path, n, faults.wrap(f"Path.{n}", fn))
    for m, fn in saved_save.items():
        m.save_file = faults.wrap("save_file", fn)
    try:
        yield faults
    finally:
        for name, module in saved_modules.items():
            setattr(atomic, name, module)
        for n, fn in saved_path.items():
            setattr(pathlib.Path, n, fn)
        for m, fn in saved_save.items():
            m.save_file = fn


def replay(operation: Callable[[], object], prepare: Callable[[], None], check: Callable[[str, bool], None]):
    """Run ``operation`` once cleanly to count its steps, then once per (step, mode) after ``prepare``, and call
    ``check(label, completed)``: ``completed`` says whether the write took effect (a reader must see the new
    version) or not (the old one). Returns the clean run's steps."""
    prepare()
    with injected(Faults()) as clean:
        operation()
    publish = max(i for i, s in enumerate(clean.steps) if ".replace(" in s)  # the rename that publishes
    assert len(clean.steps) >= 4, clean.steps
    for mode in ("kill", "fail"):
        for at, name in enumerate(clean.steps):
            prepare()
            raised = False
            with injected(Faults(at, mode)):
                try:
                    operation()
                except (Killed, OSError):
                    raised = True
            completed = not raised if mode == "fail" else at > publish
            check(f"{mode} at step {at} {name}", completed)
    return clean.steps


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX))


# ------------------------------------------------------------------------------------------ checkpoint save


@pytest.fixture(scope="module")
def task_cfg(tiny_models):
    cfg = make_cfg(tiny_models["bert"], "soft_prompt", prompt_length=2)
    cfg.dataset.label_names = LABELS
    return make_task(cfg), cfg


def _save_tagged(task, cfg, directory: Path, tag: float) -> None:
    with torch.no_grad():
        for p in task.model.trainable_parameters():
            p.fill_(tag)
    cfg.experiment_name = f"tag{tag}"
    save_checkpoint(directory, task.model, cfg, {"label_names": LABELS, "tag": tag})


def _checkpoint_tag(run: Path) -> float | None:
    """The tag of the one complete checkpoint a reader finds (weights, config and meta agree), None if none."""
    try:
        folder = find_checkpoint(run)
    except PtuneError:
        return None
    cfg, meta, state = read_checkpoint(folder)
    tag = meta["tag"]
    assert cfg.experiment_name == f"tag{tag}"
    prompt = [t for k, t in state.items() if k.startswith("method.")]
    assert prompt and all(bool((t == tag).all()) for t in prompt), "weights of another version"
    return tag


def test_checkpoint_save_survives_a_failure_or_kill_at_every_step(task_cfg, tmp_path):
    task, cfg = task_cfg
    run = tmp_path / "run"

    def prepare():
        shutil.rmtree(run, ignore_errors=True)
        _save_tagged(task, cfg, run / "checkpoint", 1.0)

    def check(label, completed):
        assert _checkpoint_tag(run) == (2.0 if completed else 1.0), label
        assert not label.startswith("fail") or not _temporaries(run), label  # a failed save cleans up at once
        sweep_temporaries(run)  # the next start (runfolder.acquire)
        _save_tagged(task, cfg, run / "checkpoint", 3.0)  # the next save works and cleans up
        assert _checkpoint_tag(run) == 3.0, label
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint"], label

    steps = replay(lambda: _save_tagged(task, cfg, run / "checkpoint", 2.0), prepare, check)
    assert sum(".replace(" in s for s in steps) == 2  # old version aside, new version in


def test_first_checkpoint_save_leaves_nothing_or_the_whole_checkpoint(task_cfg, tmp_path):
    task, cfg = task_cfg
    run = tmp_path / "run"

    def check(label, completed):
        assert _checkpoint_tag(run) == (2.0 if completed else None), label
        sweep_temporaries(run)
        assert [p.name for p in run.iterdir()] in ([], ["checkpoint"]), label

    replay(
        lambda: _save_tagged(task, cfg, run / "checkpoint", 2.0),
        lambda: shutil.rmtree(run, ignore_errors=True) or run.mkdir(),
        check,
    )


def test_eval_falls_back_to_the_previous_checkpoint_after_a_kill_between_the_renames(task_cfg, tiny_csv, tmp_path):
    from ptune.inference import evaluate_checkpoint

    task, cfg = task_cfg
    run = tmp_path / "run"
    _save_tagged(task, cfg, run / "checkpoint", 0.25)
    reference = evaluate_checkpoint(run, [f"dataset.dev_file={tiny_csv['dev']}"])
    second_rename = 1  # os.replace calls: checkpoint -> .checkpoint.old, then the new folder -> checkpoint
    faults = Faults()
    faults.wrap = _kill_at_nth_replace(faults, second_rename)
    with injected(faults), pytest.raises(Killed):
        _save_tagged(task, cfg, run / "checkpoint", 0.5)
    assert not (run / "checkpoint").exists() and (run / ".checkpoint.old").is_dir()
    assert find_checkpoint(run) == run / ".checkpoint.old"
    again = evaluate_checkpoint(run, [f"dataset.dev_file={tiny_csv['dev']}"])
    assert again["checkpoint"].endswith(".checkpoint.old")
    assert (again["accuracy"], again["macro_f1"]) == (reference["accuracy"], reference["macro_f1"])
    assert json.loads((run / "eval.json").read_text())["accuracy"] == reference["accuracy"]


def _kill_at_nth_replace(faults: Faults, n: int):
    """A ``Faults.wrap`` that kills at the ``n``-th (0-based) ``os.replace`` and counts nothing else."""
    plain = Faults.wrap.__get__(faults)
    seen = [0]

    def wrap(name, fn):
        if not name.endswith("os.replace"):
            return plain(name, fn)

        def step(*args, **kwargs):
            if seen[0] == n and not faults.dead:
                faults.dead = True
                raise Killed(name)
            seen[0] += 1
            return plain(name, fn)(*args, **kwargs)

        return step

    return wrap


# ------------------------------------------------------------------------------------------ resume-state swap


def _resume_parts(task):
    params = task.model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched, torch.amp.GradScaler("cuda", enabled=False)


def _save_state_at(task, cfg, run: Path, step: int) -> None:
    opt, sched, scaler = _resume_parts(task)
    with torch.no_grad():
        for p in task.model.trainable_parameters():
            p.fill_(float(step))
    resume.save_state(run, task.model, opt, sched, scaler, random.Random(step), LoopState(step=step), cfg)


def _loaded_step(task, cfg, run: Path) -> int | None:
    if not resume.has_state(run):
        return None
    assert resume.check_same_config(run, cfg) == []
    opt, sched, scaler = _resume_parts(task)
    with torch.no_grad():
        for p in task.model.trainable_parameters():
            p.fill_(-1.0)
    loop = resume.load_state(run, task.model, opt, sched, scaler, random.Random())
    assert all(bool((p == loop.step).all()) for p in task.model.trainable_parameters()), "mixed state"
    return loop.step


def test_resume_swap_survives_a_failure_or_kill_at_every_step(task_cfg, tmp_path):
    task, cfg = task_cfg
    run = tmp_path / "run"

    def prepare():
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        _save_state_at(task, cfg, run, 1)

    def check(label, completed):
        assert _loaded_step(task, cfg, run) == (2 if completed else 1), label
        assert not label.startswith("fail") or not _temporaries(run), label
        sweep_temporaries(run)
        _save_state_at(task, cfg, run, 3)
        assert _loaded_step(task, cfg, run) == 3, label
        assert sorted(p.name for p in run.iterdir()) == ["resume"], label

    replay(lambda: _save_state_at(task, cfg, run, 2), prepare, check)


def test_training_killed_between_the_two_renames_of_the_resume_swap_resumes_exactly(tiny_models, tiny_csv, tmp_path,
                                                                                     capsys):
    from ptune.config import compose
    from ptune.training import run_training

    from .test_cli import csv_overrides

    def cfg(*extra):
        c = compose([
            *csv_overrides(tiny_models, tiny_csv), "trainer.max_steps=4", "trainer.eval_every=2",
            "trainer.save_every=1", "trainer.precision=fp32", "trainer.device=cpu", "method.dropout=0.1", *extra,
        ])  # fmt: skip
        OmegaConf.set_struct(c, False)
        del c["hydra"]
        return c

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_training(cfg(), straight)
    # saves at steps 1, 2, 3: the resume folder's renames are tmp->resume (1), resume->.old + tmp->resume (2), then
    # resume->.old (3) and the kill before step 3's tmp->resume
    faults = Faults()
    plain = Faults.wrap.__get__(faults)
    renames = []

    def wrap(name, fn):
        inner = plain(name, fn)
        if not name.endswith("os.replace"):
            return inner

        def step(src, dst, *a, **k):
            if Path(dst).name == "resume":
                renames.append(Path(dst).name)
                if len(renames) == 3:
                    faults.dead = True
                    raise Killed("between the two renames of step 3's resume swap")
            return inner(src, dst, *a, **k)

        return step

    faults.wrap = wrap
    with injected(faults), pytest.raises(Killed):
        run_training(cfg(), killed)
    runfolder.release(killed)  # the kernel drops a dead process's lock
    assert not (killed / "resume").exists() and (killed / ".resume.old" / "state.json").is_file()
    assert json.loads((killed / ".resume.old" / "state.json").read_text())["loop"]["step"] == 2
    assert _temporaries(killed), "the killed swap left its new folder behind"

    capsys.readouterr()
    results = run_training(cfg("trainer.resume=true"), killed)
    assert "resuming from step 2" in capsys.readouterr().out  # from .resume.old, not from scratch
    assert results["steps"] == 4 and not _temporaries(killed)
    assert not (killed / "resume").exists() and not (killed / ".resume.old").exists()
    a = load_file(str(straight / "checkpoint" / "prompt.safetensors"))
    b = load_file(str(killed / "checkpoint" / "prompt.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def curve(run):
        return [(m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert curve(straight) == curve(killed) and [s for s, _ in curve(killed)] == [2, 4]


# ------------------------------------------------------------------------------------------ metrics, results, report


@pytest.mark.parametrize(
    "name,write",
    [
        ("metrics.jsonl", lambda p, v: atomic.atomic_write_text(p, "".join(json.dumps({"step": s}) + "\n" for s in v))),
        ("results.json", lambda p, v: atomic.atomic_write_json(p, {"steps": v})),
    ],
)
def test_run_files_survive_a_failure_or_kill_at_every_step(tmp_path, name, write):
    path = tmp_path / name
    old, new = [1, 2], [1, 2, 3]

    def prepare():
        for p in tmp_path.iterdir():
            p.unlink()
        write(path, old)

    def check(label, completed):
        text = path.read_text()
        expected = tmp_path / "expected"
        write(expected, new if completed else old)
        assert text == expected.read_text(), label
        expected.unlink()
        assert not label.startswith("fail") or not _temporaries(tmp_path), label
        sweep_temporaries(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == [name], label

    steps = replay(lambda: write(path, new), prepare, check)
    assert any("fsync" in s for s in steps)  # flushed to disk before the rename publishes it


def test_sweep_report_survives_a_failure_or_kill_at_every_step(tmp_path, monkeypatch):
    # summary.png through the same atomic write, without drawing it (matplotlib would take most of the time)
    png = b"\x89PNG\r\n\x1a\nMatplotlib "  # what ptune report recognises as its own summary.png
    monkeypatch.setattr(report, "plot",
                        lambda path, keys, rows: atomic.atomic_write_bytes(path, png + repr(rows).encode()))
    sweep = tmp_path / "sweep"
    names = ("summary.csv", "summary.md", "summary.png")
    old = {"summary.csv": b"metric,n_runs,n_failed,seeds,runs\nold\n", "summary.md": b"# Sweep report: old\n",
           "summary.png": png + b"old"}  # an earlier report of ptune's (it never replaces a user's summary.*)

    def prepare():
        shutil.rmtree(sweep, ignore_errors=True)
        for i, seed in enumerate((0, 1)):
            fake_run(sweep / str(i), [f"trainer.seed={seed}"], best_metric=0.5 + i / 10)
        for n in names:
            (sweep / n).write_bytes(old[n])

    prepare()
    report.write_report(sweep, print_it=False)
    new = {n: (sweep / n).read_bytes() for n in names}

    def check(label, completed):
        got = {n: (sweep / n).read_bytes() for n in names}
        # each file is whole: the old report or the new one (files written before the failure are new)
        assert all(got[n] in (old[n], new[n]) for n in names), label
        if completed:
            assert got == new, label
        assert not label.startswith("fail") or not _temporaries(sweep), label
        sweep_temporaries(sweep)
        assert not _temporaries(sweep), label
        report.write_report(sweep, print_it=False)
        assert {n: (sweep / n).read_bytes() for n in names} == new, label

    replay(lambda: report.write_report(sweep, print_it=False), prepare, check)
