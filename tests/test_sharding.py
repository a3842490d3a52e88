"""trainer.shard_backbone=true: the frozen blocks FSDP2-sharded over 2 torchrun ranks (CPU, gloo) train the same
prompt as one process, with gradient checkpointing on, with NF4 blocks, with a rank left without rows, and with a
folded (prefix) checkpoint evaluated at the end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ptune.config import TrainerConfig
from ptune.efficiency.memory import check_combination
from ptune.errors import PtuneError

from .test_cli import csv_overrides, ptune
from .test_ddp import torchrun

COMMON = [
    "trainer.batch_size=5",
    "trainer.max_steps=6",
    "trainer.eval_every=3",
    "trainer.save_every=0",
    "trainer.precision=fp32",
    "trainer.lr=0.05",
    "trainer.head_lr=0.05",
    "trainer.gradient_checkpointing=true",
    "trainer.shard_backbone=true",
]
CASES = {
    # 21 rows in batches of 5: one batch holds a single row, so one rank gets none (and runs one at weight 0).
    "bert-head-prefix": ["template=sst2_head", "template.head_dropout=0.0", "method=prefix",
                         "dataset.max_train_samples=21"],
    # a causal LM with NF4 blocks and a soft prompt (its shared-prefix shortcut is off under sharding)
    "llama-nf4-soft": ["template=sst2_lm", "method=soft_prompt", "backbone.quantize=nf4"],
    # bf16 autocast forced on (what precision=auto picks on GPUs): checkpointed recomputation inside FSDP2's hooks
    "bert-head-prefix-bf16": ["template=sst2_head", "template.head_dropout=0.0", "method=prefix",
                              "trainer.precision=bf16"],
}
# Two ranks each sum half the batch: under bf16 autocast the roundings differ by a few bf16 steps.
TOL = {"bert-head-prefix-bf16": 2e-2}


def _overrides(tiny_models, tiny_csv, case: str) -> list[str]:
    base = csv_overrides(tiny_models, tiny_csv)
    if case.startswith("llama"):
        base = [f"backbone.name={tiny_models['llama']}" if o.startswith("backbone.name=") else o for o in base]
        base = [o for o in base if not o.startswith("template=")]
    return [*base, *COMMON, *CASES[case]]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_backbone_on_two_ranks_equals_single_process(tiny_models, tiny_csv, tmp_path, case):
    overrides = _overrides(tiny_models, tiny_csv, case)
    sharded_dir, single_dir = tmp_path / "sharded", tmp_path / "single"
    res = torchrun("train", *overrides, f"hydra.run.dir={sharded_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    single = ptune("train", *overrides, f"hydra.run.dir={single_dir}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]

    results = json.loads((sharded_dir / "results.json").read_text())
    ref = json.loads((single_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == ref["steps"] == 6
    a = load_file(str(sharded_dir / "checkpoint" / "prompt.safetensors"))
    b = load_file(str(single_dir / "checkpoint" / "prompt.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("method.") for k in a)
    for k in a:
        if case in TOL:  # relative to the tensor's norm (measured: 0.15-0.45% after 6 steps)
            assert float((a[k] - b[k]).norm() / b[k].norm()) < TOL[case], k
        else:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    if case not in TOL:
        assert abs(ref["metrics"]["accuracy"] - results["metrics"]["accuracy"]) < 1e-6
    metrics = [json.loads(x) for x in (sharded_dir / "metrics.jsonl").read_text().splitlines()]
    ref_metrics = [json.loads(x) for x in (single_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6]
    for m, r in zip(metrics, ref_metrics, strict=True):
        assert abs(m["loss"] - r["loss"]) < TOL.get(case, 1e-5)


def test_combinations_that_do_not_work_are_one_line_errors():
    with pytest.raises(PtuneError, match="trainer.compile=true does not combine with trainer.gradient_checkpointing"):
        check_combination(TrainerConfig(compile=True, gradient_checkpointing=True), "none", 1)
    with pytest.raises(PtuneError, match="trainer.compile=true does not combine with backbone.quantize=nf4"):
        check_combination(TrainerConfig(compile=True), "nf4", 1)
    with pytest.raises(PtuneError, match="backbone.quantize=int8 cannot be sharded"):
        check_combination(TrainerConfig(shard_backbone=True), "int8", 2)
    check_combination(TrainerConfig(shard_backbone=True, gradient_checkpointing=True), "nf4", 2)
    check_combination(TrainerConfig(shard_backbone=True), "int8", 1)  # one process shards nothing
    with pytest.raises(PtuneError, match="trainer.shard_backbone='yes' is not valid: use one of true, false"):
        TrainerConfig(shard_backbone="yes")
