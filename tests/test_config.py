"""Every experiment composes, names valid groups, and builds valid method/trainer configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ptune.config import compose, config_dir, trainer_config
from ptune.errors import PtuneError
from ptune.tuners import method_config

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def test_experiments_exist():
    for name in ("sst2_soft", "sst2_ptv1", "sst2_ptv2", "sst2_prefix", "sst2_smollm2_soft", "inews_mt5_soft"):
        assert name in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = compose([f"+experiment={name}"])
    assert cfg.experiment_name == name
    method_config(OmegaConf.to_container(cfg.method, resolve=True))
    trainer_config(cfg)
    for key in ("backbone.name", "dataset.name", "template.readout", "trainer.max_steps"):
        assert OmegaConf.select(cfg, key) not in (None, "???"), key


def test_default_job_config():
    cfg = compose([])
    assert cfg.dataset.name == "inews" and cfg.backbone.name == "gemma3-270m"
    assert cfg.method.name == "ptuning_v2" and cfg.method.prompt_length == 8


def test_data_root_from_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PTUNE_DATA", str(tmp_path))
    assert compose([]).data.root == str(tmp_path)


@pytest.mark.parametrize(
    "cfg,needle",
    [
        ({"name": "soft_prompt", "prompt_length": -1}, "-1"),
        ({"name": "soft_prompt", "init": "zeros"}, "zeros"),
        ({"name": "ptuning_v1", "encoder": "gru"}, "gru"),
        ({"name": "prefix", "prefix_projection": 0}, "prefix_projection"),
        ({"name": "ptuning_v2", "dropout": 1.5}, "dropout"),
        ({"name": "ptuning_v2", "bogus": 1}, "bogus"),
        ({"name": "lora"}, "lora"),
    ],
)
def test_method_config_validated_on_creation(cfg, needle):
    with pytest.raises(PtuneError, match=needle):
        method_config(cfg)
