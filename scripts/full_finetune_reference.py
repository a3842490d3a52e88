"""Reference point for deep prompts: full fine-tuning of every backbone weight on the same task.

Trains the packaged MiniLM encoder (all 22.7M parameters) with the same mean-pooled linear head, data, max
length and batch size as `+experiment=sst2_ptv2` (or `cb_ptv2` with --dataset cb), then prints dev accuracy,
macro-F1 and per-class F1 after the last step and, with --eval-every, at every evaluation (the best of which is
what a prompt run's kept checkpoint reports). SST-2, 600 steps (the reference protocol): 0.8693 on 2 cores in
2 min 42 s. CB's figures: docs/results/accuracy.md.

    python scripts/full_finetune_reference.py --data-root ../shared/data --steps 600
    python scripts/full_finetune_reference.py --data-root ../shared/data --dataset cb --steps 300 --batch-size 16 \
        --max-length 160 --eval-every 50
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
from ptune.metrics import classification_metrics
from ptune.readouts import HeadReadout
from ptune.template import TemplateRenderer, parse_template

TEMPLATES = {"sst2": "{text_a}", "cb": "{text_a} [SEP] {text_b}"}  # as conf/template/{sst2,cb}_head.yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--dataset", choices=sorted(TEMPLATES), default="sst2")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate dev every N steps (0: at the end only)")
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
    renderer = TemplateRenderer(parse_template(TEMPLATES[args.dataset]), bb.tokenizer, "none", args.max_length)
    ds = {"name": args.dataset}
    splits = {s: load_split(ds, s, args.data_root) for s in ("train", "dev")}
    enc = {
        s: Encoded([renderer.render(e).input_ids for e in sp.examples], [0] * len(sp.labels), sp.labels)
        for s, sp in splits.items()
    }
    label_names = splits["train"].label_names
    head = HeadReadout(model.config.hidden_size, len(label_names), "mean", 0.1)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 36, max(0.0, 1 - s / args.steps)))
    rng = random.Random(args.seed)
    lengths = [len(x) for x in enc["train"].input_ids]
    batches: list[list[int]] = []
    pad = bb.tokenizer.pad_token_id
    dev = enc["dev"]

    def evaluate() -> dict:
        model.eval()
        head.eval()
        logits = []
        with torch.inference_mode():
            for idx in eval_batches([len(x) for x in dev.input_ids], 64):
                b = collate(dev, idx, pad, False)
                hidden = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                logits.append((idx, head(hidden, b["attention_mask"]).float()))
        model.train()
        head.train()
        ordered = torch.empty(len(dev.labels), len(label_names))
        for idx, chunk in logits:
            ordered[torch.as_tensor(idx)] = chunk
        m = classification_metrics(ordered, list(dev.labels), len(label_names), label_names)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                "f1": {k: round(v["f1"], 4) for k, v in m["per_class"].items()}}

    evals = []
    train_s = 0.0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
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
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            train_s += time.perf_counter() - start
            evals.append({"step": step, **evaluate()})
            start = time.perf_counter()
    train_s += time.perf_counter() - start
    final = evaluate()
    evals.append({"step": args.steps, **final})
    result = {
        "backbone": args.backbone,
        "dataset": args.dataset,
        "seed": args.seed,
        "trainable_params": sum(p.numel() for p in params),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "dev_accuracy": final["accuracy"],
        "dev_macro_f1": final["macro_f1"],
        "dev_per_class_f1": final["f1"],
        "best_macro_f1_eval": max(evals, key=lambda e: e["macro_f1"]),
        "evals": evals,
        "train_examples_per_s": args.steps * args.batch_size / train_s,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
