"""TPA (spec C5, Part E 16–18): GQA/MHA/MQA as non-contextual TPAs, the exact `from_gqa` graft, RoPE on the b
factors, decode from the factor cache, the cache-size formula, training through an hfx trainer config."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import hfx
from hfx._compat import cache_argument, output_cache
from hfx.testing import (
    FAMILIES,
    fast_training_args,
    left_padded_batch,
    make_tiny_datasets,
    params_changed,
    shared_tiny_model_dir,
    snapshot_params,
    tiny_model,
    tiny_tokenizer,
)
from hfx_attention.tpa import (
    HfxTPAAttention,
    factor_cache_numbers,
    from_gqa,
    rope_factor,
    tpa_cache_bytes,
    tpa_materialize,
)

pytestmark = pytest.mark.floor


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def ids(batch=2, length=9, seed=0, vocab=500):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- E16: special cases and the exact graft


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 3), (4, 4), (4, 1)], ids=["gqa2", "gqa3", "mha", "mqa"])
def test_indicator_factors_are_the_gqa_keys_and_values_exactly(heads, kv_heads):
    """Non-contextual R = #KV groups, a_r = R·[head in group r], b_r = the group's projection: K and V equal GQA's
    (repeated per query head) bit for bit. R = H is MHA (one-hot a), R = 1 is MQA (all-ones a)."""
    model = tiny_model("llama", num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=8 * heads).double()
    source = model.model.layers[0].self_attn
    hfx.attention.apply(model, "tpa", init="gqa")
    tpa = model.model.layers[0].self_attn
    assert isinstance(tpa, HfxTPAAttention) and (tpa.k_rank, tpa.v_rank, tpa.q_rank) == (kv_heads, kv_heads, heads)
    a_k = tpa.a_k.bias.reshape(heads, kv_heads)
    if kv_heads == heads:
        assert torch.equal(a_k, heads * torch.eye(heads, dtype=a_k.dtype))
    if kv_heads == 1:
        assert torch.equal(a_k, torch.ones(heads, 1, dtype=a_k.dtype))
    x = torch.randn(2, 5, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name, proj in (("k", source.k_proj), ("v", source.v_proj), ("q", source.q_proj)):
        a, b = tpa._factors(x, name, None, None, None)
        want = proj(x).unflatten(-1, (-1, 8)).transpose(1, 2).repeat_interleave(heads // (proj.out_features // 8), 1)
        assert torch.equal(tpa_materialize(a, b), want), name


@pytest.mark.parametrize("family", FAMILIES)
def test_from_gqa_model_logits_equal_stock_and_revert(family):
    stock = tiny_model(family, attn_implementation="sdpa").double()
    model = tiny_model(family, attn_implementation="sdpa").double()
    batch = left_padded_batch(tiny_tokenizer())
    from_gqa(model)
    assert hfx.attention.applied(model) == ["tpa"] and model.config._attn_implementation == "hfx_tpa"
    torch.testing.assert_close(logits(model, batch), logits(stock, batch), atol=1e-12, rtol=0)
    hfx.attention.revert(model)
    assert not any(isinstance(m, HfxTPAAttention) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, batch), logits(stock, batch))


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_mha_and_mqa_models_convert_exactly(kv_heads):
    stock = tiny_model("qwen3", num_key_value_heads=kv_heads, attn_implementation="sdpa").double()
    model = tiny_model("qwen3", num_key_value_heads=kv_heads, attn_implementation="sdpa").double()
    hfx.attention.apply(model, "tpa", init="gqa", contextual=True)  # zero contextual weights: still exact
    assert model.model.layers[0].self_attn.a_k.weight.abs().sum() == 0
    batch = left_padded_batch(tiny_tokenizer())
    torch.testing.assert_close(logits(model, batch), logits(stock, batch), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- E17: RoPE on the b factors


def test_rope_on_factors_equals_rope_on_materialised_keys():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 7, 4, 3, dtype=torch.float64, generator=g)
    b = torch.randn(2, 7, 3, 8, dtype=torch.float64, generator=g)
    model = tiny_model("llama").double()
    positions = torch.randint(0, 900, (2, 7), generator=g)
    cos, sin = model.model.rotary_emb(b, positions)
    keys = tpa_materialize(a, b)
    want, _ = apply_rotary_pos_emb(keys, keys, cos, sin)  # HF's own rotation of the materialised heads
    got = tpa_materialize(a, rope_factor(b, cos, sin))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert not torch.allclose(got, keys, atol=1e-3)  # the rotation did something


# ---------------------------------------------------------------- E18: factor cache


def random_tpa(family="llama", dtype=torch.float64, **opts):
    model = tiny_model(family, attn_implementation="sdpa").to(dtype)
    return hfx.attention.apply(model, "tpa", init="random", **{"q_rank": 3, "rank": 2, **opts})


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_from_factor_cache_equals_full_prefill(family, monkeypatch):
    import hfx_attention.tpa as tpa
    import hfx_kernels.tpa_decode as kernel

    calls = []
    real = kernel.tpa_decode
    assert tpa.tpa_decode is real  # the attention function calls the kernel's entry point

    def counting(q, a_k, b_k, a_v, b_v, *args, **kwargs):
        calls.append((q.shape, a_k.shape))
        return real(q, a_k, b_k, a_v, b_v, *args, **kwargs)

    monkeypatch.setattr(tpa, "tpa_decode", counting)
    model = random_tpa(family, k_rank=2, v_rank=3)
    tokens = ids(length=9)
    with torch.no_grad():
        full = model(tokens).logits
        out = model(tokens[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, 9):
            out = model(tokens[:, t:t + 1], **{cache_argument(): output_cache(out)})
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-12, rtol=0)
    # every decode step of every layer went through the factor kernel, on the factors: a_k (B, Tk, H, R_K)
    assert len(calls) == 5 * 2 and calls[-1][1] == (2, 9, 4, 2)


def test_generate_from_factor_cache_equals_full_recompute():
    model = random_tpa(dtype=torch.float32)
    tok = tiny_tokenizer()
    batch = left_padded_batch(tok)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kw)
        recomputed = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)


def test_cache_bytes_formula_equals_bytes_held():
    model = random_tpa(dtype=torch.float32, q_rank=6, k_rank=2, v_rank=1)
    with torch.no_grad():
        cache = output_cache(model(ids(batch=3, length=7), use_cache=True))
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    heads, d, layers = 4, 8, 2
    assert factor_cache_numbers(heads, d, 2, 1) == (2 + 1) * (heads + d) == 36
    assert held == tpa_cache_bytes(model, 7, batch=3) == layers * 36 * 7 * 3 * 4
    # GQA would hold 2·H_kv·d = 32 numbers per token and layer: at this tiny size TPA saves nothing
    assert 2 * model.config.num_key_value_heads * d == 32


# ---------------------------------------------------------------- init, bad input, training


def test_random_init_is_xavier_and_contextual():
    model = random_tpa(q_rank=6, rank=2)
    attn = model.model.layers[1].self_attn
    for name, out in (("a_q", 4 * 6), ("a_k", 4 * 2), ("b_v", 2 * 8)):
        weight = getattr(attn, name).weight
        bound = (6 / (32 + out)) ** 0.5  # Xavier-uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out))
        assert weight.shape == (out, 32) and weight.abs().max() <= bound and weight.abs().max() > 0.8 * bound
    assert attn.a_k.bias is None  # fresh TPA: head factors are purely contextual (W x), as in T6


def test_svd_init_is_exact_at_full_rank_and_lossy_below():
    stock = tiny_model("qwen2", attn_implementation="sdpa").double()
    batch = left_padded_batch(tiny_tokenizer())
    full = hfx.attention.apply(tiny_model("qwen2", attn_implementation="sdpa").double(), "tpa", init="svd", rank=2)
    torch.testing.assert_close(logits(full, batch), logits(stock, batch), atol=1e-10, rtol=0)
    low = hfx.attention.apply(tiny_model("qwen2", attn_implementation="sdpa").double(), "tpa", init="svd", rank=1,
                              q_rank=2)
    got = logits(low, batch)
    assert torch.isfinite(got).all() and (got - logits(stock, batch)).abs().max() > 1e-3


def test_bad_input_names_the_fix():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"K/V rank = number of KV groups \(num_key_value_heads = 2\).*init='svd'"):
        hfx.attention.apply(model, "tpa", init="gqa", rank=3)
    with pytest.raises(ValueError, match="q_rank = num_attention_heads"):
        hfx.attention.apply(model, "tpa", init="gqa", q_rank=6)
    with pytest.raises(ValueError, match="rank must be <= 2"):
        hfx.attention.apply(model, "tpa", init="svd", rank=3)
    with pytest.raises(ValueError, match="init must be one of random, gqa, svd"):
        hfx.attention.apply(model, "tpa", init="mla")
    with pytest.raises(ValueError, match="positive integer"):
        hfx.attention.apply(model, "tpa", rank=0)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"every parameter of the model is frozen.*init='gqa'"):
        hfx.attention.apply(model, "tpa")
    assert hfx.attention.applied(model) == [] and not isinstance(model.model.layers[0].self_attn, HfxTPAAttention)
    hfx.attention.apply(model, "tpa", allow_untrained=True)
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"needs a dynamic cache.*StaticLayer"):
        model.generate(**left_padded_batch(tok), max_new_tokens=2, cache_implementation="static",
                       pad_token_id=tok.pad_token_id)
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match="does not support GPT2LMHeadModel"):
        hfx.attention.apply(gpt2, "tpa")
    stock = tiny_model("llama", attn_implementation="hfx_tpa")
    with pytest.raises(ValueError, match=r"hfx.attention.apply\(model, 'tpa'"):
        stock(ids())


def test_trains_through_an_hfx_trainer_config(tmp_path):
    from trl import SFTConfig, SFTTrainer

    args = fast_training_args(hfx.extend(SFTConfig), tmp_path, hfx_attention="tpa",
                              hfx_attention_args={"q_rank": 2, "rank": 1})
    trainer = hfx.extend(SFTTrainer)(model=str(shared_tiny_model_dir("qwen2")), args=args,
                                     train_dataset=make_tiny_datasets()["language_modeling"])
    attn = trainer.model.model.layers[0].self_attn
    assert isinstance(attn, HfxTPAAttention) and (attn.q_rank, attn.k_rank, attn.v_rank) == (2, 1, 1)
    before = snapshot_params(trainer.model)
    trainer.train()
    changed = set(params_changed(before, trainer.model))
    new = {n for n in before if ".a_" in n or ".b_" in n}
    assert new and new <= changed, sorted(new - changed)
