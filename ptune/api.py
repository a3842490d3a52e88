"""The Python API: ptune from a notebook or a script, on the code paths of the CLI.

    import ptune
    run = ptune.train({"+experiment": "sst2_ptv2", "trainer.max_steps": 100})   # ptune train +experiment=...
    pred = ptune.load(run.path)                                                 # (or run.load())
    pred.predict(["a gorgeous, witty movie", "the acting is just bad"])         # ptune predict RUN --text ...
    pred.evaluate({"dataset.split": "dev"})                                     # ptune eval RUN dataset.split=dev
    best = ptune.search(["+hparams_search=sst2_ptv2", "search.n_trials=5"])     # ptune search ...

Each function takes the overrides the CLI takes, as a list of ``key=value`` strings or a dict (values are written
in Hydra's override grammar for you), and runs what its subcommand runs: ``ptune.train`` composes and checks the
config (``commands.train.compose_run``), checks the run folder (``commands.train.preflight``), trains with
``training.run_training`` and undoes a failed run's folder as ``ptune train`` does; ``Predictor.predict`` scores
through ``predict.predict`` on a ``serving.PromptServer`` (``predict.predict_generate`` for a generate readout);
``Predictor.evaluate`` is ``inference.evaluate_checkpoint``; ``ptune.search`` is ``commands.search.search_main``. A
user error raises ``PtuneError`` (one line), never ``SystemExit``; the locks a call takes on its folders are
released when it returns, since a notebook's process outlives the call (the CLI's process ends with its command).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PtuneError, one_line

Overrides = Sequence[str] | Mapping[str, Any] | None


# --------------------------------------------------------------------------------------------------- overrides
def as_overrides(overrides: Overrides) -> list[str]:
    """``key=value`` strings from a list of them or a dict (``{"trainer.lr": 0.1, "+experiment": "sst2_ptv2"}``)."""
    if overrides is None:
        return []
    if isinstance(overrides, str | bytes):  # a string is a sequence too: of characters
        raise PtuneError(f"overrides must be a list of 'key=value' strings or a dict, not the string {overrides!r}")
    if isinstance(overrides, Mapping):
        return [f"{key}={hydra_value(value, str(key))}" for key, value in overrides.items()]
    out = list(overrides)
    bad = [o for o in out if not isinstance(o, str) or "=" not in o and not o.startswith(("~", "-"))]
    if bad:
        raise PtuneError(f"override {bad[0]!r} is not a 'key=value' string")
    return out


def hydra_value(value: Any, key: str = "value") -> str:
    """``value`` in Hydra's override grammar, checked by parsing it back: a string that would read as another type
    or breaks the grammar (``"null"``, ``"1e-3"``, ``"it's"``) is quoted."""
    text = _render(value, key, top=True)
    if _parse(text) != _plain(value):
        raise PtuneError(f"{key}: the value {value!r} cannot be written as a ptune override")
    return text


def _render(value: Any, key: str, top: bool = False) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value)
        if top and _parse(text) == text:
            return text
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_render(v, key)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_render(v, key) for v in value) + "]"
    raise PtuneError(f"{key}: a {type(value).__name__} cannot be an override value (use a number, string, "
                     "boolean, None, list or dict)")


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _parse(text: str) -> Any:
    from .config import override_value

    try:
        return override_value(f"k={text}")
    except PtuneError:  # a value the grammar refuses (or a sweep) compares unequal: it gets quoted
        return _UNPARSED


_UNPARSED = object()


@contextlib.contextmanager
def _folders_released() -> Iterator[None]:
    """Release the run/search folder locks taken inside: the CLI holds them until its process ends, and a notebook's
    process lives on (another process could then never use the folder)."""
    from . import runfolder

    before = set(runfolder._held)
    try:
        yield
    finally:
        for key in set(runfolder._held) - before:
            runfolder.release(key)


# ------------------------------------------------------------------------------------------------------- train
@dataclass
class Run:
    """A finished training run: its folder, its results.json, and the best checkpoint."""

    path: Path  # the run folder (hydra.run.dir)
    results: dict  # results.json
    metric: str  # trainer.metric, which selected the checkpoint
    best_metric: float
    checkpoint: Path  # <path>/checkpoint

    def load(self, overrides: Overrides = None, device: str | None = None) -> Predictor:
        """``ptune.load(run.path)``."""
        return load(self.path, overrides, device=device)


def train(overrides: Overrides = None, *, resume: str | Path | None = None) -> Run:
    """``ptune train OVERRIDES`` (one run): compose and check the config, check the run folder, train, write the run
    folder (``.hydra/config.yaml`` and ``overrides.yaml``, checkpoint, results.json), return it. A user error raises
    PtuneError; a run that fails before saving a checkpoint leaves nothing behind. ``hydra.run.dir=DIR`` names the
    folder (default ``outputs/runs/<experiment_name>/<time>`` under the current folder, as the CLI).
    ``resume=RUN_DIR`` is ``ptune train --resume RUN_DIR``: a killed run continued with the config it started with."""
    from omegaconf import OmegaConf

    from . import distributed
    from .atomic import atomic_write_text
    from .commands import train as train_command
    from .config import label_words_overrides
    from .training import run_training

    argv = as_overrides(overrides)
    if resume is not None:
        if argv:
            raise PtuneError(f"resume={str(resume)!r} continues a run with the config it started with: give no "
                             f"overrides (got {' '.join(argv)})")
        with _folders_released():
            results = train_command.resume_run([str(resume)])
        path = Path(resume)
        return Run(path, results, results["metric"], results["best_metric"], path / "checkpoint")
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise PtuneError(f"{flags[0]!r} is a command-line flag: ptune.train runs one run from 'key=value' overrides "
                         "(a sweep: call it in a loop, or `ptune train -m` in a shell)")
    train_command.refuse_search_overrides(argv)
    if distributed.env_world_size() > 1:  # the CLI shares one run folder between ranks (distributed.hydra_overrides)
        raise PtuneError("ptune.train runs in one process: under torchrun, start `ptune train OVERRIDES` (or "
                         "`python -m ptune train OVERRIDES`)")
    composed = train_command.compose_run(argv)
    with _folders_released():
        folder = train_command.preflight(composed)
        path = folder.path
        OmegaConf.set_struct(composed, False)
        del composed["hydra"]  # Hydra's own settings: not saved in .hydra/config.yaml by `ptune train` either
        try:
            atomic_write_text(path / ".hydra" / "config.yaml", OmegaConf.to_yaml(composed))
            task = [a for a in label_words_overrides(argv) if not a.lstrip("+~").startswith("hydra.")]  # as Hydra
            atomic_write_text(path / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(task)))
            results = run_training(composed, path)
        except PtuneError:
            if not (path / "checkpoint").exists():  # as `ptune train`: a saved checkpoint is kept
                folder.undo()
            raise
    return Run(path, results, results["metric"], results["best_metric"], path / "checkpoint")


# ------------------------------------------------------------------------------------------------ load/predict
class Predictor:
    """A saved prompt checkpoint, loaded once: ``predict`` as ``ptune predict``, ``evaluate`` as ``ptune eval``."""

    def __init__(self, path: str | Path, overrides: Overrides = None, device: str | None = None):
        from .config import section
        from .inference import read_saved
        from .readouts import readout_class
        from .template import parse_template

        self.path = Path(path)
        self.overrides = as_overrides(overrides)
        self.device = device
        saved = read_saved(path, self.overrides)  # the one checkpoint reader, as eval and predict use
        self.checkpoint = saved.checkpoint
        template = section(saved.cfg, "template")
        self.label_names: list[str] = list(saved.meta["label_names"])
        self.fields: list[str] = parse_template(template.text).field_names  # what one text fills
        self.generates = readout_class(template.readout).generates_text  # `ptune predict --generate`
        self._server = None
        if not self.generates:
            from .serving import PromptServer

            self._server = PromptServer([str(self.path)], self.overrides, device=device)

    def __repr__(self) -> str:
        return f"Predictor({str(self.path)!r}, labels={self.label_names})"

    def predict(self, inputs: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]],
                batch_size: int = 32) -> list[dict[str, Any]]:
        """One record per input, as ``ptune predict`` writes them: ``{"index", "checkpoint", "label", "label_name",
        "probs"}``, or ``{"index", "checkpoint", "text"}`` for a generate readout. An input is a text (it fills the
        template's one field, as ``--text``) or a dict of fields (a JSONL line of ``--input``)."""
        rows = [inputs] if isinstance(inputs, str | Mapping) else list(inputs)
        objects = []
        for n, row in enumerate(rows):
            if isinstance(row, str):
                if len(self.fields) != 1:
                    raise PtuneError(f"a text fills one field, but the template of {str(self.path)!r} reads "
                                     f"{', '.join(self.fields)}: give dicts of fields")
                objects.append({self.fields[0]: row})
            elif isinstance(row, Mapping):
                objects.append(dict(row))
            else:
                raise PtuneError(f"input {n}: {type(row).__name__} is neither a text nor a dict of fields")
        if batch_size <= 0:
            raise PtuneError(f"batch_size={batch_size} must be > 0")
        if not objects:
            return []
        if self.generates:
            from .predict import predict_generate

            return predict_generate([str(self.path)], objects, self.overrides, batch_size, self.device, "input")
        from .predict import predict

        return predict([str(self.path)], objects, batch_size=batch_size, server=self._server, source="input")

    def evaluate(self, overrides: Overrides = None) -> dict[str, Any]:
        """``ptune eval PATH OVERRIDES``: the metrics on ``dataset.eval_split`` (``dataset.split=NAME`` picks it),
        also written to ``<checkpoint>/../eval.json``."""
        from .inference import eval_overrides, evaluate_checkpoint

        return evaluate_checkpoint(str(self.path), eval_overrides([*self.overrides, *as_overrides(overrides)]))


def load(path: str | Path, overrides: Overrides = None, *, device: str | None = None) -> Predictor:
    """A run folder or its checkpoint/ folder, loaded for ``predict`` and ``evaluate`` (overrides as ``ptune
    predict`` takes them, e.g. ``trainer.precision=fp32``; ``device``: auto, cpu or cuda)."""
    return Predictor(path, overrides, device)


# ------------------------------------------------------------------------------------------------------ search
@dataclass
class Search:
    """A finished search: its folder (optuna.db, search.csv/.md/.png, trial_NNN/ run folders) and its best trial."""

    path: Path
    best_trial: int
    best_value: float
    best_params: dict[str, Any] = field(default_factory=dict)
    best_run: Path | None = None  # the best trial's run folder

    def load(self, overrides: Overrides = None, device: str | None = None) -> Predictor:
        """The best trial's checkpoint."""
        if self.best_run is None:
            raise PtuneError(f"the search in {str(self.path)!r} records no run folder for its best trial")
        return load(self.best_run, overrides, device=device)


def search(overrides: Overrides = None, *, resume: str | Path | None = None) -> Search:
    """``ptune search OVERRIDES`` (``+hparams_search=NAME``, ``search.*`` keys and the trials' overrides), or ``ptune
    search --resume DIR`` with ``resume=DIR``; returns the search folder and its best trial."""

    from .commands.search import open_study, search_main

    argv = as_overrides(overrides)
    if resume is not None:
        argv = ["--resume", str(resume), *argv]
    with _folders_released():
        folder = search_main(argv)
    study = open_study(folder)
    try:
        best = study.best_trial
    except ValueError as exc:  # no complete trial: search_main has said so already
        raise PtuneError(f"no trial of the search in {str(folder)!r} completed: {one_line(exc)}") from None
    run_dir = best.user_attrs.get("run_dir")
    return Search(Path(folder), best.number, float(best.value), dict(best.params),
                  Path(folder) / run_dir if run_dir else None)
