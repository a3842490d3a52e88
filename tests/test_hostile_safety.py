"""Never destroy what ptune did not create (issue 31): every command that writes (search, multirun, export,
predict, report, the trackers, a failed or interrupted run) leaves a user's folder exactly as it was, byte for byte,
and says why in one `ptune: error:` line (exit 2). Each test lists the user's folder (names and bytes) before and
after the command, through the real CLI run in-process."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ptune import runfolder

from .helpers import run_cli
from .test_cli import csv_overrides
from .test_hostile import assert_one_line_error

TINY = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=0", "trainer.precision=fp32",
        "trainer.device=cpu"]
NAN = "trainer.lr=1e30"  # the loss is NaN at step 2, before any checkpoint (see test_training_loop)


def listing(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: a file's bytes, '<dir>' for a folder, the target of a link."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "<dir>" if p.is_dir() else p.read_bytes()
    return out


def user_folder(root: Path, files: dict[str, str | None]) -> Path:
    """A folder of the user's: ``files`` maps relative paths to text, None for an (empty) folder."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        path = root / rel
        if text is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return root


def train_args(tiny_models, tiny_csv, *extra: str) -> list[str]:
    return [*csv_overrides(tiny_models, tiny_csv), *TINY, *extra]


# ------------------------------------------------------------------------------------------------ train
USER_ENTRIES = {
    # a user's entry where a run writes one of its outputs: (files of the user's folder, needle)
    "train_log.csv": ({"train_log.csv": "step,loss,lr\n1,0.5,0.1\n", "notes.txt": "mine"}, "train_log.csv"),
    "tensorboard/": ({"tensorboard/events.out.tfevents.mine": "my events"}, "tensorboard"),
    ".hydra/config.yaml": ({".hydra/config.yaml": "my: app\n"}, ".hydra"),
    "a file named tensorboard": ({"tensorboard": "not a folder"}, "tensorboard"),
    "a folder named train_log.csv": ({"train_log.csv/keep.txt": "mine"}, "train_log.csv"),
    "mlflow.db of the user's": ({"mlflow.db": "my own database"}, "mlflow.db"),
}


@pytest.mark.parametrize("case", list(USER_ENTRIES))
def test_run_never_replaces_a_users_output_name(case, tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """Item 5 and the tracebacks of a user file or folder where tensorboard/ or train_log.csv go: refused before
    anything is written, the folder byte for byte as it was."""
    monkeypatch.chdir(tmp_path)
    files, needle = USER_ENTRIES[case]
    folder = user_folder(tmp_path / "mine", files)
    before = listing(folder)
    loggers = "[csv,tensorboard,mlflow]" if "mlflow" in case else "[csv,tensorboard]"
    args = train_args(tiny_models, tiny_csv, NAN, f"trainer.loggers={loggers}", f"hydra.run.dir={folder}")
    code, out, err = run_cli(["train", *args], capsys)
    assert listing(folder) == before
    assert_one_line_error(code, out, err, needle)


def test_failed_run_removes_the_mlflow_store_it_created(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """Item 5: a run that fails before its first checkpoint (NaN) in a folder of the user's leaves the folder as it
    was: the mlflow.db (and mlartifacts/) the run created go too."""
    monkeypatch.chdir(tmp_path)
    folder = user_folder(tmp_path / "mine", {"notes.txt": "mine", "data/train.csv": "x"})
    before = listing(folder)
    args = train_args(tiny_models, tiny_csv, NAN, "trainer.loggers=[csv,tensorboard,mlflow]",
                      f"hydra.run.dir={folder}")
    code, out, err = run_cli(["train", *args], capsys)
    assert listing(folder) == before
    assert_one_line_error(code, out, err, "loss became nan")


def test_bad_mlflow_uri_is_one_line(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = user_folder(tmp_path / "mine", {"notes.txt": "mine"})
    before = listing(folder)
    args = train_args(tiny_models, tiny_csv, "trainer.loggers=[mlflow]", "trainer.mlflow_uri=bogus://nowhere",
                      f"hydra.run.dir={folder}")
    code, out, err = run_cli(["train", *args], capsys)
    assert listing(folder) == before
    assert_one_line_error(code, out, err, "trainer.mlflow_uri='bogus://nowhere'")


def _interrupt_at_first_step(monkeypatch) -> None:
    from ptune import training as train

    def interrupted(run, loop):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_step", interrupted)


def test_ctrl_c_leaves_the_users_folder_as_it_was(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """Ctrl-C left .hydra/, .ptune.lock and Hydra's job log in the user's folder."""
    monkeypatch.chdir(tmp_path)
    folder = user_folder(tmp_path / "mine", {"notes.txt": "mine"})
    before = listing(folder)
    _interrupt_at_first_step(monkeypatch)
    code, out, err = run_cli(["train", *train_args(tiny_models, tiny_csv, f"hydra.run.dir={folder}")], capsys)
    assert listing(folder) == before
    assert_one_line_error(code, out, err, "interrupted")


def test_ctrl_c_removes_a_run_folder_it_created(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _interrupt_at_first_step(monkeypatch)
    code, out, err = run_cli(["train", *train_args(tiny_models, tiny_csv)], capsys)
    assert_one_line_error(code, out, err, "interrupted")
    assert listing(tmp_path) == {"dev.csv": (tmp_path / "dev.csv").read_bytes(),
                                 "train.csv": (tmp_path / "train.csv").read_bytes()}


@pytest.fixture()
def resumable_run(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys) -> Path:
    """A run with the mlflow logger killed (Ctrl-C) after its first checkpoint and resumable state."""
    from ptune import training as train

    monkeypatch.chdir(tmp_path)
    real = train.train_step

    def stop_at_three(run, loop):
        if loop.step == 2:
            raise KeyboardInterrupt
        return real(run, loop)

    monkeypatch.setattr(train, "train_step", stop_at_three)
    run = tmp_path / "run"
    args = [*csv_overrides(tiny_models, tiny_csv), "trainer.max_steps=4", "trainer.eval_every=2",
            "trainer.save_every=2", "trainer.loggers=[csv,mlflow]", f"hydra.run.dir={run}"]
    code, _, err = run_cli(["train", *args], capsys)
    assert code == 2 and "interrupted" in err, err
    monkeypatch.setattr(train, "train_step", real)
    assert (run / "resume").is_dir() and (run / "mlflow.json").is_file()
    return run


def test_corrupted_mlflow_json_on_resume_is_one_line(resumable_run, capsys):
    (resumable_run / "mlflow.json").write_text('{"uri": "sqlite:///x", "run_id"')
    before = listing(resumable_run)
    code, out, err = run_cli(["train", "--resume", str(resumable_run)], capsys)
    assert_one_line_error(code, out, err, "mlflow.json")
    assert {k: v for k, v in listing(resumable_run).items() if k != runfolder.LOCK_NAME} == {
        k: v for k, v in before.items() if k != runfolder.LOCK_NAME}


# ------------------------------------------------------------------------------------------------ search
def _space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  trainer.lr: {type: float, low: 0.001, high: 0.1, log: true}\n"
                    "  method.prompt_length: {type: int, low: 2, high: 4}\n")
    return path


def search_args(tiny_models, tiny_csv, tmp_path, folder: Path, n: int = 1) -> list[str]:
    quoted = f"'{folder}'" if "{" in str(folder) else str(folder)  # Hydra's grammar: a brace needs quotes
    return [f"+hparams_search={_space(tmp_path)}", f"search.dir={quoted}", f"search.n_trials={n}",
            "search.n_startup_trials=1", *train_args(tiny_models, tiny_csv)]


def test_search_into_a_users_folder_is_refused(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """Item 1: search.dir=U holding the user's search.md, search.csv, trial_000/results.json."""
    monkeypatch.chdir(tmp_path)
    folder = user_folder(tmp_path / "U", {"search.md": "# my notes\n", "search.csv": "a,b\n",
                                          "trial_000/results.json": '{"mine": 1}\n'})
    before = listing(folder)
    code, out, err = run_cli(["search", *search_args(tiny_models, tiny_csv, tmp_path, folder)], capsys)
    assert listing(folder) == before
    assert_one_line_error(code, out, err, "ptune did not write")


@pytest.mark.parametrize("what", ["a file trial_000", "a search.yaml of the user's"])
def test_search_folder_with_a_foreign_entry_is_refused(what, tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    files = {"trial_000": "my file\n"} if what.startswith("a file") else {"search.yaml": "name: my project\n"}
    folder = user_folder(tmp_path / "U", files)
    before = listing(folder)
    code, out, err = run_cli(["search", *search_args(tiny_models, tiny_csv, tmp_path, folder)], capsys)
    assert listing(folder) == before
    assert_one_line_error(code, out, err, str(folder))


def _labelled_csvs(root: Path) -> dict[str, Path]:
    """Train and dev CSVs of the tiny sentences, labelled negative/positive in turn (the module fixtures' data)."""
    from .conftest import write_csv
    from .helpers import SENTENCES

    rows = [(s, ["negative", "positive"][i % 2]) for i, s in enumerate(SENTENCES * 4)]
    return {"train": write_csv(root / "train.csv", rows), "dev": write_csv(root / "dev.csv", rows[:12])}


@pytest.fixture(scope="module")
def finished_search(tiny_models, tmp_path_factory) -> Path:
    """A real one-trial search (a ptune search folder)."""
    root = tmp_path_factory.mktemp("search")
    csvs = _labelled_csvs(root)
    folder = root / "search"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        try:
            from ptune.cli import main

            main(["search", *search_args(tiny_models, csvs, root, folder)])
        except SystemExit as exc:
            assert not exc.code, exc
    assert (folder / "trial_000" / "results.json").is_file()
    return folder


@pytest.fixture()
def search_copy(finished_search, tmp_path) -> Path:
    return shutil.copytree(finished_search, tmp_path / "search", symlinks=True)


@pytest.mark.parametrize("damage", ["lost", "empty", "no study"])
def test_search_with_a_lost_study_refuses_and_changes_nothing(damage, search_copy, tmp_path, monkeypatch, capsys):
    """Item 2: resuming a folder whose optuna.db is lost or empty started a new study at trial 0 and overwrote the
    finished trial_000."""
    monkeypatch.chdir(tmp_path)
    db = search_copy / "optuna.db"
    if damage == "lost":
        db.unlink()
    elif damage == "empty":
        db.write_bytes(b"")
    else:  # a valid SQLite file without ptune's study
        import sqlite3

        db.unlink()
        sqlite3.connect(db).execute("create table t (x)").connection.commit()
    before = listing(search_copy)
    code, out, err = run_cli(["search", "--resume", str(search_copy), "search.n_trials=2"], capsys)
    assert listing(search_copy) == before
    assert_one_line_error(code, out, err, "trial_000")
    assert "Nothing changed" in err


@pytest.mark.parametrize("command", ["resume", "report"])
def test_corrupted_optuna_db_is_one_line(command, search_copy, tmp_path, monkeypatch, capsys):
    """A corrupted optuna.db on resume or `ptune report`: one line, and the failed resume does not rewrite
    search.yaml (or anything else)."""
    monkeypatch.chdir(tmp_path)
    (search_copy / "optuna.db").write_bytes(b"this is not a database" * 100)
    (search_copy / "search.yaml").write_text((search_copy / "search.yaml").read_text() + "# my comment\n")
    before = listing(search_copy)
    argv = ["search", "--resume", str(search_copy), "search.n_trials=2"] if command == "resume" else \
        ["report", str(search_copy)]
    code, out, err = run_cli(argv, capsys)
    assert_one_line_error(code, out, err, "optuna.db")
    assert {k: v for k, v in listing(search_copy).items() if k != runfolder.LOCK_NAME} == {
        k: v for k, v in before.items() if k != runfolder.LOCK_NAME}


def test_garbled_search_yaml_in_a_search_folder_is_one_line(search_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (search_copy / "search.yaml").write_text("name: sst2\nsearch: [1, 2]\n")  # YAML, but not ptune's settings
    before = listing(search_copy)
    code, out, err = run_cli(["search", "--resume", str(search_copy), "search.n_trials=2"], capsys)
    assert listing(search_copy) == before
    assert_one_line_error(code, out, err, "search.yaml")


NASTY = ["a?b", "x%2Fy", "br{ace} sp"]


@pytest.mark.parametrize("name", NASTY)
def test_optuna_db_stays_inside_its_folder(name, tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """Item 7: '?' put the database outside the folder, '%2F' was decoded to '/', '{' was a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").write_text("a user's file where '?' used to cut the path")
    folder = tmp_path / name
    args = search_args(tiny_models, tiny_csv, tmp_path, folder)
    before = listing(tmp_path)
    code, out, err = run_cli(["search", *args], capsys)
    assert code == 0, err
    after = listing(tmp_path)
    new = sorted(k for k in after if k not in before)
    assert new and all(k == name or k.startswith(name + "/") for k in new), new
    assert {k: after[k] for k in before} == before
    assert (folder / "optuna.db").stat().st_size > 0


def test_current_folder_with_a_brace(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """Item 7: a '{' anywhere in the path, the current folder included (relative search.dir)."""
    work = tmp_path / "my {project}"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run_cli(["search", *search_args(tiny_models, tiny_csv, tmp_path, Path("s"))], capsys)
    assert code == 0, err
    assert sorted(p.name for p in work.iterdir()) == ["s"]
    assert (work / "s" / "optuna.db").stat().st_size > 0


@pytest.mark.parametrize("name", ["q?x", "br{ace} sp"])
def test_mlflow_db_stays_inside_the_run_folder(name, tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q").write_text("a user's file where '?' used to cut the path")
    before = listing(tmp_path)
    folder = tmp_path / name
    args = train_args(tiny_models, tiny_csv, "trainer.loggers=[mlflow]", "hydra.run.dir='" + str(folder) + "'")
    code, out, err = run_cli(["train", *args], capsys)
    assert code == 0, err
    after = listing(tmp_path)
    assert {k: after[k] for k in before} == before
    new = sorted(k for k in after if k not in before)
    assert all(k == name or k.startswith(name + "/") for k in new), new
    assert (folder / "mlflow.db").stat().st_size > 0


# ------------------------------------------------------------------------------------------------ multirun
def test_multirun_into_a_users_folder_is_refused(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """Item 3: hydra.sweep.dir=U holding the user's summary.md and 0/results.json."""
    monkeypatch.chdir(tmp_path)
    folder = user_folder(tmp_path / "U", {"summary.md": "# mine\n", "0/results.json": '{"mine": 1}\n'})
    before = listing(folder)
    code, out, err = run_cli(["train", "-m", *train_args(tiny_models, tiny_csv, "trainer.seed=0,1",
                                                         f"hydra.sweep.dir={folder}")], capsys)
    assert listing(folder) == before
    assert_one_line_error(code, out, err, "hydra.sweep.dir")


def test_multirun_into_an_old_sweep_is_refused(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    """Item 3: rerunning a sweep into an old sweep folder overwrote its runs' checkpoints."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "sweep"
    args = ["train", "-m", *train_args(tiny_models, tiny_csv, "trainer.seed=0", f"hydra.sweep.dir={folder}")]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert (folder / "0" / "checkpoint").is_dir() and (folder / "summary.md").is_file()
    before = listing(folder)
    code, out, err = run_cli(args, capsys)
    assert listing(folder) == before
    assert_one_line_error(code, out, err, "hydra.sweep.dir")
    code, out, err = run_cli(["report", str(folder)], capsys)  # the sweep's own report may be rewritten
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ report
def test_report_never_replaces_a_users_summary(tmp_path, capsys):
    from .test_hostile import GOOD_RESULTS

    folder = user_folder(tmp_path / "runs", {"a/results.json": json.dumps(GOOD_RESULTS),
                                             "summary.md": "# my own summary\n"})
    before = listing(folder)
    code, out, err = run_cli(["report", str(folder)], capsys)
    assert listing(folder) == before
    assert_one_line_error(code, out, err, "summary.md")
    (folder / "summary.md").unlink()
    code, out, err = run_cli(["report", str(folder)], capsys)
    assert code == 0, err
    code, out, err = run_cli(["report", str(folder)], capsys)  # its own report: rewritten
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ predict
@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    csvs = _labelled_csvs(root)
    run = root / "run"
    args = [*csv_overrides(tiny_models, csvs), *TINY, "method=soft_prompt", f"hydra.run.dir={run}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        try:
            from ptune.cli import main

            main(["train", *args])
        except SystemExit as exc:
            assert not exc.code, exc
    return run


PREDICT_CASES = ["output is the input", "output is the input, shaped like predictions", "output is a user's file",
                 "output links to the input"]


@pytest.mark.parametrize("case", PREDICT_CASES)
def test_predict_never_replaces_a_users_file(case, trained, tmp_path, capsys):
    """Item 6: --output equal to --input replaced the input with the predictions."""
    line = '{"index": 0, "checkpoint": "mine", "text_a": "nice"}' if "shaped" in case else '{"text_a": "nice"}'
    folder = user_folder(tmp_path / "mine", {"f.jsonl": line + "\n", "notes.txt": "mine\n"})
    output = folder / {"output is a user's file": "notes.txt", "output links to the input": "link.jsonl"}.get(
        case, "f.jsonl")
    if case == "output links to the input":
        output.symlink_to("f.jsonl")
    before = listing(folder)
    code, out, err = run_cli(["predict", str(trained), "--input", str(folder / "f.jsonl"), "--output", str(output)],
                             capsys)
    assert listing(folder) == before
    assert_one_line_error(code, out, err, "--output")
    if case == "output is a user's file":  # a new file, then ptune's own predictions in it, may be written
        for _ in range(2):
            code, out, err = run_cli(["predict", str(trained), "--input", str(folder / "f.jsonl"), "--output",
                                      str(tmp_path / "p.jsonl")], capsys)
            assert code == 0, err
        assert json.loads((tmp_path / "p.jsonl").read_text())["index"] == 0


# ------------------------------------------------------------------------------------------------ export
def test_export_keeps_the_users_files_in_an_export_folder(trained, tmp_path, capsys):
    """Item 4: a second export after the user added E/README.md and E/mydocs/ deleted both."""
    out_dir = tmp_path / "E"
    code, out, err = run_cli(["export", str(trained), "--output", str(out_dir), "--no-verify"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["export", str(trained), "--output", str(out_dir), "--no-verify"], capsys)
    assert code == 0, err  # its own earlier export is replaced
    user_folder(out_dir, {"README.md": "# my adapter\n", "mydocs/usage.md": "use it\n"})
    before = listing(tmp_path)
    code, out, err = run_cli(["export", str(trained), "--output", str(out_dir), "--no-verify"], capsys)
    assert listing(tmp_path) == before
    assert_one_line_error(code, out, err, "README.md")


def test_export_never_touches_a_users_old_sibling(trained, tmp_path, capsys):
    """Item 4: exporting to a new folder X deleted a user's sibling folder .X.old/."""
    user_folder(tmp_path, {".X.old/mine.txt": "mine\n"})
    code, out, err = run_cli(["export", str(trained), "--output", str(tmp_path / "X"), "--no-verify"], capsys)
    assert code == 0, err
    assert (tmp_path / ".X.old" / "mine.txt").read_text() == "mine\n"
    before = listing(tmp_path)  # X exists now: a second export would swap it through .X.old, which is not ptune's
    code, out, err = run_cli(["export", str(trained), "--output", str(tmp_path / "X"), "--no-verify"], capsys)
    assert listing(tmp_path) == before
    assert_one_line_error(code, out, err, ".X.old")


@pytest.mark.parametrize("where", ["under a file", "/proc"])
def test_export_to_an_unwritable_path_fails_before_loading(where, tmp_path, capsys):
    """The output is checked before the checkpoint is loaded (here there is none to load)."""
    (tmp_path / "afile").write_text("x")
    output = tmp_path / "afile" / "E" if where == "under a file" else Path("/proc/ptune-export")
    before = listing(tmp_path)
    code, out, err = run_cli(["export", str(tmp_path / "no-such-run"), "--output", str(output)], capsys)
    assert listing(tmp_path) == before
    assert_one_line_error(code, out, err, "--output")
