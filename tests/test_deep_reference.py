"""Deep prompts (P-tuning v2, prefix tuning) on BERT, T5, GPT-2 and Llama against a hand-written reference.

The reference runs each transformer layer itself with its own attention: the layer's prompt keys and values are
concatenated in front of the token keys and values (always visible, no position bias), layer by layer, in the
backbone's order of attention sites (BERT: one per layer; T5: encoder self-attention, then per decoder layer its
self- and cross-attention). Only the non-attention parts (embeddings, feed-forward blocks, layer norms, the LM
head, T5's relative position bias) are the backbone's own modules. The reference first reproduces the plain
backbone without prompts, so it is a faithful forward; then ptune's class scores, and the gradient of each layer's
key and value prefix separately, must match it. Prefixes reaching only some layers, keys and values swapped, or a
layer's prefix that receives no gradient all fail here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ptune.batching import collate
from ptune.build import encode

from .helpers import LABELS, SENTENCES, make_cfg, make_task

NEG = torch.finfo(torch.float32).min


def _attend(q, k, v, pk, pv, key_mask, bias=None, scale=1.0):
    """q [B, H, Lq, D], k/v [B, H, Lk, D], prefixes pk/pv [H, P, D] (always visible, zero bias), key_mask [B, Lk]."""
    b = q.shape[0]
    k = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2)
    v = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + F.pad(bias, (pk.shape[1], 0))
    visible = torch.cat([torch.ones(b, pk.shape[1], dtype=torch.bool), key_mask.bool()], 1)
    scores = scores.masked_fill(~visible[:, None, None, :], NEG)
    return scores.softmax(-1) @ v


def _heads(x, h):
    b, n, _ = x.shape
    return x.view(b, n, h, -1).transpose(1, 2)


def _merge(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def bert_reference(mlm, input_ids, mask, prefixes):
    """Last hidden states of a BertForMaskedLM; ``prefixes`` [layers, 2, heads, P, dim]."""
    bert = mlm.bert
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    h = bert.embeddings(input_ids=input_ids, position_ids=positions)
    for i, layer in enumerate(bert.encoder.layer):
        sa = layer.attention.self
        heads = sa.num_attention_heads
        q, k, v = (_heads(lin(h), heads) for lin in (sa.query, sa.key, sa.value))
        ctx = _attend(q, k, v, prefixes[i, 0], prefixes[i, 1], mask, scale=q.shape[-1] ** -0.5)
        a = layer.attention.output(_merge(ctx), h)
        h = layer.output(layer.intermediate(a), a)
    return h


def t5_reference(model, input_ids, mask, prefixes):
    """First decoder step's vocabulary logits [B, V] of a T5ForConditionalGeneration; ``prefixes`` per site in
    the order encoder self-attention (per layer), then per decoder layer self- and cross-attention."""
    enc, dec = model.encoder, model.decoder
    sites = iter(prefixes)
    b, n = input_ids.shape

    def attention(attn, x, kv, key_mask, bias):
        heads = attn.n_heads
        pk, pv = next(sites)
        ctx = _attend(_heads(attn.q(x), heads), _heads(attn.k(kv), heads), _heads(attn.v(kv), heads), pk, pv,
                      key_mask, bias)
        return attn.o(_merge(ctx))

    h = enc.embed_tokens(input_ids)
    enc_bias = enc.block[0].layer[0].SelfAttention.compute_bias(n, n)
    for block in enc.block:
        sa = block.layer[0]
        x = sa.layer_norm(h)
        h = h + attention(sa.SelfAttention, x, x, mask, enc_bias)
        h = block.layer[1](h)
    memory = enc.final_layer_norm(h)

    start = torch.full((b, 1), model.config.decoder_start_token_id or 0, dtype=torch.long)
    h = dec.embed_tokens(start)
    dec_bias = dec.block[0].layer[0].SelfAttention.compute_bias(1, 1)
    for block in dec.block:
        sa, ca = block.layer[0], block.layer[1]
        x = sa.layer_norm(h)
        h = h + attention(sa.SelfAttention, x, x, torch.ones(b, 1), dec_bias)
        h = h + attention(ca.EncDecAttention, ca.layer_norm(h), memory, mask, None)
        h = block.layer[2](h)
    h = dec.final_layer_norm(h)
    if getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings):
        h = h * model.config.d_model**-0.5
    assert next(sites, None) is None, "the reference used fewer sites than there are prefixes"
    return model.lm_head(h)[:, 0]


FAMILY = {"bert": "mlm", "t5": "seq2seq", "gpt2": "causal", "llama": "causal"}


def _task(tiny_models, kind, method):
    task = make_task(make_cfg(tiny_models[kind], method, family=FAMILY[kind], prompt_length=3))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every layer's prefix distinct, and large enough to move a random tiny model's scores
        for p in task.model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g))
    task.model.eval()
    enc = encode(task, [{"text_a": s} for s in SENTENCES], [i % 2 for i in range(len(SENTENCES))])
    return task, collate(enc, list(range(len(enc))), task.model.pad_id, task.left_pad)


def _reference_scores(task, kind, b, prefixes):
    model = task.model
    ids, mask, pos = b["input_ids"], b["attention_mask"], b["answer_pos"]
    reference = {"bert": bert_reference, "t5": t5_reference, **CAUSAL_REFERENCES}[kind]
    return model.read_out(reference(model.backbone, ids, mask, prefixes), mask, pos)


CASES = [("bert", "ptuning_v2"), ("bert", "prefix"), ("t5", "ptuning_v2"), ("t5", "prefix")]


@pytest.mark.parametrize("kind,method", CASES)
def test_deep_prompt_matches_hand_written_attention(tiny_models, kind, method):
    task, b = _task(tiny_models, kind, method)
    model = task.model
    n_sites = model.backbone.config.num_hidden_layers if kind == "bert" else 3 * model.backbone.config.num_layers
    with torch.no_grad():
        prefixes = torch.stack([torch.stack(kv) for kv in model.tuner.deep_prefixes()])[:, :, 0]
        assert prefixes.shape[:2] == (n_sites, 2) and prefixes.shape[3] == 3
        # the reference is a faithful forward: without prompts it reproduces the plain backbone
        empty = prefixes[:, :, :, :0]
        if kind == "bert":
            plain = model.backbone.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            ref = bert_reference(model.backbone, b["input_ids"], b["attention_mask"], empty)
            real = b["attention_mask"].bool()
            torch.testing.assert_close(ref[real], plain.last_hidden_state[real], atol=1e-5, rtol=1e-5)
        else:
            start = torch.full((len(SENTENCES), 1), model.backbone.config.decoder_start_token_id or 0)
            plain = model.backbone(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=start
            ).logits[:, 0]
            ref = t5_reference(model.backbone, b["input_ids"], b["attention_mask"], empty)
            torch.testing.assert_close(ref, plain, atol=1e-5, rtol=1e-5)
        got = model(b["input_ids"], b["attention_mask"], b["answer_pos"])
        want = _reference_scores(task, kind, b, prefixes)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        without = _reference_scores(task, kind, b, empty)
        moved = (got - without).abs().max()
        assert moved > 1e-3, f"the prompt moves the scores by only {moved} (100x the tolerance needed)"


@pytest.mark.parametrize("kind", ["bert", "t5", "gpt2", "llama"])
def test_each_layer_prefix_gets_the_reference_gradient(tiny_models, kind):
    task, b = _task(tiny_models, kind, "ptuning_v2")
    model = task.model
    labels = torch.tensor([i % len(LABELS) for i in range(len(SENTENCES))])
    param = model.tuner.prefix  # [sites, 2, heads, P, dim]: the deep prompt itself
    model.zero_grad()
    F.cross_entropy(model(b["input_ids"], b["attention_mask"], b["answer_pos"]), labels).backward()
    leaf = param.detach().clone().requires_grad_(True)
    F.cross_entropy(_reference_scores(task, kind, b, leaf), labels).backward()
    for site in range(param.shape[0]):
        for j, which in enumerate(("key", "value")):
            want = leaf.grad[site, j]
            assert want.abs().max() > 1e-6, f"site {site} {which}: the reference gradient vanishes"
            torch.testing.assert_close(param.grad[site, j], want, atol=1e-6, rtol=1e-4, msg=f"site {site} {which}")


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_per_row_prefix_mask_hides_each_rows_padding_slots(mask_kind):
    """Mixed batches (multi-prompt serving): rows whose prompts have shorter prefixes pad them, and ``keep`` [B, P]
    hides those slots. transformers hands the attention function either a boolean mask (CPU SDPA) or an additive
    float one; both branches of deep_attention._extend must give, row by row, attention over that row's own
    prefix slots and its visible tokens (computed here one row at a time, without any padding slot)."""
    from torch import nn

    from ptune.tuners import deep_attention as da

    g = torch.Generator().manual_seed(0)
    b, h, q_len, p, d = 3, 2, 4, 3, 8
    q, k, v = (torch.randn(b, h, q_len, d, generator=g) for _ in range(3))
    pk, pv = torch.randn(b, h, p, d, generator=g), torch.randn(b, h, p, d, generator=g)
    keep = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    key_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    mask = key_mask[:, None, None, :].expand(b, 1, q_len, q_len)
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = nn.Module()
    module.is_causal = False
    key, value, ext_mask, _ = da._extend(module, q, k, v, pk, pv, mask, {}, keep)
    assert ext_mask.dtype == mask.dtype and ext_mask.shape[-1] == p + q_len
    got = F.scaled_dot_product_attention(q, key, value, attn_mask=ext_mask)
    for row in range(b):
        kr = torch.cat([pk[row][:, keep[row]], k[row][:, key_mask[row]]], 1)
        vr = torch.cat([pv[row][:, keep[row]], v[row][:, key_mask[row]]], 1)
        ref = (q[row] @ kr.transpose(-1, -2) / d**0.5).softmax(-1) @ vr
        torch.testing.assert_close(got[row], ref, rtol=1e-5, atol=1e-5, msg=f"row {row}")


# ---------------------------------------------------------------------------------------------- causal decoders
# The same reference for GPT-2 and Llama: each layer's prompt keys and values go in front of the token keys and
# values as they are (always visible; no position, so Llama's rotation is applied to the token keys only), the
# tokens attend causally among themselves, and the tokens' positions skip padding and start at 0 whatever the
# prompt length (ptune's convention: a deep prompt shifts no position).


def _causal_attend(q, k, v, pk, pv, key_mask):
    """q [B, H, L, D]; k/v [B, KV, L, D] and prefixes pk/pv [KV, P, D], repeated to H heads (grouped queries)."""
    b, n = key_mask.shape
    k = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2).repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2).repeat_interleave(q.shape[1] // v.shape[1], 1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    tokens = torch.ones(n, n, dtype=torch.bool).tril() & key_mask.bool()[:, None, :]  # [B, L, L]
    visible = torch.cat([torch.ones(b, n, pk.shape[1], dtype=torch.bool), tokens], 2)
    return scores.masked_fill(~visible[:, None], NEG).softmax(-1) @ v


def gpt2_reference(lm, input_ids, mask, prefixes):
    """Last hidden states (after ``ln_f``) of a GPT2LMHeadModel; ``prefixes`` [layers, 2, heads, P, dim]."""
    t = lm.transformer
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    h = t.wte(input_ids) + t.wpe(positions)
    for i, block in enumerate(t.h):
        heads = block.attn.num_heads
        q, k, v = (_heads(x, heads) for x in block.attn.c_attn(block.ln_1(h)).split(h.shape[-1], 2))
        h = h + block.attn.c_proj(_merge(_causal_attend(q, k, v, prefixes[i, 0], prefixes[i, 1], mask)))
        h = h + block.mlp(block.ln_2(h))
    return t.ln_f(h)


def llama_reference(lm, input_ids, mask, prefixes):
    """Last hidden states (after the final norm) of a LlamaForCausalLM; ``prefixes`` [layers, 2, kv_heads, P, dim]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, cfg = lm.model, lm.config
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    h = m.embed_tokens(input_ids)
    cos, sin = m.rotary_emb(h, positions)
    for i, layer in enumerate(m.layers):
        attn, x = layer.self_attn, layer.input_layernorm(h)
        q = _heads(attn.q_proj(x), cfg.num_attention_heads)
        k, v = (_heads(proj(x), cfg.num_key_value_heads) for proj in (attn.k_proj, attn.v_proj))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        h = h + attn.o_proj(_merge(_causal_attend(q, k, v, prefixes[i, 0], prefixes[i, 1], mask)))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return m.norm(h)


CAUSAL_REFERENCES = {"gpt2": gpt2_reference, "llama": llama_reference}


@pytest.mark.parametrize("kind,method", [(k, m) for k in CAUSAL_REFERENCES for m in ("ptuning_v2", "prefix")])
def test_causal_deep_prompt_matches_hand_written_attention(tiny_models, kind, method):
    task, b = _task(tiny_models, kind, method)
    model = task.model
    assert task.left_pad and not b["attention_mask"].bool().all()  # left padding is exercised
    with torch.no_grad():
        prefixes = torch.stack([torch.stack(kv) for kv in model.tuner.deep_prefixes()])[:, :, 0]
        assert prefixes.shape[:2] == (model.backbone.config.num_hidden_layers, 2) and prefixes.shape[3] == 3
        empty = prefixes[:, :, :, :0]
        # the reference is a faithful forward: without prompts it reproduces the plain backbone
        mask = b["attention_mask"]
        plain = model.backbone.base_model(input_ids=b["input_ids"], attention_mask=mask,
                                          position_ids=(mask.cumsum(1) - 1).clamp(min=0)).last_hidden_state
        ref = CAUSAL_REFERENCES[kind](model.backbone, b["input_ids"], mask, empty)
        torch.testing.assert_close(ref[mask.bool()], plain[mask.bool()], atol=1e-5, rtol=1e-5)
        got = model(b["input_ids"], mask, b["answer_pos"])
        want = _reference_scores(task, kind, b, prefixes)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        moved = (got - _reference_scores(task, kind, b, empty)).abs().max()
        assert moved > 1e-3, f"the prompt moves the scores by only {moved} (100x the tolerance needed)"
