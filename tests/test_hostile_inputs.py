"""Issue 31's hostile inputs through the real CLI (in-process, as tests/test_hostile.py; a subprocess where a kill
is needed): search-space distributions Optuna refuses, a resumed search's sampler, label words for new class names
as the README documents them, trainer.metric per readout, train_log.csv after a kill, show-template of a generate
readout, +hparams_search on `ptune train`, and shell completion without a valid action. Each refusal is one
`ptune: error:` line, exit 2, with the folder listed before and after: nothing written."""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from .helpers import run_cli
from .test_cli import csv_overrides
from .test_hostile import assert_one_line_error
from .test_resume import _kill_at_step


def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder): what the user had, compared byte for byte."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def tiny_train(tiny_models, tiny_csv, *extra: str) -> list[str]:
    skip = ("trainer.max_steps", "trainer.eval_every")
    base = [a for a in csv_overrides(tiny_models, tiny_csv) if not a.startswith(skip)]
    return [*base, "trainer.max_steps=1", "trainer.eval_every=1", "trainer.save_every=0", "trainer.precision=fp32",
            "trainer.device=cpu", *extra]


# ------------------------------------------------------------------------------------- search space (tracebacks)
SPACES = {
    # name: (params block of the search space file, needle in the one-line error)
    "int log with step": ("params:\n  method.prompt_length: {type: int, low: 2, high: 8, log: true, step: 2}\n",
                          "method.prompt_length"),
    "float step zero": ("params:\n  trainer.lr: {type: float, low: 0.01, high: 0.1, step: 0}\n", "step=0"),
    "float step negative": ("params:\n  trainer.lr: {type: float, low: 0.01, high: 0.1, step: -0.01}\n", "step=-0.01"),
    "float log with step 1": ("params:\n  trainer.lr: {type: float, low: 0.01, high: 2, log: true, step: 1}\n",
                              "log=true"),  # an int log space takes step 1; Optuna's float one takes no step
    "high infinite": ("params:\n  trainer.lr: {type: float, low: 0.01, high: .inf}\n", "high=inf"),
    "int with a fractional bound": ("params:\n  method.prompt_length: {type: int, low: 1.5, high: 4}\n", "low=1.5"),
    "unknown distribution key": ("params:\n  trainer.lr: {type: float, low: 0.01, high: 0.1, lgo: true}\n", "lgo"),
    "choices not a list": ("params:\n  method.prompt_length: {type: categorical, choices: 4}\n", "choices=4"),
    "choice a mapping": ("params:\n  method.prompt_length: {type: categorical, choices: [{a: 1}]}\n", "{'a': 1}"),
    "params a list": ("params: [trainer.lr]\n", "search.params"),
    "invalid yaml": ("params:\n  trainer.lr: {type: float, low: 0.01\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(SPACES))
def test_bad_search_space_is_one_line_and_writes_nothing(case, tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    body, needle = SPACES[case]
    space = tmp_path / "space.yaml"
    space.write_text(body)
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("the user's\n")
    monkeypatch.chdir(work)
    before = listing(tmp_path)
    args = ["search", f"+hparams_search={space}", f"search.dir={work / 'search'}", "search.n_trials=1",
            *tiny_train(tiny_models, tiny_csv)]
    code, out, err = run_cli(args, capsys)
    assert_one_line_error(code, out, err, needle)
    assert listing(tmp_path) == before


# ------------------------------------------------------------------------------------------- item 8: sampler
def test_resumed_search_does_not_repeat_the_first_trials_parameters(tiny_models, tiny_csv, tmp_path, monkeypatch,
                                                                   capsys):
    """All trials are random start-up draws (n_startup_trials=5): reseeded with search.seed on resume, the sampler
    replayed trial 0's draw exactly; a continuous parameter makes a chance repeat impossible."""
    import optuna

    space = tmp_path / "space.yaml"
    space.write_text("params:\n  trainer.lr: {type: float, low: 0.01, high: 0.1}\n"
                     "  trainer.weight_decay: {type: float, low: 0.0, high: 0.1}\n")
    folder = tmp_path / "search"
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["search", f"+hparams_search={space}", f"search.dir={folder}", "search.n_trials=1",
                            *tiny_train(tiny_models, tiny_csv)], capsys)
    assert code == 0, err
    code, out, err = run_cli(["search", "--resume", str(folder), "search.n_trials=3"], capsys)
    assert code == 0, err
    assert "continuing" in out
    study = optuna.load_study(study_name="ptune", storage=f"sqlite:///{folder / 'optuna.db'}")
    params = [t.params for t in study.trials]
    assert len(params) == 3
    assert params[1] != params[0] and params[2] != params[0], params


# ------------------------------------------------------------------------ item 9: label words, as documented
def documented_label_words() -> list[str]:
    """The own-data page's label words (docs/getting-started.md, where the README links for them), split as a shell
    passes them (it is printed quoted)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "getting-started.md").read_text(encoding="utf-8")
    section = page.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    prose = re.sub(r"```.*?```", "", section, flags=re.S)
    spans = [s for s in re.findall(r"`([^`]+)`", prose) if "template.label_words=" in s]
    assert len(spans) == 1, spans
    return shlex.split(spans[0])


def test_label_words_for_new_class_names_work_as_the_docs_document(tiny_models, tmp_path, monkeypatch, capsys):
    from .conftest import write_csv
    from .helpers import SENTENCES

    documented = documented_label_words()
    assert documented == ["dataset.label_names=[bad,good]", "template.label_words={bad:[awful],good:[great]}"]
    rows = [(s, ["bad", "good"][i % 2]) for i, s in enumerate(SENTENCES * 2)]
    data = {"train": write_csv(tmp_path / "train.csv", rows), "dev": write_csv(tmp_path / "dev.csv", rows[:6])}
    base = [a for a in tiny_train(tiny_models, data) if not a.startswith("dataset.label_names")]
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["train", *base, *documented, f"hydra.run.dir={run}"], capsys)
    assert code == 0, err
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert OmegaConf.to_container(saved.template.label_words) == {"bad": ["awful"], "good": ["great"]}
    code, out, err = run_cli(["show-template", *base, *documented], capsys)  # composed outside Hydra's main
    assert code == 0, err
    assert re.search(r"^  bad\s+'awful' -> ", out, re.M) and re.search(r"^  good\s+'great' -> ", out, re.M), out
    # the form the README printed before (delete, then add) works too
    old = ["dataset.label_names=[bad,good]", "~template.label_words", "+template.label_words={bad:[awful],good:[fine]}"]
    code, out, err = run_cli(["train", *base, *old, f"hydra.run.dir={tmp_path / 'run2'}"], capsys)
    assert code == 0, err
    saved = OmegaConf.load(tmp_path / "run2" / ".hydra" / "config.yaml")
    assert OmegaConf.to_container(saved.template.label_words) == {"bad": ["awful"], "good": ["fine"]}


def test_label_words_dict_replaces_and_a_single_class_still_merges(tiny_models, tiny_csv, tmp_path, monkeypatch,
                                                                    capsys):
    """A dict replaces the template's words (a class left out is then missing: one line naming it); one class's
    words keep Hydra's merge."""
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    code, out, err = run_cli(["train", *tiny_train(tiny_models, tiny_csv), "template.label_words={positive:[great]}"],
                             capsys)
    assert_one_line_error(code, out, err, "negative")
    assert listing(tmp_path) == before
    run = tmp_path / "run"
    code, out, err = run_cli(["train", *tiny_train(tiny_models, tiny_csv), "template.label_words.positive=[fine]",
                              f"hydra.run.dir={run}"], capsys)
    assert code == 0, err
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert OmegaConf.to_container(saved.template.label_words) == {"negative": ["terrible"], "positive": ["fine"]}


# --------------------------------------------------------------------------- item 10: metric per readout
def generate_train(tiny_models, tiny_csv, *extra: str) -> list[str]:
    args = [a for a in tiny_train(tiny_models, tiny_csv) if not a.startswith(("backbone.name", "template="))]
    return [*args, f"backbone.name={tiny_models['gpt2']}", "template=sst2_generate", *extra]


@pytest.mark.parametrize(("readout", "metric", "valid"), [
    ("verbalizer", "rouge_l", "accuracy, macro_f1"), ("head", "bleu", "accuracy, macro_f1"),
    ("generate", "mcc", "accuracy, rouge_l, bleu"),
])
def test_metric_the_readout_does_not_report_is_refused_before_the_run_folder(readout, metric, valid, tiny_models,
                                                                             tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    if readout == "generate":
        args = generate_train(tiny_models, tiny_csv)
    else:
        args = tiny_train(tiny_models, tiny_csv, *(["template.readout=head"] if readout == "head" else []))
    code, out, err = run_cli(["train", *args, f"trainer.metric={metric}"], capsys)
    assert_one_line_error(code, out, err, f"trainer.metric={metric!r}")
    assert valid in err and f"template.readout={readout}" in err
    assert listing(tmp_path) == before


def test_generate_readout_refuses_macro_f1_and_trains_on_its_own_metric(tiny_models, tiny_csv, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    code, out, err = run_cli(["train", *generate_train(tiny_models, tiny_csv, "trainer.metric=macro_f1")], capsys)
    assert_one_line_error(code, out, err, "trainer.metric='macro_f1'")
    assert "accuracy, rouge_l, bleu" in err
    assert listing(tmp_path) == before
    code, out, err = run_cli(["train", *generate_train(tiny_models, tiny_csv, "trainer.metric=rouge_l")], capsys)
    assert code == 0, err
    assert "done: rouge_l" in out


# ---------------------------------------------------------------------------- item 11: train_log after a kill
def _log_steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in csv.DictReader(io.StringIO((run / "train_log.csv").read_text()))]


def test_train_log_holds_every_saved_step_after_a_kill_and_resume(tiny_models, tiny_csv, tmp_path):
    """Evaluations only at the end and a resume save every step: the log was written only at evaluations, so a
    kill lost every step the resume state already held, and the resumed run's log started at its resume step."""
    from .test_cli import ptune

    run = tmp_path / "run"
    skip = ("trainer.max_steps", "trainer.eval_every")
    args = [*(a for a in csv_overrides(tiny_models, tiny_csv) if not a.startswith(skip)), "trainer.max_steps=8",
            "trainer.eval_every=8", "trainer.save_every=1", "trainer.log_every=1", "trainer.loggers=[csv]",
            "trainer.precision=fp32", "trainer.device=cpu", f"hydra.run.dir={run}"]
    assert _kill_at_step(args, tmp_path, 5)
    state = next(p for p in (run / "resume" / "state.json", run / ".resume.old" / "state.json") if p.is_file())
    saved = json.loads(state.read_text())["loop"]["step"]
    assert saved >= 3
    assert (run / "train_log.csv").is_file(), "the kill left no train_log.csv"
    assert set(range(1, saved + 1)) <= set(_log_steps(run)), (saved, _log_steps(run))
    res = ptune("train", "--resume", str(run), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert _log_steps(run) == list(range(1, 9))


# --------------------------------------------------------------------------- item 11: show-template, generate
def test_show_template_describes_a_generate_readout(tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [a for a in generate_train(tiny_models, tiny_csv) if not a.startswith("hydra.")]
    code, out, err = run_cli(["show-template", "--n", "2", *args], capsys)
    assert code == 0, err
    assert "linear head" not in out, out
    assert "readout: generate" in out and "'negative' -> " not in out
    assert "negative -> 'negative'" in out and "decoding greedy, at most 4 tokens" in out
    assert len(re.findall(r"^  target '(negative|positive)'$", out, re.M)) == 2, out
    assert "the text the backbone writes at <answer>" in out


# ------------------------------------------------------------------------- item 11: +hparams_search on train
@pytest.mark.parametrize("given", ["+hparams_search=sst2_soft", "hparams_search=sst2_soft", "search.n_trials=3"])
def test_train_refuses_a_search_space(given, tiny_models, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    code, out, err = run_cli(["train", *tiny_train(tiny_models, tiny_csv), given], capsys)
    assert_one_line_error(code, out, err, "ptune search")
    assert given in err
    assert listing(tmp_path) == before


# ------------------------------------------------------------------------------------ shell completion (-sc)
COMPLETION = {
    # name: (argv, COMP_LINE or None for unset, needle)
    "no action": (["-sc"], "ptune train ", "no action"),
    "a bad action": (["-sc", "bogus"], "ptune train ", "bogus"),
    "two actions": (["-sc", "query=bash", "install=bash"], "ptune train ", "install=bash"),
    "unknown shell": (["-sc", "query=tcsh"], "ptune train ", "tcsh"),
    "query without COMP_LINE": (["-sc", "query=bash"], None, "COMP_LINE"),
    "train query without COMP_LINE": (["train", "-sc", "query=bash"], None, "COMP_LINE"),
    "train query with an empty COMP_LINE": (["train", "-sc", "query=bash"], "", "COMP_LINE"),
    "train without an action": (["train", "-sc"], "ptune train ", "no action"),
}


@pytest.mark.parametrize("case", list(COMPLETION))
def test_shell_completion_without_a_valid_action_is_one_line(case, tmp_path, monkeypatch, capsys):
    argv, line, needle = COMPLETION[case]
    monkeypatch.chdir(tmp_path)
    if line is None:
        monkeypatch.delenv("COMP_LINE", raising=False)
    else:
        monkeypatch.setenv("COMP_LINE", line)
    assert_one_line_error(*run_cli(argv, capsys), needle)
    assert not list(tmp_path.iterdir())


def test_shell_completion_install_prints_the_script_for_ptune_and_query_completes(tmp_path, monkeypatch, capsys):
    """`ptune -sc install=bash` printed the subcommand names, which `eval` would have run as a command; it now
    prints what `ptune train -sc install=bash` does, and a query still completes."""
    monkeypatch.chdir(tmp_path)
    for argv in (["-sc", "install=bash"], ["train", "-sc", "install=bash"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 0, err
        assert "complete -o nospace -o default -F hydra_bash_completion ptune" in out, (argv, out)
    monkeypatch.setenv("COMP_LINE", "ptune tr")
    assert run_cli(["-sc", "query=bash"], capsys)[1].split() == ["train"]
    monkeypatch.setenv("COMP_LINE", "ptune train trainer.l")
    assert "trainer.lr=" in run_cli(["-sc", "query=bash"], capsys)[1].split()
