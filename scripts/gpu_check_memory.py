#!/usr/bin/env python
"""Issue 15's correctness checks on a CUDA device (``scripts/gpu_check_memory.sh`` runs it on a GPU host).

The CPU test suite covers the same ground (tests/test_checkpointing.py, test_quantize.py, test_sharding.py), but
its fixtures need the packaged tiny BERT's tokenizer, which a GPU host lacks; this script builds its tiny models
from configs with any BERT tokenizer folder (the GPU bundle's minilm/) and checks what only CUDA can show:

1. checkpointing: loss and prompt gradients equal with and without ``trainer.gradient_checkpointing`` for every
   method on an encoder, a seq2seq and a causal model, on CUDA (autograd runs backward on its own device thread
   there, where the deep-prompt context variable was never set: the recomputation must carry it over);
2. quantisation: ``backbone.quantize=int8|nf4`` weights quantised on the CPU as ptune loads them, moved to CUDA
   with ``.to(device)``, give exactly the dequantised weights' logits there, and train the prompt under bf16
   autocast;
3. sharding, when 2 or more GPUs are visible: the shell script trains with ``trainer.shard_backbone=true`` under
   torchrun (NCCL) and in one process on the tiny Llama that ``--write-model DIR`` saves, and ``--compare A B``
   compares the two checkpoints.

    python scripts/gpu_check_memory.py --tokenizer .gpu-bundle/minilm --out results.json [--device cuda]
    python scripts/gpu_check_memory.py --tokenizer .gpu-bundle/minilm --write-model /tmp/tiny-llama
    python scripts/gpu_check_memory.py --compare RUN_A RUN_B
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

METHODS = ["soft_prompt", "ptuning_v1", "ptuning_v2", "prefix"]
TEMPLATES = {  # family -> (plain template, P-tuning v1 template)
    "encoder": ("{text_a} It was {mask}.", "{soft:2} {text_a} {soft} It was {mask}."),
    "seq2seq": ("{text_a} It was {mask}.", "{soft:2} {text_a} {soft} It was {mask}."),
    "causal": ("{text_a} It was {mask}", "{soft:2} {text_a} {soft:2} It was {mask}"),
}
SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish ,",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
]


def tiny_model(kind: str, vocab: int):
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    if kind == "bert":
        return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=128))
    if kind == "t5":
        return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                   num_heads=4, decoder_start_token_id=0))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128))


FAMILY_OF = {"bert": "encoder", "t5": "seq2seq", "llama": "causal"}


def make_task(kind: str, method: str, tokenizer_dir: str, quantize: str = "none"):
    """A ptune task around a tiny random model, through ptune's own build path (the model given as the backbone,
    quantised on the CPU as ``load_backbone`` does)."""
    from transformers import AutoTokenizer

    from ptune.backbone import Backbone, detect_family
    from ptune.build import build_task
    from ptune.config import compose
    from ptune.efficiency.quantize import quantize_backbone

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model(kind, len(tok)).requires_grad_(False).eval()
    model.config.pad_token_id = tok.pad_token_id
    quantize_backbone(model, quantize, work_device=torch.device("cpu"))
    family = detect_family(model.config)
    backbone = Backbone(model=model, tokenizer=tok, family=family, has_lm_head=True, identity={"name": kind})
    cfg = compose([f"method={method}", "dataset=csv", "backbone=hf", "backbone.name=synthetic"])
    OmegaConf.set_struct(cfg, False)
    cfg.method.prompt_length = 3
    cfg.backbone.max_length = 64
    plain, v1 = TEMPLATES[FAMILY_OF[kind]]
    cfg.template = OmegaConf.create({
        "text": v1 if method == "ptuning_v1" else plain,
        "label_words": {"negative": ["terrible"], "positive": ["great"]},
    })
    del cfg["hydra"]
    return build_task(cfg, ["negative", "positive"], 0, backbone=backbone)


def batch(task, device):
    from ptune.batching import collate
    from ptune.build import encode

    data = encode(task, [{"text_a": s} for s in SENTENCES], [i % 2 for i in range(len(SENTENCES))])
    b = collate(data, list(range(len(SENTENCES))), task.model.pad_id, task.left_pad)
    return {k: v.to(device) for k, v in b.items()}


def loss_and_grads(task, b, amp=None):
    from ptune.runtime import autocast

    model = task.model
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast(b["input_ids"].device, amp):
        out = model(b["input_ids"], b["attention_mask"], b["answer_pos"])
    loss = torch.nn.functional.cross_entropy(out.float(), b["labels"])
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.trainable_parameters()]


def check_checkpointing(tokenizer_dir: str, device: torch.device) -> list[dict]:
    from ptune.efficiency.activation_checkpointing import enable_gradient_checkpointing

    rows = []
    for kind in ("bert", "t5", "llama"):
        for method in METHODS:
            task = make_task(kind, method, tokenizer_dir)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in task.model.trainable_parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
            task.model.to(device)
            b = batch(task, device)
            loss, grads = loss_and_grads(task, b)
            enable_gradient_checkpointing(task.model.backbone)
            loss_c, grads_c = loss_and_grads(task, b)
            dl = float((loss - loss_c).abs())
            pairs = zip(grads, grads_c, strict=True)
            dg = max(float((a - c).abs().max() / a.abs().max().clamp_min(1e-12)) for a, c in pairs)
            rows.append({"check": "checkpointing", "kind": kind, "method": method, "loss_diff": dl,
                         "grad_rel_diff": dg, "ok": dl < 1e-5 and dg < 1e-4})
    return rows


def _dequantized(w):
    data = w.data
    return data.get_original_weight() if hasattr(data, "get_original_weight") else data.dequantize()


def check_quantize(tokenizer_dir: str, device: torch.device) -> list[dict]:
    from ptune.efficiency.frozen import prepare_frozen_backbone
    from ptune.efficiency.quantize import is_quantized

    rows = []
    for kind in ("bert", "t5", "llama"):
        ref = make_task(kind, "ptuning_v2", tokenizer_dir)
        for mode in ("int8", "nf4"):
            task = make_task(kind, "ptuning_v2", tokenizer_dir, quantize=mode)
            task.model.tuner.load_state_dict(ref.model.tuner.state_dict())
            task.model.to(device)  # quantised on the CPU, moved as run_training moves it
            moved = all(p.device.type == device.type for p in task.model.backbone.parameters())
            quantized = {n: p for n, p in task.model.backbone.named_parameters() if is_quantized(p)}
            b = batch(task, device)
            task.model.eval()
            with torch.no_grad():
                got = task.model(b["input_ids"], b["attention_mask"], b["answer_pos"])
            plain = make_task(kind, "ptuning_v2", tokenizer_dir)
            plain.model.tuner.load_state_dict(ref.model.tuner.state_dict())
            with torch.no_grad():
                for n, p in quantized.items():
                    plain.model.backbone.get_parameter(n).copy_(_dequantized(p).cpu())
            plain.model.to(device).eval()
            with torch.no_grad():
                want = plain.model(b["input_ids"], b["attention_mask"], b["answer_pos"])
            exact = float((got - want).abs().max())
            # bf16 autocast training with the frozen-backbone preparation of a real run
            prepare_frozen_backbone(task.backbone.model, torch.bfloat16, cast=True, fuse=True)
            losses = []
            opt = torch.optim.AdamW(task.model.trainable_parameters(), lr=5e-2)
            for _ in range(5):
                loss, _ = loss_and_grads(task, b, amp=torch.bfloat16)
                opt.step()
                losses.append(float(loss))
            still = all(is_quantized(p) for n, p in task.model.backbone.named_parameters() if n in quantized)
            rows.append({"check": "quantize", "kind": kind, "mode": mode, "quantized_weights": len(quantized),
                         "moved_to_device": moved, "max_abs_diff_vs_dequantized": exact, "losses": losses,
                         "still_quantized": still,
                         "ok": moved and bool(quantized) and exact < 1e-4 and losses[-1] < losses[0] and still})
    return rows


def compare(a: str, b: str) -> None:
    from safetensors.torch import load_file

    x = load_file(str(Path(a) / "checkpoint" / "prompt.safetensors"))
    y = load_file(str(Path(b) / "checkpoint" / "prompt.safetensors"))
    diff = max(float((x[k] - y[k]).abs().max()) for k in x) if x.keys() == y.keys() else float("inf")
    ra, rb = (json.loads((Path(p) / "results.json").read_text()) for p in (a, b))
    ok = diff < 1e-4 and ra.get("world_size") == 2 and ra["steps"] == rb["steps"]
    print(json.dumps({"check": "sharding", "max_abs_prompt_diff": diff, "world_size": ra.get("world_size"),
                      "accuracy": [ra["metrics"]["accuracy"], rb["metrics"]["accuracy"]], "ok": ok}))
    sys.exit(0 if ok else 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", help="a BERT tokenizer folder (.gpu-bundle/minilm)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_checks.json")
    ap.add_argument("--write-model", help="save the tiny Llama (with the tokenizer) to this folder and stop")
    ap.add_argument("--compare", nargs=2, help="two run folders whose prompts must agree (sharded vs one process)")
    args = ap.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    if args.write_model:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        model = tiny_model("llama", len(tok))
        model.config.pad_token_id = tok.pad_token_id
        model.save_pretrained(args.write_model)
        tok.save_pretrained(args.write_model)
        return
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons at fp32 precision
    torch.backends.cudnn.allow_tf32 = False
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__}
    for name, fn in (("checkpointing", check_checkpointing), ("quantize", check_quantize)):
        t0 = time.perf_counter()
        try:
            results[name] = fn(args.tokenizer, device)
        except Exception:
            results[name] = [{"check": name, "ok": False, "error": traceback.format_exc()[-3000:]}]
        results[name + "_s"] = time.perf_counter() - t0
        bad = [r for r in results[name] if not r["ok"]]
        print(f"{name}: {len(results[name]) - len(bad)}/{len(results[name])} ok", flush=True)
        for r in bad:
            print("  FAILED", json.dumps(r)[:3000], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    sys.exit(0 if all(r["ok"] for k in ("checkpointing", "quantize") for r in results[k]) else 1)


if __name__ == "__main__":
    main()
