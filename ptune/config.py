"""The config schema: one dataclass per Hydra config group, registered in Hydra's ConfigStore.

Every group's YAML file extends its schema (``defaults: [<group>_schema, _self_]``), so each default lives here
and only here, OmegaConf checks types when a YAML file or an override is merged, and a key the schema does not
declare is refused. Values that need more than a type (ranges, choices) are checked in ``__post_init__`` when a
group is read (``section``), which ``ptune train`` does for every group before Hydra writes anything.
A method's schema is its tuner's config class (``ptune/tuners/<method>/config.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import PtuneError, one_line


def _choice(group: str, key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        shown = ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in valid)
        raise PtuneError(f"{group}.{key}={value!r} is not valid: use one of {shown}")


def _integer(group: str, key: str, value: Any, low: int, high: int | None = None, *, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        tail = ", or null for all" if none_ok else ""
        raise PtuneError(f"{group}.{key}={value!r} must be an integer {bound}{tail}")


def _number(group: str, key: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        bound = lo if high is None else f"in {'(' if low_open else '['}{low}, {high})"
        raise PtuneError(f"{group}.{key}={value!r} must be a number {bound}")


@dataclass
class BackboneConfig:
    """The frozen model: a packaged name (minilm, cassette-bert, smollm2, gemma3-270m), a local folder or a Hub id."""

    name: str = MISSING  # packaged name (minilm, cassette-bert, smollm2, gemma3-270m), a local folder or a Hub id
    # weights as stored in memory: float32 | bfloat16 | float16 | auto (the packaged decoders' default: bfloat16
    # where the device computes it natively, CUDA with bf16 or a CPU with AMX or AVX512-BF16, else float32; the
    # checkpoint saves the resolved value, so eval and predict load the same dtype on any machine)
    dtype: str = "float32"
    max_length: int = 256  # tokens per input, prompt included (capped by the model's positions)
    quantize: str = "none"  # the frozen blocks' weights: none | int8 | nf4 (torchao; efficiency/quantize.py)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PtuneError(f"backbone.name={self.name!r} must name a packaged model, a folder or a Hub id")
        _choice("backbone", "dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))
        _integer("backbone", "max_length", self.max_length, 1, 1 << 20)
        _choice("backbone", "quantize", self.quantize, ("none", "int8", "nf4"))


@dataclass
class TemplateConfig:
    """How an example becomes the model's input, and how its answer is read."""

    text: str = MISSING  # fields {text_a}, {mask}, soft tokens {soft}, {soft:N}, {soft:"words"}
    readout: str = "verbalizer"  # verbalizer: label words at {mask} | head: a linear head on the pooled state
    # | generate: {mask} is a target text the backbone writes (causal/seq2seq); ptune/readouts/
    label_words: dict[str, list[str]] | None = None  # class -> words (verbalizer)
    multi_token: str = "first"  # a label word of several tokens: first | mean | full (causal/seq2seq)
    truncate: str = "tail"  # which end of the longest field is cut: tail | head
    calibrate: bool = False  # contextual calibration (Zhao et al. 2021) against content-free inputs
    pooling: str = "cls"  # head readout: cls ([CLS], a decoder's last real token, a seq2seq decoder state) | mean
    head_dropout: float = 0.1  # head readout: dropout on the pooled vector before the linear head
    # readout=generate: the field holding the target text (null: the label's first label word, text-to-text)
    target: str | None = None
    max_target_length: int = 32  # target tokens kept (with the end token) and the most tokens decoded
    decoding: str = "greedy"  # greedy | beam | sample (seeded with trainer.seed)
    num_beams: int = 4  # decoding=beam

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise PtuneError("template.text is empty: write e.g. '{text_a} It was {mask}.'")
        _choice("template", "readout", self.readout, ("verbalizer", "head", "generate"))
        _choice("template", "decoding", self.decoding, ("greedy", "beam", "sample"))
        _integer("template", "max_target_length", self.max_target_length, 2, 4096)
        _integer("template", "num_beams", self.num_beams, 1, 64)
        if self.readout == "generate" and self.target is None and not self.label_words:
            raise PtuneError(
                "template.readout=generate needs template.target (the field holding the target text) or "
                "template.label_words (label words as targets)"
            )
        _choice("template", "multi_token", self.multi_token, ("first", "mean", "full"))
        _choice("template", "truncate", self.truncate, ("tail", "head"))
        _choice("template", "pooling", self.pooling, ("cls", "mean"))
        if not isinstance(self.calibrate, bool) or (self.calibrate and self.readout != "verbalizer"):
            raise PtuneError(
                f"template.calibrate={self.calibrate!r} is not valid: contextual calibration is true/false and "
                "needs template.readout=verbalizer"
            )
        _number("template", "head_dropout", self.head_dropout, 0.0, 1.0)
        if self.readout == "verbalizer" and not self.label_words:
            raise PtuneError("template.label_words is empty: map every class to one or more label words")


@dataclass
class DatasetConfig:
    """A registered data set: a built-in one, or your own files (the *_file, fields and label keys) or a `datasets`
    source (path, config_name)."""

    name: str = MISSING  # the registered data set to read (the list above)
    eval_split: str = "dev"  # the split evaluations read: dev (test with dataset.test_file)
    max_train_samples: int | None = None  # a seeded random subset (null: all)
    max_eval_samples: int | None = None  # a seeded random subset of the eval split (null: all)
    k_shot: int | None = None  # k training examples per class (seeded)
    train_file: str | None = None  # csv/tsv/jsonl: training file (relative: under data.root, then the current folder)
    dev_file: str | None = None  # csv/tsv/jsonl: the dev split's file
    test_file: str | None = None  # csv/tsv/jsonl: the test split's file (dataset.eval_split=test)
    # template field name -> the file's column holding it (null: the template does not use that field)
    fields: dict[str, str | None] = field(default_factory=lambda: {"text_a": "text", "text_b": None})
    label_column: str = "label"  # the column holding each label: a label name or an integer index
    label_names: list[str] | None = None  # classes in index order (null: the built-in's, or a datasets ClassLabel's)
    delimiter: str | None = None  # csv: ',' and tsv: a tab unless set
    # Hold out part of the training data as the evaluation split (a fraction in (0, 1) or a count), drawn with a
    # fixed seed so every run and trial sees the same split; the eval split (dev) is then never read.
    validation: float | None = None
    # Each class gives its share of the held-out examples (see ptune/data/selection.py hold_out); false: a plain
    # random draw, as before this option (the measured sst2_ptv2 search, docs/results/search.md).
    validation_stratify: bool = True
    path: str | None = None  # dataset=hf: a datasets name/Hub id, or a local folder of parquet/arrow/csv/json
    config_name: str | None = None  # dataset=hf: the datasets configuration (subset) name

    def __post_init__(self) -> None:
        for key in ("max_train_samples", "max_eval_samples", "k_shot"):
            _integer("dataset", key, getattr(self, key), 1, none_ok=True)
        v = self.validation
        ok = v is None or (
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            and ((0 < v < 1) or (v >= 1 and float(v).is_integer()))
        )
        if not ok:
            raise PtuneError(
                f"dataset.validation={v!r} is not valid: a fraction in (0, 1) or a whole count >= 1 of training "
                "examples to hold out, or null"
            )


@dataclass
class DataConfig:
    """Where the built-in data sets' local files are (SST-2 and CB; INEWS comes from its pip package)."""

    root: str | None = None  # folder holding sst2/ and cb/ (default: $PTUNE_DATA)


@dataclass
class TrainerConfig:
    """The training loop (ptune/training.py) and the runtime it runs on (ptune/runtime.py)."""

    max_steps: int = 300  # optimizer steps
    batch_size: int = 16  # examples per batch (the global batch under torchrun)
    eval_batch_size: int = 64  # examples per evaluation batch
    lr: float = 1e-2  # prompt parameters
    head_lr: float = 1e-3  # the readout head, when there is one
    weight_decay: float = 0.0  # AdamW weight decay of the trained parameters
    warmup_ratio: float = 0.06  # fraction of max_steps with a linear warmup
    schedule: str = "linear"  # linear | cosine | constant (after the warmup)
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    grad_accum: int = 1  # batches per optimizer step
    eval_every: int = 100  # steps between evaluations (the last step is always evaluated)
    early_stopping_patience: int = 0  # evaluations without improvement before stopping (0: off)
    seed: int = 0  # seeds data order, subsets, prompt initialisation, dropout and sampling
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, or on CPUs with AMX/AVX512-BF16) | fp32 | bf16 | fp16
    num_threads: int = 0  # 0: every allowed core
    bucketed: bool = True  # length-bucketed batches
    pad_to_multiple_of: int = 1  # round each batch's width up to a multiple (8, 16): fewer shapes, fewer kernel picks
    log_every: int = 20  # steps between progress lines (and, on CUDA, loss read-backs)
    # none | balanced: the classifier loss weighted by n / (C * count_c) of the training labels (sklearn's
    # "balanced"), so a rare class counts as much as a common one; it lifts macro-F1 on CB's rare neutral class.
    class_weights: str = "none"
    metric: str = "accuracy"  # selects the best checkpoint: accuracy | macro_f1 | mcc | ... (metrics.SELECTABLE)
    tensorboard: bool = False  # same as adding tensorboard to loggers (kept for older configs)
    loggers: list[str] = field(default_factory=list)  # any of csv, tensorboard, mlflow (ptune/tracking.py)
    mlflow_uri: str | None = None  # MLflow tracking URI (default: sqlite:///<outputs>/mlflow.db)
    save_every: int = 100  # resumable state every N steps (0: never)
    resume: bool = False  # continue from <run folder>/resume (hydra.run.dir=RUN, or `ptune train --resume RUN`)
    compile: bool = False  # torch.compile the backbone body (dynamic shapes); pays off on long runs only
    cast_frozen_weights: bool = True  # under bf16/fp16 autocast, keep frozen Linear weights in that dtype
    fuse_projections: bool = True  # one matmul for frozen q/k/v (and gate/up) projections of the same input
    attention_kernel: str = "auto"  # SDPA kernel of training steps: auto (math under CPU bf16/fp16) | default | math
    gradient_checkpointing: bool = False  # recompute the frozen blocks in backward: less memory, ~1/3 more compute
    shard_backbone: bool = False  # torchrun: FSDP2-shard the frozen blocks over the ranks (efficiency/sharding.py)

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "eval_batch_size", "grad_accum", "eval_every", "log_every"):
            _integer("trainer", key, getattr(self, key), 1)
        _integer("trainer", "save_every", self.save_every, 0)
        _integer("trainer", "pad_to_multiple_of", self.pad_to_multiple_of, 1, 512)
        _integer("trainer", "seed", self.seed, 0, 2**32 - 1)  # numpy.random.seed accepts only this range
        _integer("trainer", "num_threads", self.num_threads, 0, 4096)  # more is a typo, not a machine
        _integer("trainer", "early_stopping_patience", self.early_stopping_patience, 0)
        for key in ("lr", "head_lr"):
            _number("trainer", key, getattr(self, key), 0.0, low_open=True)
        _number("trainer", "warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _number("trainer", "weight_decay", self.weight_decay, 0.0)
        _number("trainer", "grad_clip", self.grad_clip, 0.0)
        _choice("trainer", "schedule", self.schedule, ("linear", "cosine", "constant"))
        _choice("trainer", "class_weights", self.class_weights, ("none", "balanced"))
        _choice("trainer", "device", self.device, ("auto", "cpu", "cuda"))
        _choice("trainer", "precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        from .metrics import SELECTABLE
        from .tracking import LOGGERS

        _choice("trainer", "metric", self.metric, SELECTABLE)
        for logger in self.loggers:
            _choice("trainer", "loggers", logger, LOGGERS)
        _choice("trainer", "attention_kernel", self.attention_kernel, ("auto", "default", "math"))
        switches = ("bucketed", "tensorboard", "resume", "compile", "cast_frozen_weights", "fuse_projections")
        for key in (*switches, "gradient_checkpointing", "shard_backbone"):
            _choice("trainer", key, getattr(self, key), (True, False))


@dataclass
class SearchConfig:
    """`ptune search` (ptune/commands/search.py): a Bayesian (TPE) search over training overrides."""

    experiment: str | None = None  # the experiment every trial starts from (+experiment=NAME)
    n_trials: int = 20  # finished trials (failed ones count) after which the search stops
    direction: str = "maximize"  # maximize | minimize the trials' best_metric
    seed: int = 0  # the TPE sampler's seed
    n_startup_trials: int = 5  # random trials before TPE models the results
    dir: str | None = None  # the search folder (default outputs/search/<name>/<timestamp>)
    resume: bool = False  # continue the study in search.dir (a rerun into the same folder also continues)
    overrides: list[str] = field(default_factory=list)  # given to every trial, e.g. dataset.validation=0.1
    # override key -> {type: float|int|categorical, low, high, log, step, choices}
    params: dict[str, Any] = field(default_factory=dict)
    # none | median | successive_halving | hyperband: Optuna's pruner, told each evaluation's held-out metric
    # (trial.report at the training step), stops a trial that trails the others; median by default (docs/search.md)
    pruner: str = "median"
    # the pruner's own keyword arguments (Optuna's names and defaults), e.g. {n_startup_trials: 5, n_warmup_steps: 0}
    pruner_args: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None  # seconds of this `ptune search` after which no trial starts (a first always runs)
    max_examples: int | None = None  # training examples summed over the study's trials: no trial starts once spent
    confirm_seeds: int = 0  # retrain the best trial on all of train (no hold-out) with seeds 0..N-1; report dev
    # trial processes run at once on this machine (`ptune search --worker DIR` each); trainer.num_threads (or every
    # allowed core) is split between them, so the search uses as many threads in all as one process would
    workers: int = 1
    # where the study lives: null (<dir>/optuna.db, SQLite), journal (<dir>/optuna.journal, Optuna's journal file:
    # for a shared file system), journal:///PATH, or any SQLAlchemy URL Optuna takes (postgresql://..., mysql://...)
    storage: str | None = None
    heartbeat_interval: int = 30  # seconds between a running trial's heartbeats in the study
    # seconds without a heartbeat after which another worker fails the trial (its worker died: SIGKILL, lost node)
    grace_period: int = 120
    retries: int = 0  # times a trial whose worker died is run again with the same values (a new trial number)

    def __post_init__(self) -> None:
        _integer("search", "n_trials", self.n_trials, 1)
        _choice("search", "pruner", self.pruner, tuple(PRUNER_ARGS))
        if not isinstance(self.pruner_args, dict):
            raise PtuneError(f"search.pruner_args must map argument names to values, got {self.pruner_args!r}")
        unknown = sorted(set(self.pruner_args) - set(PRUNER_ARGS[self.pruner]))
        if unknown:
            raise PtuneError(f"search.pruner_args.{unknown[0]} is not an argument of search.pruner={self.pruner}: "
                             f"valid are {', '.join(PRUNER_ARGS[self.pruner]) or 'none'}")
        if self.timeout is not None:
            _number("search", "timeout", self.timeout, 0.0, low_open=True)
        _integer("search", "max_examples", self.max_examples, 1, none_ok=True)
        _integer("search", "confirm_seeds", self.confirm_seeds, 0, 100)
        _integer("search", "n_startup_trials", self.n_startup_trials, 0)
        _integer("search", "seed", self.seed, 0, 2**32 - 1)
        _choice("search", "direction", self.direction, ("maximize", "minimize"))
        _choice("search", "resume", self.resume, (True, False))
        _integer("search", "workers", self.workers, 1, 1024)
        _integer("search", "heartbeat_interval", self.heartbeat_interval, 1)
        _integer("search", "grace_period", self.grace_period, 1)
        _integer("search", "retries", self.retries, 0)
        if self.grace_period <= self.heartbeat_interval:
            raise PtuneError(f"search.grace_period={self.grace_period} must exceed search.heartbeat_interval="
                             f"{self.heartbeat_interval}: a live worker's trial would be failed between two beats")
        if self.storage is not None and not (
                isinstance(self.storage, str) and (self.storage == "journal" or "://" in self.storage)):
            raise PtuneError(f"search.storage={self.storage!r} is not valid: use null (SQLite in the search folder), "
                             "journal, journal:///PATH or a database URL such as postgresql://user@host/db")
        if not isinstance(self.params, dict):
            raise PtuneError(
                f"search.params must map override keys to distributions, e.g. {{trainer.lr: {{type: float, low: "
                f"0.001, high: 0.1, log: true}}}}; got a {type(self.params).__name__}"
            )
        for key, spec in self.params.items():
            _search_param(f"search.params.{key}", spec)


# search.pruner -> the keyword arguments of its Optuna class (MedianPruner, SuccessiveHalvingPruner, HyperbandPruner)
PRUNER_ARGS = {"none": (), "median": ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
               "successive_halving": ("min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count"),
               "hyperband": ("min_resource", "max_resource", "reduction_factor", "bootstrap_count")}

SEARCH_PARAM_KEYS = {"categorical": ("type", "choices"), "int": ("type", "low", "high", "log", "step"),
                     "float": ("type", "low", "high", "log", "step")}


def _search_param(name: str, spec: Any) -> None:
    """One search distribution, checked as Optuna's Int/Float/CategoricalDistribution would take it, so that a bad
    space is refused in one line before the search writes anything (Optuna's own ValueError is a traceback)."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    _choice(name, "type", kind, tuple(SEARCH_PARAM_KEYS))
    unknown = sorted(set(spec) - set(SEARCH_PARAM_KEYS[kind]))
    if unknown:
        raise PtuneError(f"{name}.{unknown[0]} is not a {kind} option: valid are {', '.join(SEARCH_PARAM_KEYS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise PtuneError(f"{name}.choices={choices!r} must be a non-empty list of the values to try")
        bad = [c for c in choices if c is not None and not isinstance(c, bool | int | float | str)]
        if bad:
            raise PtuneError(f"{name}.choices: {bad[0]!r} is not a number, string, boolean or null")
        return
    number = int if kind == "int" else int | float
    lo, hi, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    ok = all(isinstance(v, number) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi))
    if not (ok and lo < hi):
        what = "integers" if kind == "int" else "numbers"
        raise PtuneError(f"{name}: low={lo!r} and high={hi!r} must be finite {what} with low < high")
    _choice(name, "log", log, (True, False))
    if log and lo <= 0:
        raise PtuneError(f"{name}: log=true needs low > 0 (got {lo!r})")
    if step is not None:
        if not (isinstance(step, number) and not isinstance(step, bool) and math.isfinite(step) and step > 0):
            raise PtuneError(f"{name}.step={step!r} must be a {'positive integer' if kind == 'int' else 'number > 0'}, "
                             "or left out")
        if log and (kind == "float" or step != 1):
            raise PtuneError(f"{name}: log=true samples on a log scale and takes no step (got step={step!r}): "
                             "drop one of them")


# Keys whose default does not do what ptune did before the key existed: a resume state saved by that older ptune
# lacks the key and is read as having this value (resume.check_same_config); every other added key is read at its
# default. dataset.validation_stratify: hold-outs were plain random draws before it.
BEHAVIOUR_BEFORE_KEY: dict[str, Any] = {"dataset.validation_stratify": False}

SCHEMAS: dict[str, type] = {
    "backbone": BackboneConfig,
    "template": TemplateConfig,
    "dataset": DatasetConfig,
    "trainer": TrainerConfig,
}


def config_dir() -> Path:
    """The conf/ tree: beside the package in a source checkout, or shipped inside it."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "conf", here / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise PtuneError("cannot find ptune's conf/ folder next to the package")


def compose(overrides: list[str]):
    """Compose the config as Hydra would, to validate a single run's overrides before starting it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return hydra_compose(config_name="config", overrides=label_words_overrides(overrides),
                             return_hydra_config=True)


LABEL_WORDS = "template.label_words"


def label_words_overrides(overrides: list[str]) -> list[str]:
    """Make ``template.label_words={bad:[awful],good:[great]}`` replace the template's label words wholesale.

    Hydra merges a dict override into the dict it overrides, so the template's own classes stayed and new class
    names were refused (the composed config is in struct mode); ``~template.label_words`` cannot delete a schema
    field either. A dict given to ``template.label_words`` (or ``+template.label_words``) therefore becomes
    ``template.label_words=???`` (the words cleared) then ``++template.label_words=<dict>`` (set into the cleared
    node, new keys allowed), and ``~template.label_words`` becomes ``template.label_words=null``. ``++`` and
    single-class overrides (``template.label_words.positive=[fine]``) keep Hydra's merge. Idempotent."""
    out: list[str] = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if key == f"~{LABEL_WORDS}":
            out.append(f"{LABEL_WORDS}=null")
        elif key in (LABEL_WORDS, f"+{LABEL_WORDS}") and eq and value.lstrip().startswith("{"):
            out += [f"{LABEL_WORDS}=???", f"++{LABEL_WORDS}={value}"]
        else:
            out.append(item)
    return out


def register() -> None:
    """Put every group's schema into Hydra's ConfigStore as ``<group>/<group>_schema`` (idempotent), before any
    composition; the methods' schemas come from the tuner registry."""
    from hydra.core.config_store import ConfigStore

    from .tuners import METHODS

    cs = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)
    for name, tuner in METHODS.items():
        cs.store(group="method", name=f"{name}_schema", node=tuner.config_class)
    cs.store(group="hparams_search", name="hparams_search_schema", node=SearchConfig, package="search")


def validate(cfg: DictConfig) -> None:
    """Check every group's values (ranges, choices, unknown keys) before a run writes anything."""
    from .readouts import selectable
    from .tuners import method_config

    checked = {group: section(cfg, group) for group in SCHEMAS}
    method_config(OmegaConf.to_container(cfg.method, resolve=True))
    readout, metric = checked["template"].readout, checked["trainer"].metric
    if metric not in selectable(readout):  # else a KeyError at the first evaluation, with metrics.jsonl written
        raise PtuneError(f"trainer.metric={metric!r} is not reported by template.readout={readout}: use one of "
                         f"{', '.join(selectable(readout))}")


def section(cfg: DictConfig, group: str, schema: type | None = None) -> Any:
    """One group of a config as its checked schema object. Works on Hydra's structured configs and on plain ones
    (a checkpoint's saved config): an unknown key is refused with the group's valid keys."""
    schema = schema or SCHEMAS[group]
    raw = OmegaConf.to_container(cfg[group], resolve=True) if isinstance(cfg[group], DictConfig) else dict(cfg[group])
    valid = [f.name for f in fields(schema)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise PtuneError(f"{group}.{unknown[0]} is not a {group} option: valid are {', '.join(valid)}")
    missing = [k for k, v in raw.items() if v == "???"]
    if missing:
        raise PtuneError(f"{group}.{missing[0]} must be set (e.g. {group}.{missing[0]}=...)")
    return schema(**raw)


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    return section(cfg, "trainer")


def explain_composition_error(exc: BaseException) -> str:
    """One line for a Hydra composition failure: the bad key or value and what would be valid, instead of Hydra's
    'Error merging override ...' and a multi-line OmegaConf report."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    unknown_key = (ConfigKeyError, ConfigAttributeError)

    seen = exc
    while seen is not None:
        if isinstance(seen, (*unknown_key, ValidationError)) and getattr(seen, "full_key", None):
            key = str(seen.full_key)
            group = key.split(".", 1)[0]
            if isinstance(seen, unknown_key):
                valid = _group_keys(seen, group)
                return f"{key} is not a {group} option" + (f": valid are {', '.join(valid)}" if valid else "")
            return _schema_message(seen) or f"{key}: {one_line(seen.msg)}"
        seen = seen.__cause__ or seen.__context__
    return one_line(exc)


def _schema_message(err: BaseException) -> str | None:
    """A value of the wrong type, worded by the schema's own check (its range or choices): build the schema with
    that one value and let ``__post_init__`` say what is valid."""
    schema, key = getattr(err, "object_type", None), getattr(err, "key", None)
    if not (isinstance(schema, type) and hasattr(schema, "__dataclass_fields__")) or key not in fields_of(schema):
        return None
    try:
        schema(**{**OmegaConf.to_container(OmegaConf.structured(schema)), key: getattr(err, "value", None)})
    except PtuneError as exc:
        return str(exc) if f".{key}=" in str(exc) else None
    except Exception:  # noqa: BLE001 - a schema with other required fields: fall back to OmegaConf's words
        return None
    return None


def fields_of(schema: type) -> list[str]:
    return [f.name for f in fields(schema)]


def _group_keys(err: BaseException, group: str) -> list[str]:
    obj = getattr(err, "object_type", None)
    if isinstance(obj, type) and hasattr(obj, "__dataclass_fields__"):
        return list(obj.__dataclass_fields__)
    schema = {**SCHEMAS, "data": DataConfig}.get(group)
    return [f.name for f in fields(schema)] if schema else []


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``key=value`` overrides applied to a saved config (eval, predict, export): a key it lacks needs ``+``."""
    for item in overrides:
        key, _, value = item.partition("=")
        if not key or OmegaConf.select(cfg, key.lstrip("+"), default="__missing__") == "__missing__":
            if not key.startswith("+"):
                raise PtuneError(
                    f"override {item!r} names no key of the saved config (prefix + to add a new key)"
                )
        OmegaConf.update(cfg, key.lstrip("+"), override_value(item) if value else None, merge=True)
    return cfg


def parse_overrides(items: list[str]) -> list[Any]:
    """Hydra's reading of ``key=value`` override strings (its ``Override`` objects: key, value, sweep or delete):
    the one place ptune calls Hydra's override grammar. A string it refuses is a one-line PtuneError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return list(OverridesParser.create().parse_overrides(list(items)))
    except Exception as exc:  # noqa: BLE001 - Hydra's grammar errors come in several types
        named = f"override {items[0]!r} is" if len(items) == 1 else f"overrides {' '.join(map(repr, items))} are"
        raise PtuneError(f"{named} not valid: {one_line(exc)}") from None


def override_value(item: str) -> Any:
    """The value of ``key=value`` typed as ``ptune train`` types it (Hydra's override grammar): ``5`` is an int,
    ``[a,b]`` a list. Wrapping the raw text in OmegaConf kept every value a string, so ``max_eval_samples=5``
    reached the code as "5"."""
    value = parse_overrides([item])[0].value()
    if not isinstance(value, str | int | float | bool | list | dict | type(None)):
        raise PtuneError(f"override {item!r} is a sweep or function: give one value")
    return value
