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

    name: str = MISSING
    dtype: str = "float32"  # weights as stored in memory: float32 | bfloat16 | float16
    max_length: int = 256  # tokens per input, prompt included (capped by the model's positions)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PtuneError(f"backbone.name={self.name!r} must name a packaged model, a folder or a Hub id")
        _choice("backbone", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _integer("backbone", "max_length", self.max_length, 1, 1 << 20)


@dataclass
class TemplateConfig:
    """How an example becomes the model's input, and how its answer is read."""

    text: str = MISSING  # fields {text_a}, {mask}, soft tokens {soft}, {soft:N}, {soft:"words"}
    readout: str = "verbalizer"  # verbalizer: label words at {mask} | head: a linear head on an encoder
    label_words: dict[str, list[str]] | None = None  # class -> words (verbalizer)
    multi_token: str = "first"  # a label word of several tokens: first | mean | full (causal/seq2seq)
    truncate: str = "tail"  # which end of the longest field is cut: tail | head
    calibrate: bool = False  # contextual calibration (Zhao et al. 2021) against content-free inputs
    pooling: str = "cls"  # head readout: cls | mean
    head_dropout: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise PtuneError("template.text is empty: write e.g. '{text_a} It was {mask}.'")
        _choice("template", "readout", self.readout, ("verbalizer", "head"))
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
    """A built-in data set (sst2, cb, inews) or your own file (csv, tsv, jsonl: the *_file, fields and label keys)."""

    name: str = MISSING
    eval_split: str = "dev"
    max_train_samples: int | None = None  # a seeded random subset (null: all)
    max_eval_samples: int | None = None
    k_shot: int | None = None  # k training examples per class (seeded)
    train_file: str | None = None
    dev_file: str | None = None
    test_file: str | None = None
    fields: dict[str, str | None] = field(default_factory=lambda: {"text_a": "text", "text_b": None})
    label_column: str = "label"
    label_names: list[str] | None = None
    delimiter: str | None = None  # csv: ',' and tsv: a tab unless set

    def __post_init__(self) -> None:
        for key in ("max_train_samples", "max_eval_samples", "k_shot"):
            _integer("dataset", key, getattr(self, key), 1, none_ok=True)


@dataclass
class DataConfig:
    root: str | None = None  # folder holding sst2/ and cb/ (default: $PTUNE_DATA)


@dataclass
class TrainerConfig:
    """The training loop (ptune/train.py) and the runtime it runs on (ptune/runtime.py)."""

    max_steps: int = 300
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 1e-2  # prompt parameters
    head_lr: float = 1e-3  # the readout head, when there is one
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06  # fraction of max_steps with a linear warmup
    schedule: str = "linear"  # linear | cosine | constant (after the warmup)
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    grad_accum: int = 1  # batches per optimizer step
    eval_every: int = 100
    early_stopping_patience: int = 0  # evaluations without improvement before stopping (0: off)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, or on CPUs with AMX/AVX512-BF16) | fp32 | bf16 | fp16
    num_threads: int = 0  # 0: every allowed core
    bucketed: bool = True  # length-bucketed batches
    log_every: int = 20
    metric: str = "accuracy"  # accuracy | macro_f1: selects the best checkpoint
    tensorboard: bool = False  # log loss, lr and dev metrics under <run folder>/tensorboard
    save_every: int = 100  # resumable state every N steps (0: never)
    resume: bool = False  # continue from <run folder>/resume (hydra.run.dir=RUN, or `ptune train --resume RUN`)
    compile: bool = False  # torch.compile the backbone body (dynamic shapes); pays off on long runs only
    cast_frozen_weights: bool = True  # under bf16/fp16 autocast, keep frozen Linear weights in that dtype
    fuse_projections: bool = True  # one matmul for frozen q/k/v (and gate/up) projections of the same input
    attention_kernel: str = "auto"  # SDPA kernel of training steps: auto (math under CPU bf16/fp16) | default | math

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "eval_batch_size", "grad_accum", "eval_every", "log_every"):
            _integer("trainer", key, getattr(self, key), 1)
        _integer("trainer", "save_every", self.save_every, 0)
        _integer("trainer", "seed", self.seed, 0, 2**32 - 1)  # numpy.random.seed accepts only this range
        _integer("trainer", "num_threads", self.num_threads, 0, 4096)  # more is a typo, not a machine
        _integer("trainer", "early_stopping_patience", self.early_stopping_patience, 0)
        for key in ("lr", "head_lr"):
            _number("trainer", key, getattr(self, key), 0.0, low_open=True)
        _number("trainer", "warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _number("trainer", "weight_decay", self.weight_decay, 0.0)
        _number("trainer", "grad_clip", self.grad_clip, 0.0)
        _choice("trainer", "schedule", self.schedule, ("linear", "cosine", "constant"))
        _choice("trainer", "device", self.device, ("auto", "cpu", "cuda"))
        _choice("trainer", "precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _choice("trainer", "metric", self.metric, ("accuracy", "macro_f1"))
        _choice("trainer", "attention_kernel", self.attention_kernel, ("auto", "default", "math"))
        for key in ("bucketed", "tensorboard", "resume", "compile", "cast_frozen_weights", "fuse_projections"):
            _choice("trainer", key, getattr(self, key), (True, False))


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
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


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


def validate(cfg: DictConfig) -> None:
    """Check every group's values (ranges, choices, unknown keys) before a run writes anything."""
    from .tuners import method_config

    for group in SCHEMAS:
        section(cfg, group)
    method_config(OmegaConf.to_container(cfg.method, resolve=True))


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
            return f"{key}: {one_line(seen.msg)}"
        seen = seen.__cause__ or seen.__context__
    return one_line(exc)


def _group_keys(err: BaseException, group: str) -> list[str]:
    obj = getattr(err, "object_type", None)
    if isinstance(obj, type) and hasattr(obj, "__dataclass_fields__"):
        return list(obj.__dataclass_fields__)
    schema = {**SCHEMAS, "data": DataConfig}.get(group)
    return [f.name for f in fields(schema)] if schema else []
