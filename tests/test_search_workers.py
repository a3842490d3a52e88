"""`ptune search` with parallel workers on one study (ptune/commands/search_workers.py): real worker processes of
the tiny BERT on this machine, on SQLite and on Optuna's journal file; one worker SIGKILLed in the middle of its
trial; a plain search refused while workers are alive; a dead worker's trial found by its missing heartbeat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ptune import runfolder
from ptune.commands import search_workers as workers
from ptune.commands.search import open_study
from ptune.config import SearchConfig
from ptune.errors import PtuneError

from .helpers import run_cli
from .test_cli import ENV, csv_overrides
from .test_hostile import assert_one_line_error
from .test_hostile_safety import listing

TINY = ["trainer.eval_every=2", "trainer.save_every=0", "trainer.precision=fp32", "trainer.device=cpu"]


def _args(tiny_models, tiny_csv, tmp_path: Path, folder: Path, *search: str, steps: int = 2) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text("overrides: [dataset.validation=0.25]\nparams:\n"
                     "  trainer.lr: {type: float, low: 0.001, high: 0.1, log: true}\n"
                     "  method.prompt_length: {type: int, low: 2, high: 4}\n")
    base = [a for a in csv_overrides(tiny_models, tiny_csv) if not a.startswith("trainer.max_steps")]
    return [f"+hparams_search={space}", f"search.dir={folder}", "search.n_startup_trials=1", *search,
            *base, *TINY, f"trainer.max_steps={steps}"]


def _search(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ptune", "search", *args], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_workers_share_a_journal_study_without_collision(tiny_models, tiny_csv, tmp_path):
    """search.workers=2 on the journal: exactly n_trials trials (counted across the workers), each number and
    folder once, run by two different processes, trainer.num_threads=2 split into 1 + 1."""
    from optuna.trial import TrialState

    folder = tmp_path / "search"
    proc = _search(_args(tiny_models, tiny_csv, tmp_path, folder, "search.n_trials=4", "search.workers=2",
                         "search.storage=journal", "trainer.num_threads=2"), tmp_path)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert (folder / workers.JOURNAL).is_file() and not (folder / "optuna.db").exists()
    study = open_study(folder)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["run_dir"] for t in trials) == [f"trial_{i:03d}" for i in range(4)]
    assert sorted(p.name for p in folder.glob("trial_*")) == [f"trial_{i:03d}" for i in range(4)]
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both worker processes ran trials
    for t in trials:
        run = folder / t.user_attrs["run_dir"]
        assert (run / "results.json").is_file()
        assert "trainer.num_threads=1" in OmegaConf.load(run / ".hydra" / "overrides.yaml")
        assert OmegaConf.load(run / ".hydra" / "config.yaml").trainer.num_threads == 1
    assert "[w0] ptune search: trial" in out and "[w1] ptune search: trial" in out
    assert "4 complete, 0 pruned, 0 failed of 4 trial(s)" in (folder / "search.md").read_text()


def test_two_workers_stop_at_the_example_budget(tiny_models, tiny_csv, tmp_path):
    """search.max_examples is checked by every worker before it asks: once the study's finished trials have spent
    it, no worker starts another, so of 6 trials at most one per worker runs (each spends more than the budget)."""
    folder = tmp_path / "search"
    proc = _search(_args(tiny_models, tiny_csv, tmp_path, folder, "search.n_trials=6", "search.workers=2",
                         "search.max_examples=1", "search.pruner=none", "trainer.num_threads=2"), tmp_path)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    trials = open_study(folder).get_trials()
    assert 1 <= len(trials) <= 2, [t.number for t in trials]
    assert "search.max_examples=1 reached" in out
    assert f"of {len(trials)} trial(s)" in (folder / "search.md").read_text()


def _trial_pid(folder: Path, deadline: float) -> tuple[str, int]:
    """The first trial folder whose run lock a live worker holds, and that worker's pid."""
    while time.monotonic() < deadline:
        for run in sorted(folder.glob("trial_*")):
            holder = runfolder.holder_of(run)
            if holder and holder.startswith("pid "):
                return run.name, int(holder.split()[1])
        time.sleep(0.02)
    raise AssertionError("no worker ever held a trial folder")


def test_a_worker_killed_mid_trial_is_failed_and_retried_and_the_study_completes(tiny_models, tiny_csv, tmp_path):
    """SIGKILL one of two workers while it trains: the other one finds the trial silent past the grace period,
    fails it (FAILED in its folder), runs it again with the same values (search.retries=1), and finishes the study;
    the search ends with exit 0 and says which worker was killed."""
    from optuna.trial import TrialState

    folder = tmp_path / "search"
    proc = _search(_args(tiny_models, tiny_csv, tmp_path, folder, "search.n_trials=3", "search.workers=2",
                         "search.heartbeat_interval=1", "search.grace_period=3", "search.retries=1", steps=12),
                   tmp_path)
    try:
        name, pid = _trial_pid(folder, time.monotonic() + 200)
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "killed by SIGKILL" in err and "stopped sending heartbeats" in err
    trials = open_study(folder).get_trials()
    killed = next(t for t in trials if t.user_attrs["run_dir"] == name)
    assert killed.state == TrialState.FAIL
    assert "heartbeats" in (folder / name / "FAILED").read_text()
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed.number)  # Optuna's retry mark
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.user_attrs["run_dir"] != name
    # three trials counted: the killed one is replaced by its retry; every trial has its own folder
    assert sorted(t.state.name for t in trials if t is not killed) == ["COMPLETE"] * 3
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials) == 4


def test_sigterm_to_the_search_stops_every_worker_and_fails_their_trials(tiny_models, tiny_csv, tmp_path):
    """SIGTERM (or Ctrl-C) to a search with workers reaches each worker once: each tells its trial failed and
    ends, no worker outlives the search, which ends in one `interrupted` line (exit 2)."""
    from optuna.trial import TrialState

    folder = tmp_path / "search"
    proc = _search(_args(tiny_models, tiny_csv, tmp_path, folder, "search.n_trials=6", "search.workers=2",
                         steps=12), tmp_path)
    try:
        _, pid = _trial_pid(folder, time.monotonic() + 200)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=200)
    finally:
        proc.kill()
    assert proc.returncode == 2 and err.strip().splitlines()[-1] == "ptune: error: interrupted", err[-2000:]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker that was training is gone
    assert not workers.workers_alive(folder)
    trials = open_study(folder).get_trials()
    assert TrialState.RUNNING not in {t.state for t in trials}
    assert any(t.state == TrialState.FAIL for t in trials)


def test_a_silent_journal_trial_is_failed_and_retried(tmp_path):
    """The journal's heartbeat (Optuna's journal storage has none): a running trial whose last beat is older than
    the grace period is failed by the next worker to ask, FAILED goes into its folder, and its retry is queued."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    spec = SearchConfig(n_trials=2, storage="journal", heartbeat_interval=1, grace_period=5, retries=1,
                        params={"trainer.lr": {"type": "float", "low": 0.1, "high": 1.0}})
    study = optuna.create_study(study_name="ptune", storage=workers.make_storage(tmp_path, "journal", tmp_path / "x"))
    beat = workers.Heartbeat(study, 3600)
    dists = {"trainer.lr": FloatDistribution(0.1, 1.0)}
    alive = workers.next_trial(study, dists, spec, tmp_path, beat)
    dead = study.ask(dists)
    dead.set_user_attr("run_dir", "trial_001")
    (tmp_path / "trial_001").mkdir()
    study._storage.set_trial_system_attr(dead._trial_id, workers.HEARTBEAT, time.time() - 60)
    workers.fail_stale_trials(study, spec, tmp_path)
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {alive.number: TrialState.RUNNING, dead.number: TrialState.FAIL, 2: TrialState.WAITING}
    assert (tmp_path / "trial_001" / "FAILED").is_file()
    again = workers.next_trial(study, dists, spec, tmp_path, beat)  # the retry, with the dead trial's value
    assert again.number == 2 and again.params == dead.params
    beat.stop()


def test_a_plain_search_is_refused_while_workers_are_alive(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """A second, plain `ptune search` into a folder whose workers run would fail their running trials: refused in
    one line, the folder unchanged; the workers lock taken back, it starts."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "search"
    folder.mkdir()
    runfolder.mark(folder, "search")
    workers.become_worker(folder)  # a worker of another process, as far as the lock can tell
    before = listing(folder)
    try:
        code, out, err = run_cli(["search", *_args(tiny_models, tiny_csv, tmp_path, folder, "search.n_trials=1")],
                                 capsys)
    finally:
        workers.leave(folder)
    assert listing(folder) == before
    assert_one_line_error(code, out, err, "has live workers")
    code, out, err = run_cli(["search", *_args(tiny_models, tiny_csv, tmp_path, folder, "search.n_trials=1")],
                             capsys)
    assert code == 0, err


def test_a_database_url_holds_the_study_outside_the_folder(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """search.storage=<SQLAlchemy URL> (an RDB storage, here a SQLite file elsewhere): the study is named after
    the search folder (a database may hold many searches), search.yaml records it, `ptune report` finds it."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "search"
    url = runfolder.sqlite_url(tmp_path / "shared.db")
    code, out, err = run_cli(["search", *_args(tiny_models, tiny_csv, tmp_path, folder, "search.n_trials=1",
                                                f"search.storage={url}")], capsys)
    assert code == 0, err
    assert not (folder / "optuna.db").exists() and (tmp_path / "shared.db").is_file()
    study = open_study(folder)
    assert study.study_name == f"ptune:{folder}" and len(study.trials) == 1
    assert OmegaConf.load(folder / "search.yaml").study == study.study_name
    code, out, err = run_cli(["report", str(folder)], capsys)
    assert code == 0 and "Best trial 0" in (folder / "search.md").read_text(), err


def test_a_trial_folder_that_appeared_is_never_written_into(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """The trial folder is made with an exclusive mkdir: one that exists (another process's, made after the
    start-up check) fails that trial and stops, leaving the folder as it was."""
    from ptune.commands import search

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "search"
    (folder / "trial_000").mkdir(parents=True)
    (folder / "trial_000" / "mine.txt").write_text("not ptune's")
    runfolder.mark(folder, "search")
    monkeypatch.setattr(search, "check_trials_match_study", lambda *a, **k: None)  # the race: it appeared later
    code, out, err = run_cli(["search", *_args(tiny_models, tiny_csv, tmp_path, folder, "search.n_trials=1")],
                             capsys)
    assert_one_line_error(code, out, err, "already exists but the study has no trial 0")
    assert listing(folder / "trial_000") == {"mine.txt": b"not ptune's"}


@pytest.mark.parametrize(("argv", "needle"), [
    (["--worker"], "usage"),
    (["--worker", "{tmp}"], "nothing to join"),
    (["--worker", "{tmp}", "trainer.lr=0.1"], "only trainer.num_threads"),
    (["+hparams_search={tmp}/s.yaml", "search.storage=bogus"], "search.storage='bogus'"),
    (["+hparams_search={tmp}/s.yaml", "search.heartbeat_interval=120"], "must exceed"),
])
def test_worker_and_storage_usage_errors_are_one_line(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("params:\n  trainer.lr: {type: float, low: 0.001, high: 0.1}\n")
    before = listing(tmp_path)
    code, out, err = run_cli(["search", *(a.replace("{tmp}", str(tmp_path)) for a in argv)], capsys)
    assert_one_line_error(code, out, err, needle)
    assert listing(tmp_path) == before


def test_threads_split_and_journal_paths():
    assert workers.split_threads(2, 2) == [1, 1]
    assert workers.split_threads(7, 3) == [3, 2, 2]  # as many threads in all as one search
    assert workers.split_threads(1, 3) == [1, 1, 1]  # never none
    assert workers.journal_path(Path("d"), "journal") == Path("d") / workers.JOURNAL
    assert workers.journal_path(Path("d"), "journal:///shared/s.log") == Path("/shared/s.log")
    assert workers.journal_path(Path("d"), "postgresql://u@h/db") is None
    with pytest.raises(PtuneError, match="search.workers=0"):
        SearchConfig(workers=0)
