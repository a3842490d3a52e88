"""One schema per config group: every option of every group composes into its schema, defaults live only in the
dataclasses, an unknown key in any group (override or YAML file) is refused with the group's valid keys."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ptune import config
from ptune.config import compose, config_dir
from ptune.errors import PtuneError
from ptune.tuners import METHODS

from .helpers import required_values

GROUPS = ("backbone", "method", "dataset", "template", "trainer")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _schema(group: str, cfg) -> type:
    return METHODS[cfg.method.name].config_class if group == "method" else config.SCHEMAS[group]


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_into_its_schema(group, option):
    cfg = compose([f"{group}={option}", *required_values(group, option)])
    schema = _schema(group, cfg)
    assert OmegaConf.get_type(cfg[group]) is schema, "the YAML file extends its group's schema"
    config.section(cfg, group, schema) if group != "method" else None
    config.validate(cfg)


@pytest.mark.parametrize("name", sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")))
def test_every_experiment_validates(name):
    config.validate(compose([f"+experiment={name}"]))


@pytest.mark.parametrize("group", GROUPS)
def test_unknown_key_in_any_group_is_refused_with_the_valid_keys(group):
    cfg = compose([])
    valid = [f.name for f in fields(_schema(group, cfg))]
    with pytest.raises(Exception) as info:
        compose([f"{group}.no_such_key=1"])
    line = config.explain_composition_error(info.value)
    assert line.startswith(f"{group}.no_such_key is not a {group} option: valid are "), line
    assert all(key in line for key in valid)
    # Hydra's '+' forces the key in: the check before the run refuses it
    with pytest.raises(PtuneError) as refused:
        config.validate(compose([f"+{group}.no_such_key=1"]))
    line = str(refused.value)
    assert line.startswith(f"{group}.no_such_key is not a") and all(key in line for key in valid), line


def test_unknown_key_in_a_yaml_file_is_refused(tmp_path: Path):
    (tmp_path / "template").mkdir()
    (tmp_path / "template" / "mine.yaml").write_text(
        "defaults:\n  - template_schema\n  - _self_\ntext: '{text_a} {mask}'\nlabel_word:\n  a: [x]\n"
    )
    with pytest.raises(Exception) as info:
        compose([f"hydra.searchpath=[file://{tmp_path}]", "template=mine"])
    assert config.explain_composition_error(info.value).startswith("template.label_word is not a template option")
    # a YAML file that does not extend the schema is caught when the group is read
    (tmp_path / "template" / "loose.yaml").write_text("text: '{text_a} {mask}'\nlabel_word:\n  a: [x]\n")
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "template=loose"])
    with pytest.raises(PtuneError, match="template.label_word is not a template option"):
        config.validate(cfg)


def test_a_bad_type_is_named(tmp_path: Path):
    with pytest.raises(Exception) as info:
        compose(["trainer.max_steps=abc"])
    assert config.explain_composition_error(info.value).startswith("trainer.max_steps='abc' must be an integer")


def test_trainer_defaults_live_only_in_the_schema():
    """The trainer YAML restates nothing, so it cannot disagree with TrainerConfig (it once said batch_size 16
    where the dataclass said 32)."""
    text = (config_dir() / "trainer" / "default.yaml").read_text()
    body = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(("#", "-"))]
    assert body == ["defaults:"], body
    assert OmegaConf.to_container(compose([]).trainer) == OmegaConf.to_container(
        OmegaConf.structured(config.TrainerConfig)
    )


@pytest.mark.parametrize("group", ["backbone", "template", "dataset"])
def test_group_files_restate_no_schema_default(group):
    """A group option's YAML sets only what differs from its schema's defaults (one home per default)."""
    defaults = OmegaConf.to_container(OmegaConf.structured(config.SCHEMAS[group]))
    import yaml

    for option in _options(group):
        data = yaml.safe_load((config_dir() / group / f"{option}.yaml").read_text())
        data.pop("defaults")
        same = [k for k, v in data.items() if k in defaults and defaults[k] == v and v != "???"]
        assert not same, f"{group}/{option}.yaml restates defaults {same}"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("trainer.seed=-1", "trainer.seed=-1 must be an integer in [0, 4294967295]"),
        ("trainer.warmup_ratio=1.5", "trainer.warmup_ratio=1.5 must be a number in [0.0, 1.0)"),
        ("trainer.schedule=steps", "trainer.schedule='steps' is not valid: use one of linear, cosine, constant"),
        ("template.truncate=middle", "template.truncate='middle' is not valid"),
        ("backbone.max_length=0", "backbone.max_length=0 must be an integer"),
        ("dataset.max_eval_samples=0", "dataset.max_eval_samples=0 must be an integer >= 1, or null for all"),
    ],
)
def test_values_are_checked_before_a_run(override, needle):
    with pytest.raises(PtuneError) as info:
        config.validate(compose(["+experiment=sst2_soft", override]))
    assert needle in str(info.value)
