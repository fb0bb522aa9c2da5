"""CASTLE (spec C6, Part E 19–21): the exact graft at W_vU = 0, the blockwise parallel form against a naive O(T³)
re-derivation of the formula, parallel = recurrent decode through the CastleLayer cache, split prefill, causality,
padding, training through an hfx trainer config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import hfx
from hfx._compat import cache_argument, output_cache
from hfx.testing import (
    FAMILIES,
    fast_training_args,
    generate_greedy,
    left_padded_batch,
    make_tiny_datasets,
    params_changed,
    shared_tiny_model_dir,
    snapshot_params,
    tiny_model,
    tiny_tokenizer,
)
from hfx_attention.castle import (
    CastleCache,
    HfxCastleAttention,
    Lookahead,
    castle_attention,
    castle_logits,
    lookahead_scores,
)

pytestmark = pytest.mark.floor


def ids(batch=2, length=9, seed=0):
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def castle(family="llama", dtype=torch.float64, random_vu=True, block_size=3, seed=1):
    """A CASTLE-grafted tiny model; with ``random_vu`` W_vU is moved off zero so the lookahead term is active."""
    model = tiny_model(family, attn_implementation="sdpa").to(dtype)
    hfx.attention.apply(model, "castle", block_size=block_size)
    if random_vu:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.model.layers:
                w = layer.self_attn.v_u_proj.weight
                w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64))
    return model


# ---------------------------------------------------------------- naive O(T³) reference of the formula (C6)


def naive_castle(q_c, k_c, v_c, q_u, k_u, v_u, scale):
    """Materialise u_s^(t) = Σ_{s<j≤t} σ(q^U_s·k^U_j·scale) v^U_j for every (t, s) with loops, then
    ℓ[t, s] = scale·q^C_t·k^C_s − SiLU(scale·q^C_t·u_s^(t)), causal softmax, values v^C. GQA by head // group."""
    _, heads, length, _ = q_c.shape
    group = heads // k_c.shape[1]
    out = torch.zeros_like(q_c)
    for h in range(heads):
        g = h // group
        for t in range(length):
            row = torch.full((q_c.shape[0], length), float("-inf"), dtype=q_c.dtype)
            for s in range(t + 1):
                u = torch.zeros_like(v_u[:, g, 0])
                for j in range(s + 1, t + 1):
                    u = u + torch.sigmoid(scale * (q_u[:, g, s] * k_u[:, g, j]).sum(-1))[:, None] * v_u[:, g, j]
                causal = scale * (q_c[:, h, t] * k_c[:, g, s]).sum(-1)
                row[:, s] = causal - F.silu(scale * (q_c[:, h, t] * u).sum(-1))
            out[:, h, t] = torch.einsum("bt,btd->bd", row.softmax(-1), v_c[:, g])
    return out


def parallel_castle(q_c, k_c, v_c, q_u, k_u, v_u, scale, block_size, split=None):
    """The module's math: blockwise lookahead scores (optionally a prefill of ``split`` tokens, then the rest
    against the carried state U, as the cache does), causal softmax."""
    length = q_c.shape[2]
    rows, state = [], torch.zeros_like(v_u[:, :, :0])
    for start, stop in ((0, split), (split, length)) if split else ((0, length),):
        state = torch.cat((state, torch.zeros_like(v_u[:, :, start:stop])), dim=2)
        s_u, state = lookahead_scores(q_c[:, :, start:stop], q_u[:, :, :stop], k_u[:, :, start:stop],
                                      v_u[:, :, start:stop], state, scale=scale, block_size=block_size)
        logits = castle_logits(q_c[:, :, start:stop], k_c[:, :, :stop], s_u, scale)
        keep = torch.ones(stop - start, stop, dtype=torch.bool).tril(start)
        probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
        rows.append(probs @ v_c[:, :, :stop].repeat_interleave(q_c.shape[1] // k_c.shape[1], 1))
    return torch.cat(rows, dim=2), state


@pytest.mark.parametrize("block_size,split", [(1, None), (3, None), (64, None), (2, 4)])
def test_parallel_form_equals_naive_cubic_reference(block_size, split):
    g = torch.Generator().manual_seed(0)
    shape_q, shape_kv = (2, 4, 7, 8), (2, 2, 7, 8)
    q_c = torch.randn(shape_q, dtype=torch.float64, generator=g)
    k_c, v_c, q_u, k_u, v_u = (torch.randn(shape_kv, dtype=torch.float64, generator=g) for _ in range(5))
    want = naive_castle(q_c, k_c, v_c, q_u, k_u, v_u, 8**-0.5)
    got, state = parallel_castle(q_c, k_c, v_c, q_u, k_u, v_u, 8**-0.5, block_size, split)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # the carried state is the lookahead keys after the last token: u_s = Σ_{j>s} σ(q^U_s·k^U_j/√d) v^U_j
    weights = torch.sigmoid(8**-0.5 * q_u @ k_u.transpose(-1, -2)).triu(1)
    torch.testing.assert_close(state, weights @ v_u, atol=1e-12, rtol=0)
    # and the lookahead term matters: plain causal attention differs
    plain, _ = parallel_castle(q_c, k_c, v_c, q_u, k_u, torch.zeros_like(v_u), 8**-0.5, block_size)
    assert (plain - want).abs().max() > 1e-3


# ---------------------------------------------------------------- E19: exact graft


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_vu_graft_equals_the_base_model_and_reverts(family):
    stock = tiny_model(family, attn_implementation="sdpa").double()
    model = castle(family, random_vu=False)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, HfxCastleAttention) and attn.v_u_proj.weight.abs().sum() == 0
    assert attn.q_u_proj.weight.abs().sum() > 0  # the lookahead queries/keys are live; only v^U is zero
    batch = left_padded_batch(tiny_tokenizer())
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        got, want = model(**batch).logits[keep], stock(**batch).logits[keep]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    hfx.attention.revert(model)
    assert model.config._attn_implementation == "sdpa" and not isinstance(model.model.layers[0].self_attn,
                                                                           HfxCastleAttention)


def test_bf16_softmax_runs_in_float32_like_eager_attention():
    """In bf16 with the lookahead term at zero, CASTLE's attention is transformers' eager attention to the bit, forward
    and backward: logits in the model's dtype, the softmax in float32 (so its backward too), probabilities cast back
    before the values."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, length, dim = 2, 4, 2, 33, 16
    query = torch.randn(b, heads, length, dim, generator=g).to(torch.bfloat16)
    key, value, q_u, k_u = (torch.randn(b, kv_heads, length, dim, generator=g).to(torch.bfloat16) for _ in range(4))
    weight = torch.randn(b, length, heads, dim, generator=g).to(torch.bfloat16)
    zeros = torch.zeros_like(key)
    module = torch.nn.Module().eval()
    module.num_key_value_groups = heads // kv_heads
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = torch.zeros(b, 1, length, length, dtype=torch.bfloat16).masked_fill(~causal, torch.finfo(torch.bfloat16).min)

    def run(attention, **kwargs):
        q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
        out, _ = attention(module, q, k, v, mask, scaling=dim**-0.5, **kwargs)
        (out * weight).sum().backward()
        return out, q.grad, k.grad, v.grad

    want = run(eager_attention_forward)
    got = run(castle_attention, lookahead=Lookahead(q_u, k_u, zeros, zeros))
    assert got[0].dtype == torch.bfloat16
    for name, g_, w_ in zip(("output", "query grad", "key grad", "value grad"), got, want, strict=True):
        torch.testing.assert_close(g_, w_, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_zero_vu_graft_generates_identically():
    stock = tiny_model("qwen2", attn_implementation="sdpa")
    model = castle("qwen2", dtype=torch.float32, random_vu=False)
    assert torch.equal(generate_greedy(model, max_new_tokens=6), generate_greedy(stock, max_new_tokens=6))


# ---------------------------------------------------------------- E20: parallel = recurrent, split prefill


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_parallel_equals_token_by_token_recurrent_decode(family):
    model = castle(family)
    tokens = ids(length=9)
    with torch.no_grad():
        full = model(tokens).logits
        out, steps = None, []
        for t in range(9):
            kw = {} if out is None else {cache_argument(): output_cache(out)}
            out = model(tokens[:, t:t + 1], use_cache=True, **kw)
            steps.append(out.logits)
        stock = tiny_model(family).double()(tokens).logits
    cache = output_cache(out)
    assert type(cache.layers[0]).__name__ == "CastleLayer" and cache.get_seq_length() == 9
    assert cache.layers[0].lookahead_keys.abs().sum() > 0
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=0)
    assert (full - stock).abs().max() > 1e-3  # non-zero W_vU: not the base model


def test_split_prefill_then_decode_equals_full_parallel():
    model = castle("mistral", block_size=2)
    tokens = ids(length=10)
    with torch.no_grad():
        full = model(tokens).logits
        first = model(tokens[:, :5], **{cache_argument(): CastleCache(model)})  # the explicit cache
        second = model(tokens[:, 5:8], **{cache_argument(): output_cache(first)})
        third = model(tokens[:, 8:], **{cache_argument(): output_cache(second)})
    torch.testing.assert_close(torch.cat((first.logits, second.logits, third.logits), 1), full, atol=1e-10, rtol=0)


def test_generate_with_the_castle_cache_equals_full_recompute():
    model = castle("llama", dtype=torch.float32)
    tok = tiny_tokenizer()
    batch = left_padded_batch(tok)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kw)
        recomputed = model.generate(**batch, use_cache=False, **kw)
        assert torch.equal(cached, recomputed)
        # beam search reorders and selects cache rows: q^U and U must follow k^C/v^C
        kw["num_beams"] = 3
        assert torch.equal(model.generate(**batch, use_cache=True, **kw), model.generate(**batch, use_cache=False, **kw))


# ---------------------------------------------------------------- E21: causality; padding


def test_future_tokens_do_not_change_earlier_outputs():
    model = castle("qwen2")
    tokens = ids(batch=1, length=10)
    changed = tokens.clone()
    changed[:, 6:] = ids(batch=1, length=4, seed=7)
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-12, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_left_padding_equals_unpadded_rows():
    model = castle("llama")
    batch = left_padded_batch(tiny_tokenizer())
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(**batch, position_ids=positions).logits
        for row in range(mask.shape[0]):
            real = mask[row].bool()
            alone = model(batch["input_ids"][row:row + 1, real]).logits[0]
            torch.testing.assert_close(padded[row, real], alone, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- gradients, training, bad input


def test_vu_gradient_is_nonzero_at_the_graft_point():
    model = castle("llama", random_vu=False).train()
    tokens = ids(length=8)
    model(tokens, labels=tokens).loss.backward()
    attn = model.model.layers[0].self_attn
    assert attn.v_u_proj.weight.grad.abs().max() > 0  # SiLU'(0) = 1/2: training leaves W_vU = 0
    assert attn.q_u_proj.weight.grad.abs().max() == 0  # v^U = 0 blocks q^U/k^U until W_vU moves


def test_trains_through_an_hfx_trainer_config(tmp_path):
    from trl import SFTConfig, SFTTrainer

    args = fast_training_args(hfx.extend(SFTConfig), tmp_path, hfx_attention="castle",
                              hfx_attention_args={"block_size": 4})
    trainer = hfx.extend(SFTTrainer)(model=str(shared_tiny_model_dir("qwen2")), args=args,
                                     train_dataset=make_tiny_datasets()["language_modeling"])
    assert isinstance(trainer.model.model.layers[0].self_attn, HfxCastleAttention)
    before = snapshot_params(trainer.model)
    trainer.train()
    changed = set(params_changed(before, trainer.model))
    new = {n for n in before if "_u_proj" in n}
    assert len(new) == 3 * 2 and new <= changed, sorted(new - changed)


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        hfx.attention.apply(tiny_model("llama"), "castle", block_size=0)
    windowed = tiny_model("mistral", sliding_window=4)
    with pytest.raises(ValueError, match="does not support sliding-window"):
        hfx.attention.apply(windowed, "castle")
    assert hfx.attention.applied(windowed) == []
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match="does not support GPT2LMHeadModel"):
        hfx.attention.apply(gpt2, "castle")
    with pytest.raises(ValueError, match=r"hfx.attention.apply\(model, 'castle'\)"):
        tiny_model("llama", attn_implementation="hfx_castle")(ids())
    model = castle("llama", random_vu=False)
    with torch.no_grad():
        cache = output_cache(model(ids(), use_cache=True))
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="CastleLayer cache layers, but layer 0 of the cache is a StaticLayer"):
        model.generate(**left_padded_batch(tok), max_new_tokens=2, cache_implementation="static",
                       pad_token_id=tok.pad_token_id)
    from transformers.cache_utils import DynamicCache, DynamicLayer

    full = DynamicCache()
    full.layers.append(DynamicLayer())
    full.layers[0].update(torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8))
    with pytest.raises(ValueError, match=r"CastleLayer cache layers.*CastleCache"):
        model(ids(), **{cache_argument(): full})
