"""H2O (spec C2; Part E 5–7): dense when the budget covers everything, equal to a dense model under per-head eviction
masks, the kept sets equal to an independent step-by-step re-derivation of the heavy-hitter rule, heavy=0 equal to
sinks (a sliding window), exact eviction from injected scores, GQA-summed mass, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import hfx
from hfx._compat import cache_argument
from hfx.testing import FAMILIES, generate_greedy, tiny_model, tiny_tokenizer
from hfx_attention._core import register, repeat_kv
from hfx_attention.cache import attend_with_mass
from hfx_attention.h2o import H2OCache, H2OLayer

pytestmark = pytest.mark.floor

TOK = tiny_tokenizer()


def prompt(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, len(TOK), (batch, length), generator=torch.Generator().manual_seed(seed))


def policy_generate(model, ids, cache=None, new_tokens: int = 10):
    kwargs = {} if cache is None else {cache_argument(): cache}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=TOK.pad_token_id,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


# random tiny models attend almost uniformly, so accumulated mass would just rank tokens by age in every head; larger
# weights make attention peaked and head-specific, so the heads really evict different tokens
SHARP = {"initializer_range": 0.2}


def h2o_model(family, dtype=torch.float32, **opts):
    model = tiny_model(family, attn_implementation="sdpa", **SHARP).to(dtype)
    hfx.attention.apply(model, "h2o", **opts)
    return model


# ---------------------------------------------------------------------------------------------------------------
# a stock-RoPE model whose attention takes a per-head mask (B, H_kv, T, T) and exposes its probabilities
# ---------------------------------------------------------------------------------------------------------------


def head_masked(module, query, key, value, attention_mask, *, scaling, dropout=0.0, **kwargs):
    keep = module.test_keep  # (B, H_kv, T, T), True = attend
    g = module.num_key_value_groups
    scores = (query @ repeat_kv(key, g).transpose(-1, -2)) * scaling
    probs = scores.masked_fill(~repeat_kv(keep, g), -math.inf).softmax(-1)
    module.test_probs = probs
    return (probs @ repeat_kv(value, g)).transpose(1, 2).contiguous(), None


register("hfx_test_head_masked", head_masked)


def masked_forward(model, ids, keeps):
    for layer, keep in zip(model.model.layers, keeps, strict=True):
        layer.self_attn.test_keep = keep
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def kept_to_mask(history, total, prompt_len, heads):
    """(B, H_kv, T, T) mask: prefill rows causal; decode row r attends the slots the cache returned at its step."""
    b = history[0][0].shape[0]
    keep = torch.ones(total, total, dtype=torch.bool).tril()[None, None].repeat(b, heads, 1, 1)
    for step, (pos, valid) in enumerate(history[1:], start=1):
        row = prompt_len - 1 + step
        keep[:, :, row] = False
        pos = pos.expand(b, heads, -1)
        keep[:, :, row].scatter_(-1, pos, valid.expand(b, heads, -1))
    return keep


# ---------------------------------------------------------------------------------------------------------------
# Part E 5 and 6
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_covering_everything_generates_like_dense(family):
    stock = tiny_model(family, attn_implementation="sdpa", **SHARP)
    model = h2o_model(family, heavy=16, recent=16)
    assert torch.equal(generate_greedy(model, TOK, max_new_tokens=8), generate_greedy(stock, TOK, max_new_tokens=8))
    ids = prompt()
    want, want_logits = policy_generate(stock, ids)
    got, got_logits = policy_generate(model, ids)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_head_eviction_equals_dense_under_per_head_masks(family):
    model = h2o_model(family, torch.float64, heavy=3, recent=2, num_sink_tokens=1)
    cache = H2OCache(model, heavy=3, recent=2, num_sink_tokens=1, record=True)
    ids = prompt(length=9)
    seq, logits = policy_generate(model, ids, cache, new_tokens=12)
    assert cache.layers[0].keys.shape[-2] == 6 < seq.shape[1] - 1
    heads = model.config.num_key_value_heads
    total = seq.shape[1] - 1
    keeps = [kept_to_mask(layer.history, total, ids.shape[1], heads) for layer in cache.layers]
    # the heads of a layer kept different tokens at some step: the masks are genuinely per head
    assert any(not torch.equal(k[:, 0], k[:, 1]) for k in keeps)
    ref_model = tiny_model(family, attn_implementation="hfx_test_head_masked", **SHARP).double()
    ref = masked_forward(ref_model, seq[:, :-1], keeps)[:, ids.shape[1] - 1:].float()  # generate's logits are fp32
    torch.testing.assert_close(logits.transpose(0, 1), ref, atol=1e-6, rtol=0)
    with torch.no_grad():
        dense = tiny_model(family, attn_implementation="sdpa", **SHARP).double()(seq[:, :-1]).logits
    dense = dense[:, ids.shape[1] - 1:].float()
    assert not torch.allclose(logits.transpose(0, 1), dense, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# the heavy-hitter rule, re-derived step by step from the spec's formula
# ---------------------------------------------------------------------------------------------------------------


def h2o_reference(family, seq, prompt_len, heavy, recent, sinks, dtype):
    """Greedy H2O on explicit sets: per (layer, row, KV head) a set of alive token indices and their accumulated mass
    (sum over query rows and the group's query heads of the softmax probabilities). Before each decode token:
    if more than budget - 1 are alive, keep the first ``sinks``, the ``recent - 1`` newest and the highest-mass
    others up to budget - 1. Every step re-runs a dense forward with the masks of all rows so far."""
    model = tiny_model(family, attn_implementation="hfx_test_head_masked", **SHARP).to(dtype)
    n_layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    g = model.config.num_attention_heads // heads
    b, total = seq.shape[0], seq.shape[1] - 1
    budget = sinks + heavy + recent
    keep = [torch.ones(total, total, dtype=torch.bool).tril()[None, None].repeat(b, heads, 1, 1)
            for _ in range(n_layers)]
    mass = [torch.zeros(b, heads, total, dtype=dtype) for _ in range(n_layers)]
    alive = [[[set(range(prompt_len)) for _ in range(heads)] for _ in range(b)] for _ in range(n_layers)]
    logits, kept = [], []
    for step in range(total - prompt_len + 1):
        row = prompt_len - 1 + step
        if step:
            for layer in range(n_layers):
                for i in range(b):
                    for h in range(heads):
                        tokens = sorted(alive[layer][i][h])
                        if len(tokens) > budget - 1:
                            protected = set(tokens[:sinks]) | set(tokens[len(tokens) - (recent - 1):])
                            rest = sorted((t for t in tokens if t not in protected),
                                          key=lambda t, L=layer, i=i, h=h: -mass[L][i, h, t].item())
                            tokens = protected | set(rest[:budget - 1 - len(protected)])
                        alive[layer][i][h] = set(tokens) | {row}
                        keep[layer][i, h, row] = False
                        keep[layer][i, h, row, sorted(alive[layer][i][h])] = True
        out = masked_forward(model, seq[:, :row + 1], [k[:, :, :row + 1, :row + 1] for k in keep])
        logits.append(out[:, row])
        kept.append([[[sorted(alive[L][i][h]) for h in range(heads)] for i in range(b)] for L in range(n_layers)])
        for layer, block in enumerate(model.model.layers):
            probs = block.self_attn.test_probs  # (B, H, rows, cols)
            rows = probs[:, :, :, :] if step == 0 else probs[:, :, row:row + 1]
            mass[layer][:, :, :row + 1] += rows.sum(2).reshape(b, heads, g, -1).sum(2)
    return torch.stack(logits), kept


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_kept_sets_and_logits_equal_an_independent_rederivation(family):
    heavy, recent, sinks = 3, 2, 1
    model = h2o_model(family, torch.float64, heavy=heavy, recent=recent, num_sink_tokens=sinks)
    cache = H2OCache(model, heavy=heavy, recent=recent, num_sink_tokens=sinks, record=True)
    ids = prompt(length=8, seed=3)
    seq, logits = policy_generate(model, ids, cache, new_tokens=10)
    ref_logits, ref_kept = h2o_reference(family, seq, ids.shape[1], heavy, recent, sinks, torch.float64)
    torch.testing.assert_close(logits, ref_logits.to(logits.dtype), atol=1e-6, rtol=0)  # generate returns fp32
    for step, want in enumerate(ref_kept):
        for layer, layer_cache in enumerate(cache.layers):
            pos, valid = layer_cache.history[step]
            assert valid.all()
            assert pos.tolist() == want[layer], (step, layer)
    # the two KV heads chose differently somewhere: eviction is per head
    assert any(kept[L][i][0] != kept[L][i][1] for kept in ref_kept for L in range(2) for i in range(2))


# ---------------------------------------------------------------------------------------------------------------
# Part E 7: heavy = 0 is a sliding window (= sinks); injected scores evict exactly the expected indices
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sinks, positions", [(0, "original"), (2, "cache")])
def test_no_heavy_hitters_equals_sinks(sinks, positions):
    ids = prompt(length=9)
    h2o = h2o_model("qwen2", torch.float64, heavy=0, recent=4, num_sink_tokens=sinks, positions=positions)
    seq_h, logits_h = policy_generate(h2o, ids, new_tokens=12)
    model = tiny_model("qwen2", attn_implementation="sdpa", **SHARP).double()
    hfx.attention.apply(model, "sinks", num_sink_tokens=sinks, window=4, positions=positions)
    seq_s, logits_s = policy_generate(model, ids, new_tokens=12)
    assert torch.equal(seq_h, seq_s)
    torch.testing.assert_close(logits_h, logits_s, atol=1e-6, rtol=0)
    _, dense = policy_generate(tiny_model("qwen2", attn_implementation="sdpa", **SHARP).double(), ids, new_tokens=12)
    assert not torch.allclose(logits_h, dense, atol=1e-3)


def test_injected_scores_evict_exactly_the_expected_slots():
    layer = H2OLayer(heavy=2, recent=2, num_sink_tokens=1, positions="original")
    keys = torch.arange(1 * 2 * 8 * 4, dtype=torch.float32).reshape(1, 2, 8, 4)
    layer.update(keys, keys + 0.5)
    layer.layout(torch.arange(8)[None], 8)
    # head 0 favours slots 2 and 5, head 1 favours 1 and 4; sink = slot 0, recent (1 + the coming token) = slot 7
    injected = [[0.0, 0.1, 0.9, 0.2, 0.3, 0.8, 0.1, 0.0], [0.0, 0.7, 0.1, 0.2, 0.6, 0.1, 0.5, 0.0]]
    layer.scores = torch.tensor([injected])
    # budget 5 = 1 sink + 2 heavy + 2 recent (the coming token included): 4 of the 8 stay, kv length 5
    assert layer.get_mask_sizes(1) == (5, 8 - 4)
    new = torch.full((1, 2, 1, 4), -1.0)
    k, v = layer.update(new, new)
    want = {0: [0, 2, 5, 7], 1: [0, 1, 4, 7]}
    for head, slots in want.items():
        assert torch.equal(k[0, head, :4], keys[0, head, slots])
        assert torch.equal(v[0, head, :4], keys[0, head, slots] + 0.5)
        assert layer.scores[0, head, :4].tolist() == pytest.approx([injected[head][s] for s in slots])
    assert torch.equal(k[0, :, 4], new[0, :, 0]) and k.shape[-2] == 5 and layer.get_seq_length() == 9
    assert layer.pos[0, :, :4].tolist() == [want[0], want[1]]


def test_mass_is_the_group_summed_softmax_of_every_query_row():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 7, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    keep = torch.rand(2, 1, 5, 7, generator=gen) > 0.3
    keep[..., -1] = True
    probs = ((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3).masked_fill(~keep, -math.inf).softmax(-1)
    want_mass = torch.stack([probs[:, 0:2].sum((1, 2)), probs[:, 2:4].sum((1, 2))], 1)
    want_out = probs @ v.repeat_interleave(2, 1)
    out, mass = attend_with_mass(q, k, v, keep, 0.3, 2)  # prefill path (colsum kernel)
    torch.testing.assert_close(mass, want_mass, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    for row in range(5):  # decode path (explicit P), one row at a time
        out, mass = attend_with_mass(q[:, :, row:row + 1], k, v, keep[:, :, row:row + 1], 0.3, 2)
        torch.testing.assert_close(mass, torch.stack([probs[:, 0:2, row].sum(1), probs[:, 2:4, row].sum(1)], 1),
                                   atol=1e-12, rtol=0)
        torch.testing.assert_close(out, want_out[:, :, row:row + 1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("opts, match", [
    ({"recent": 0}, "recent must be >= 1"),
    ({"heavy": -1}, "heavy must be an int >= 0"),
    ({"num_sink_tokens": 1.5}, "num_sink_tokens must be an int >= 0"),
    ({"positions": "slot"}, "positions must be one of"),
])
def test_bad_options_are_refused(opts, match):
    with pytest.raises(ValueError, match=match):
        hfx.attention.apply(tiny_model("llama"), "h2o", **opts)


def test_revert_restores_dense_generation():
    stock = tiny_model("mistral", attn_implementation="sdpa", **SHARP)
    model = h2o_model("mistral", heavy=1, recent=2)
    ids = prompt()
    _, evicting = policy_generate(model, ids)
    _, dense = policy_generate(stock, ids)
    assert not torch.allclose(evicting, dense, atol=1e-3)
    hfx.attention.revert(model)
    torch.testing.assert_close(policy_generate(model, ids)[1], dense, atol=0, rtol=0)
    assert hfx.attention.applied(model) == [] and "generate" not in model.__dict__
