"""Generation with a trained prompt against the bare backbone, and decoding speed with and without the cache.

    python scripts/bench_generation.py RUN [--n 200] [--speed-n 16] [--batch-size 16] [key=value ...]

RUN is a run folder of a ``template.readout=generate`` experiment (e.g. ``+experiment=inews_title_ptv2``). Both
rows decode the same dev examples from the same instruction template (``新闻内容：{content}\\n标题：`` for INEWS):
once with the trained prompt, once with the backbone alone (``bare``: no prefixes, no soft tokens), i.e. the
zero-shot model given the same hand-written instruction. Then the first ``--speed-n`` examples are decoded greedily
with the key/value cache and without it (every step re-reads the whole sequence); the texts must be identical,
and tokens/s counts the tokens generated (decoded texts re-encoded). Trailing overrides go to the checkpoint's
config as in ``ptune eval`` (e.g. ``backbone.dtype=float32``, ``data.root=...``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ptune.build import encode
from ptune.generation import evaluate_generation, generate_texts
from ptune.inference import prepare_evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--n", type=int, default=200, help="dev examples scored (ROUGE-L, BLEU, exact match)")
    parser.add_argument("--speed-n", type=int, default=16, help="examples decoded with and without the cache")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    setup = prepare_evaluation(args.run, [*args.overrides, f"dataset.max_eval_samples={args.n}"])
    task, ckpt, split, device, amp = setup.task, setup.ckpt, setup.split, setup.device, setup.amp
    data = encode(task, split.examples, split.labels)
    pm = task.model
    print(f"{ckpt}: {len(data)} dev examples, {pm.tuner.__class__.__name__}, {torch.get_num_threads()} threads")

    rows = {}
    for name, bare in (("prompt", False), ("zero-shot (bare backbone)", True)):
        start = time.perf_counter()
        res = evaluate_generation(pm, data, args.batch_size, device, amp, bare=bare)
        rows[name] = {k: res[k] for k in ("rouge_l", "bleu", "exact_match")} | {"s": time.perf_counter() - start}
        print(f"{name}: ROUGE-L {res['rouge_l']:.4f}  BLEU {res['bleu']:.2f}  exact {res['exact_match']:.4f}")

    few = encode(task, split.examples[: args.speed_n], split.labels[: args.speed_n])
    tok = pm.readout.tokenizer
    speed, texts = {}, {}
    for use_cache in (True, False):
        start = time.perf_counter()
        texts[use_cache] = generate_texts(pm, few, args.batch_size, device, amp, use_cache=use_cache,
                                          strategy="greedy")
        wall = time.perf_counter() - start
        n_tokens = sum(len(tok(t, add_special_tokens=False).input_ids) + 1 for t in texts[use_cache])  # + stop
        speed["cache" if use_cache else "no cache"] = {"tokens": n_tokens, "s": wall, "tokens_per_s": n_tokens / wall}
    same = texts[True] == texts[False]
    for name, s in speed.items():
        print(f"decode {name}: {s['tokens']} tokens in {s['s']:.1f} s = {s['tokens_per_s']:.1f} tokens/s")
    gain = speed["cache"]["tokens_per_s"] / speed["no cache"]["tokens_per_s"]
    print(f"cached and uncached texts identical: {same}; the cache decodes {gain:.1f}x faster")
    print("\nexamples, greedy (reference -> prompt | zero-shot):")
    bare = generate_texts(pm, few, args.batch_size, device, amp, bare=True, strategy="greedy")
    for ex, p, b in list(zip(split.examples, texts[True], bare, strict=False))[:5]:
        print(f"  {ex.get('title', '')!r} -> {p!r} | {b!r}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": str(ckpt), "examples": len(data), "quality": rows, "speed": speed,
                       "cached_equals_uncached": same}, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
