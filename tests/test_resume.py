"""Kill a training process with SIGKILL at random points, resume it, and get the uninterrupted result.

The kill lands wherever the child is just after it reported the step (a smoke test of the whole process);
tests/test_faults.py kills deterministically at every file-system step of each save instead. A child that hangs
is killed by a watchdog and fails the test instead of hanging the suite."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from .test_cli import ENV, csv_overrides, ptune

STEPS = 12
CHILD_TIMEOUT_S = 300  # one child trains 12 steps of a tiny model: seconds, even on a busy machine


def _args(tiny_models, tiny_csv_paths, run: Path) -> list[str]:
    skip = ("trainer.max_steps", "trainer.eval")
    base = [a for a in csv_overrides(tiny_models, tiny_csv_paths) if not a.startswith(skip)]
    return [
        *base, f"trainer.max_steps={STEPS}", "trainer.eval_every=4", "trainer.save_every=1", "trainer.log_every=1",
        "method.dropout=0.1", f"hydra.run.dir={run}",
    ]


def _check_files_parse(run: Path) -> None:
    for path in run.rglob("*"):
        if not path.is_file() or path.name.startswith(".") and path.suffix == ".tmp":
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(str(path))


def _kill_at_step(args: list[str], cwd: Path, step: int) -> bool:
    """Start training, SIGKILL it once it reports ``step``; False if it finished first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ptune", "train", *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    fired: list[bool] = []

    def expire() -> None:  # ends the loop below (EOF) if the child hangs
        fired.append(True)
        proc.kill()

    watchdog = threading.Timer(CHILD_TIMEOUT_S, expire)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith(f"step {step}:"):
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return True
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert not fired, f"the training child did not reach step {step} within {CHILD_TIMEOUT_S} s"
    return False


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_and_resume_reproduces_uninterrupted_run(tiny_models, tiny_csv, tmp_path, precision):
    """Under fp32 and under bf16 autocast forced on (precision=auto would pick one by the CPU): bit-identical."""
    straight = tmp_path / "straight"
    res = ptune("train", *_args(tiny_models, tiny_csv, straight), f"trainer.precision={precision}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    interrupted = tmp_path / "interrupted"
    rng = random.Random(1234)
    kills = sorted(rng.sample(range(1, STEPS), 3))
    args = [*_args(tiny_models, tiny_csv, interrupted), f"trainer.precision={precision}"]
    assert _kill_at_step(args, tmp_path, kills[0])
    _check_files_parse(interrupted)
    for step in kills[1:]:
        assert _kill_at_step([*args, "trainer.resume=true"], tmp_path, step)
        _check_files_parse(interrupted)
    res = ptune("train", "--resume", str(interrupted), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "resuming from step" in res.stdout
    _check_files_parse(interrupted)
    a = load_file(str(straight / "checkpoint" / "prompt.safetensors"))
    b = load_file(str(interrupted / "checkpoint" / "prompt.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    metrics = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"], m["accuracy"]) for m in metrics] == [
        (m["step"], m["loss"], m["accuracy"]) for m in resumed
    ]
    assert not (interrupted / "resume").exists(), "a finished run keeps no resumable state"


def test_resume_reads_keys_a_later_release_added_at_what_the_old_release_did(tmp_path):
    """A state saved before a key existed lacks it: read at its default (or, where the default changed what runs
    do, at the old behaviour), not refused as a changed setting. Failed before: any added key refused the resume."""
    from omegaconf import OmegaConf, open_dict

    from ptune import resume
    from ptune.config import compose as compose_with_hydra
    from ptune.errors import PtuneError

    def compose(overrides):  # the run's config, as train sees it: without Hydra's section
        cfg = compose_with_hydra(overrides)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    cfg = compose(["+experiment=cb_ptv2", "dataset.validation=0.2"])
    old = OmegaConf.to_container(resume._comparable(cfg))
    del old["trainer"]["class_weights"], old["trainer"]["loggers"], old["dataset"]["validation_stratify"]
    del old["method"]["dropout"]  # a method's own key: its tuner's config is the schema
    (tmp_path / resume.STATE_DIR).mkdir()
    (tmp_path / resume.STATE_DIR / resume.CONFIG).write_text(OmegaConf.to_yaml(old), encoding="utf-8")

    # validation_stratify's default (stratified) is not what the old release did (a random draw): refused, and
    # the line names the value that resumes the run as it was
    with pytest.raises(PtuneError, match=r"dataset.validation_stratify=True \(saved False\)") as err:
        resume.check_same_config(tmp_path, cfg)
    assert "class_weights" not in str(err.value) and "loggers" not in str(err.value)
    assert resume.check_same_config(tmp_path, compose([
        "+experiment=cb_ptv2", "dataset.validation=0.2", "dataset.validation_stratify=false",
    ])) == []
    # an added key set away from its default is a real change
    with pytest.raises(PtuneError, match=r"trainer.class_weights='balanced' \(saved 'none'\)"):
        resume.check_same_config(tmp_path, compose([
            "+experiment=cb_ptv2", "dataset.validation=0.2", "dataset.validation_stratify=false",
            "trainer.class_weights=balanced",
        ]))
