"""Reference point for deep prompts: full fine-tuning of every backbone weight on the same task.

Trains the packaged MiniLM encoder (all 22.7M parameters) with the same mean-pooled linear head, data, max
length and batch size as `+experiment=sst2_ptv2`, for 600 steps (the reference protocol), then prints SST-2 dev
accuracy (0.8693 measured on 2 cores in 2 min 42 s).

    python scripts/full_finetune_reference.py --data-root ../shared/data --steps 600
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from ptune.backbone import load_backbone
from ptune.batching import Encoded, collate, eval_batches, train_batches
from ptune.data import load_split
from ptune.readout import ClsHead
from ptune.template import TemplateRenderer, parse_template


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    bb = load_backbone(args.backbone, with_lm_head=False)
    model = bb.model
    model.requires_grad_(True)
    model.train()
    renderer = TemplateRenderer(parse_template("{text_a}"), bb.tokenizer, "none", args.max_length)
    ds = {"name": "sst2"}
    splits = {s: load_split(ds, s, args.data_root) for s in ("train", "dev")}
    enc = {
        s: Encoded([renderer.render(e).input_ids for e in sp.examples], [0] * len(sp.labels), sp.labels)
        for s, sp in splits.items()
    }
    head = ClsHead(model.config.hidden_size, 2, "mean", 0.1)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 36, max(0.0, 1 - s / args.steps)))
    rng = random.Random(args.seed)
    lengths = [len(x) for x in enc["train"].input_ids]
    batches: list[list[int]] = []
    pad = bb.tokenizer.pad_token_id
    start = time.perf_counter()
    for _ in range(args.steps):
        if not batches:
            batches = train_batches(lengths, args.batch_size, rng, True)
        b = collate(enc["train"], batches.pop(), pad, False)
        hidden = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(hidden, b["attention_mask"]), b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - start
    model.eval()
    head.eval()
    correct = 0
    dev = enc["dev"]
    with torch.inference_mode():
        for idx in eval_batches([len(x) for x in dev.input_ids], 64):
            b = collate(dev, idx, pad, False)
            hidden = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            correct += int((head(hidden, b["attention_mask"]).argmax(-1) == b["labels"]).sum())
    result = {
        "backbone": args.backbone,
        "trainable_params": sum(p.numel() for p in params),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "dev_accuracy": correct / len(dev),
        "train_examples_per_s": args.steps * args.batch_size / train_s,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
