"""Throughput of multi-prompt serving: 4 prompts in mixed batches vs the same prompts one after another.

    python scripts/serving_bench.py [--backbone minilm|cassette-bert] [--data /work/shared/data] [--threads 2]

Four prompt checkpoints on the packaged backbone (soft prompt 20, soft prompt 8 with another template,
P-tuning v2 20, prefix 10; on minilm all read a mean-pooled head, on cassette-bert an MLM verbalizer) are built
with their initial (untrained) values: throughput does not depend on the values. Inputs: the SST-2 dev
sentences. Two scenarios:

* bulk: every prompt scores the whole dev set. "one after another" runs each prompt's own PromptModel through
  ptune's evaluation path (length-sorted batches of B); "mixed" sends all 4 x N requests to one PromptServer,
  whose length-sorted batches of B mix prompts.
* stream: requests arrive in random order, each for a random prompt, and are answered in windows of B arrivals
  (no sorting). "per prompt" splits each window by prompt (up to 4 small forwards); "mixed" runs one forward.

Also checks that mixed and per-prompt class scores agree.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptune.batching import Encoded, collate  # noqa: E402
from ptune.build import build_task, encode  # noqa: E402
from ptune.checkpoint import save_checkpoint  # noqa: E402
from ptune.commands import quiet as _quiet  # noqa: E402
from ptune.config import compose  # noqa: E402
from ptune.data import load_split  # noqa: E402
from ptune.evaluate import predict_logits  # noqa: E402
from ptune.serving import PromptServer  # noqa: E402
from ptune.training import checkpoint_meta  # noqa: E402


def prompt_specs(backbone: str) -> list[tuple[str, list[str]]]:
    common = ["dataset=sst2", "trainer.device=cpu", "trainer.precision=fp32", "backbone.max_length=64"]
    if backbone == "minilm":
        base = ["backbone=minilm", "template=sst2_head", *common]
        return [
            ("soft20", [*base, "method=soft_prompt", "method.prompt_length=20"]),
            ("soft8_tpl", [*base, "method=soft_prompt", "method.prompt_length=8", "template.text='Review: {text_a}'"]),
            ("ptv2_20", [*base, "method=ptuning_v2", "method.prompt_length=20"]),
            ("prefix10", [*base, "method=prefix", "method.prompt_length=10"]),
        ]
    base = ["backbone=cassette_bert", "template=sst2_mlm", *common]
    return [
        ("soft20", [*base, "method=soft_prompt", "method.prompt_length=20"]),
        ("soft8_tpl", [*base, "method=soft_prompt", "method.prompt_length=8", "template.text='{text_a} So: {mask}.'"]),
        ("ptv2_20", [*base, "method=ptuning_v2", "method.prompt_length=20"]),
        ("prefix10", [*base, "method=prefix", "method.prompt_length=10"]),
    ]


def make_checkpoints(backbone: str, root: Path, data_root: str) -> list[Path]:
    paths = []
    for name, overrides in prompt_specs(backbone):
        cfg = compose([*overrides, f"data.root={data_root}"])
        OmegaConf.set_struct(cfg, False)
        del cfg["hydra"]
        task = build_task(cfg, ["negative", "positive"], seed=0)
        out = root / name
        save_checkpoint(out / "checkpoint", task.model, cfg, checkpoint_meta(task, cfg))
        paths.append(out)
    return paths


def timed(fns, repeats: int) -> list[tuple[float, float]]:
    """(best, median) seconds of each function; runs alternate so that load changes hit all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [(min(t), statistics.median(t)) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="minilm", choices=("minilm", "cassette-bert"))
    ap.add_argument("--data", default=os.environ.get("PTUNE_DATA", "/work/shared/data"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N dev sentences (0 = all)")
    args = ap.parse_args()
    _quiet()
    torch.set_num_threads(args.threads)
    sentences = [ex["text_a"] for ex in load_split({"name": "sst2"}, "dev", args.data).examples]
    if args.limit:
        sentences = sentences[: args.limit]
    n, bs = len(sentences), args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_checkpoints(args.backbone, Path(tmp), args.data)
        server = PromptServer([str(p) for p in paths], device="cpu", precision="fp32")
    k = len(server.prompts)
    print(f"backbone {args.backbone}, {k} prompts, {n} SST-2 dev sentences, batch {bs}, {args.threads} threads")

    # ---- bulk
    own = [encode(p.task, [{"text_a": s} for s in sentences], [0] * n) for p in server.prompts]

    def sequential():
        return [
            predict_logits(p.task.model, data, bs, server.device, None, p.task.left_pad)
            for p, data in zip(server.prompts, own, strict=True)
        ]

    requests = [(i, {"text_a": s}) for s in sentences for i in range(k)]
    random.Random(0).shuffle(requests)

    mixed_data = server.encode(requests)  # rendering is outside the timings on both sides

    def mixed():
        return server.score_encoded(mixed_data, batch_size=bs)

    ref = sequential()
    got = mixed()
    diff = max(
        float((s - ref[i][sentences.index(ex["text_a"])]).abs().max()) for (i, ex), s in zip(requests, got, strict=True)
    )
    (t_seq, m_seq), (t_mix, m_mix) = timed([sequential, mixed], args.repeats)
    total = k * n
    print(f"bulk   one after another: {total / t_seq:8.1f} ex/s  (best {t_seq:.2f} s, median {m_seq:.2f} s)")
    print(f"bulk   mixed batches    : {total / t_mix:8.1f} ex/s  (best {t_mix:.2f} s, median {m_mix:.2f} s)")
    print(f"       max |mixed - alone| class score difference: {diff:.2e}")

    # ---- stream: windows of bs arrivals in arrival order
    data = mixed_data
    windows = [list(range(i, min(i + bs, len(requests)))) for i in range(0, len(requests), bs)]

    def stream_mixed():
        with torch.inference_mode():
            for w in windows:
                b = collate(data, w, server.pad_id, server.left_pad)
                server.forward(b["labels"], b["input_ids"], b["attention_mask"], b["answer_pos"])

    def stream_per_prompt():
        with torch.inference_mode():
            for w in windows:
                for i in range(k):
                    rows = [j for j in w if requests[j][0] == i]
                    if rows:
                        sub = Encoded([data.input_ids[j] for j in rows], [data.answer_pos[j] for j in rows], rows)
                        b = collate(sub, list(range(len(rows))), server.pad_id, server.left_pad)
                        server.prompts[i].task.model(b["input_ids"], b["attention_mask"], b["answer_pos"])

    (t_pp, m_pp), (t_sm, m_sm) = timed([stream_per_prompt, stream_mixed], args.repeats)
    print(f"stream per-prompt forwards: {total / t_pp:8.1f} ex/s  (best {t_pp:.2f} s, median {m_pp:.2f} s)")
    print(f"stream mixed forwards     : {total / t_sm:8.1f} ex/s  (best {t_sm:.2f} s, median {m_sm:.2f} s)")


if __name__ == "__main__":
    main()
