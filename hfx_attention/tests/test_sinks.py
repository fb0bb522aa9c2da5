"""Attention sinks (spec C1; Part E 5, 6, 8, 9): dense when the window covers everything, equal to a dense model under
the StreamingLLM eviction mask when tokens are evicted, pos-shift equal to a from-scratch re-rotation of the kept
pre-RoPE keys at their slot positions, per-row sinks under left padding, cumulative lengths and exact mask sizes,
revert, bad input."""

from __future__ import annotations

import pytest
import torch
import transformers

import hfx
from hfx._compat import cache_argument, rope_parameters
from hfx.testing import FAMILIES, generate_greedy, left_padded_batch, tiny_model, tiny_tokenizer
from hfx_attention._core import register, repeat_kv, set_attention
from hfx_attention.h2o import H2OCache
from hfx_attention.rotary import bypass_rotary
from hfx_attention.sinks import SinkCache, sinks_attention

pytestmark = pytest.mark.floor

TOK = tiny_tokenizer()


def prompt(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, len(TOK), (batch, length), generator=torch.Generator().manual_seed(seed))


def policy_generate(model, ids, cache=None, new_tokens: int = 10, attention_mask=None):
    """Greedy decode through ``generate``; returns (sequences, per-step logits (steps, B, V))."""
    kwargs = {} if cache is None else {cache_argument(): cache}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids) if attention_mask is None else attention_mask,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=TOK.pad_token_id, output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


def sinks_model(family, dtype=torch.float32, **opts):
    model = tiny_model(family, attn_implementation="sdpa").to(dtype)
    hfx.attention.apply(model, "sinks", **opts)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Part E 5: a window covering everything is dense attention
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["cache", "original"])
@pytest.mark.parametrize("family", FAMILIES)
def test_window_covering_everything_generates_like_dense(family, positions):
    stock = tiny_model(family, attn_implementation="sdpa")
    model = sinks_model(family, num_sink_tokens=4, window=64, positions=positions)
    # a left-padded batch: positions count valid slots only, as generate's position_ids do
    assert torch.equal(generate_greedy(model, TOK, max_new_tokens=8), generate_greedy(stock, TOK, max_new_tokens=8))
    ids = prompt()
    want, want_logits = policy_generate(stock, ids)
    got, got_logits = policy_generate(model, ids)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Part E 6: real eviction equals the dense model under the eviction mask (original positions)
# ---------------------------------------------------------------------------------------------------------------


def streaming_mask(total: int, prompt_len: int, sinks: int, window: int) -> torch.Tensor:
    """(T, T) bool: prefill rows are causal; decode row r sees the first ``sinks`` tokens and the ``window`` most
    recent ones, itself included (StreamingLLM's start + recent)."""
    r = torch.arange(total)[:, None]
    j = torch.arange(total)[None, :]
    decode = (j <= r) & ((j < sinks) | (j > r - window))
    return torch.where(r < prompt_len, j <= r, decode)


@pytest.mark.parametrize("family", FAMILIES)
def test_eviction_equals_dense_under_the_streaming_mask(family):
    sinks, window, new = 2, 4, 12
    model = sinks_model(family, num_sink_tokens=sinks, window=window, positions="original")
    ids = prompt(length=9)
    cache = SinkCache(model, sinks, window, "original", record=True)
    seq, logits = policy_generate(model, ids, cache, new_tokens=new)
    # eviction happened: the cache holds the budget, not the sequence
    assert cache.layers[0].keys.shape[-2] == sinks + window < seq.shape[1] - 1
    stock = tiny_model(family, attn_implementation="sdpa")
    total = seq.shape[1] - 1
    keep = streaming_mask(total, ids.shape[1], sinks, window)
    mask = torch.zeros(total, total).masked_fill(~keep, torch.finfo(torch.float32).min)[None, None].expand(2, 1, -1, -1)
    with torch.no_grad():
        ref = stock(seq[:, :-1], attention_mask=mask.contiguous()).logits[:, ids.shape[1] - 1:]
        dense = stock(seq[:, :-1]).logits[:, ids.shape[1] - 1:]
    torch.testing.assert_close(logits.transpose(0, 1), ref, atol=1e-6, rtol=0)
    assert not torch.allclose(logits.transpose(0, 1), dense, atol=1e-3)  # the mask mattered
    # the recorded slots are the formula's kept set at every step
    for step, (pos, valid) in enumerate(cache.layers[1].history):
        row = ids.shape[1] - 1 + step
        assert valid.all()
        assert pos[0, 0].tolist() == keep[row].nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------------------------
# Part E 8: pos-shift equals an explicit re-rotation of the kept pre-RoPE keys at slot positions
# ---------------------------------------------------------------------------------------------------------------


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE from the formula (HF's rotate_half layout) at ``positions`` broadcastable to x's (..., T)."""
    d = x.shape[-1]
    # angles in float32, as transformers computes them for every model dtype
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    angle = positions[..., None].float() * inv_freq
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(x.dtype), torch.cat([angle.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


PLAN: dict = {}


def reshift_reference(module, query, key, value, attention_mask, *, scaling, dropout=0.0, **kwargs):
    """Pre-RoPE keys of *all* tokens so far (a plain DynamicCache under the rotary bypass): gather this step's kept
    tokens per KV head, rotate them at slots 0..n-1 and the query at n-1, from scratch."""
    theta = PLAN["theta"]
    if query.shape[2] > 1:  # prefill: nothing evicted, slots are the positions
        pos = torch.arange(key.shape[2])
        k, q = rope(key, pos, theta), rope(query, pos[-query.shape[2]:], theta)
        keep = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril(key.shape[2] - query.shape[2])
    else:
        kept = PLAN["kept"][module.layer_idx][PLAN["step"]]  # (B, H_kv, n) token indices, ascending
        n = kept.shape[-1]
        idx = kept[..., None].expand(-1, -1, -1, key.shape[-1])
        k = rope(key.gather(2, idx), torch.arange(n), theta)
        value = value.gather(2, idx)
        q = rope(query, torch.tensor([n - 1]), theta)
        keep = torch.ones(1, n, dtype=torch.bool)
    g = module.num_key_value_groups
    scores = (q @ repeat_kv(k, g).transpose(-1, -2)) * scaling
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return (probs @ repeat_kv(value, g)).transpose(1, 2).contiguous(), None


register("hfx_test_reshift", reshift_reference)


def reshift_logits(family, seq, prompt_len, kept, dtype, **overrides):
    """Teacher-forced step-by-step logits of the explicit reference on ``seq``."""
    ref = tiny_model(family, attn_implementation="sdpa", **overrides).to(dtype)
    bypass_rotary(ref)
    set_attention(ref, "hfx_test_reshift")
    PLAN.update(theta=rope_parameters(ref.config)["rope_theta"], kept=kept)
    out, cache = [], None
    with torch.no_grad():
        for step in range(seq.shape[1] - prompt_len):
            PLAN["step"] = step
            end = prompt_len + step
            chunk = seq[:, :end] if step == 0 else seq[:, end - 1:end]
            result = ref(chunk, use_cache=True, **({} if cache is None else {cache_argument(): cache}))
            cache = hfx._compat.output_cache(result)
            out.append(result.logits[:, -1])
    return torch.stack(out)


@pytest.mark.parametrize("policy", ["sinks", "h2o"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pos_shift_equals_explicit_rerotation_at_slot_positions(family, policy):
    dtype = torch.float64
    # H2O: peaked attention (larger init) so each KV head keeps its own tokens and is re-indexed on its own
    init = {} if policy == "sinks" else {"initializer_range": 0.3}
    model = tiny_model(family, attn_implementation="sdpa", **init).to(dtype)
    if policy == "sinks":
        hfx.attention.apply(model, "sinks", num_sink_tokens=2, window=4)
        cache = SinkCache(model, 2, 4, "cache", record=True)
    else:  # per-head kept sets, re-indexed per head
        hfx.attention.apply(model, "h2o", heavy=3, recent=2, positions="cache")
        cache = H2OCache(model, heavy=3, recent=2, positions="cache", record=True)
    ids = prompt(length=8, seed=1)
    seq, logits = policy_generate(model, ids, cache, new_tokens=10)
    kept = {i: [pos.expand(-1, model.config.num_key_value_heads, -1) for pos, _ in layer.history]
            for i, layer in enumerate(cache.layers)}
    assert kept[0][-1].shape[-1] == cache.layers[0].budget < seq.shape[1] - 1  # eviction happened
    if policy == "h2o":
        assert any(not torch.equal(k[:, 0], k[:, 1]) for steps in kept.values() for k in steps)
    ref = reshift_logits(family, seq, ids.shape[1], kept, dtype, **init)
    torch.testing.assert_close(logits, ref.to(logits.dtype), atol=1e-6, rtol=0)  # generate returns fp32 logits
    # original positions on the same kept sets give other logits: the re-indexing is what matched
    model_orig = tiny_model(family, attn_implementation="sdpa", **init).to(dtype)
    if policy == "sinks":
        hfx.attention.apply(model_orig, "sinks", num_sink_tokens=2, window=4, positions="original")
    else:
        hfx.attention.apply(model_orig, "h2o", heavy=3, recent=2, positions="original")
    _, orig_logits = policy_generate(model_orig, ids, None, new_tokens=10)
    assert not torch.allclose(orig_logits[3:], logits[3:], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# left padding: the sinks of a row are its first non-pad tokens
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["cache", "original"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_padded_rows_evict_as_if_alone(family, positions):
    model = sinks_model(family, num_sink_tokens=2, window=3, positions=positions)
    batch = left_padded_batch(TOK)
    assert not batch["attention_mask"].bool().all()
    _, batched = policy_generate(model, batch["input_ids"], new_tokens=8, attention_mask=batch["attention_mask"])
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()][None]
        _, alone = policy_generate(model, ids, new_tokens=8)
        torch.testing.assert_close(batched[:, row], alone[:, 0], atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Part E 9: cumulative length, mask sizes equal to the kv length the attention sees
# ---------------------------------------------------------------------------------------------------------------

SEEN: list = []
PREDICTED: list = []


def checked_sinks(module, query, key, value, attention_mask, **kwargs):
    """Asserts, at every layer and step, that the kv length transformers was told (``get_mask_sizes``, which it
    asks once per forward) is the kv length the cache returned, and that a materialised mask has that size."""
    assert PREDICTED and PREDICTED[-1][0] == key.shape[-2], (PREDICTED[-1:], key.shape)
    if attention_mask is not None:
        assert attention_mask.shape[-2:] == (query.shape[-2], key.shape[-2]), (attention_mask.shape, key.shape)
    SEEN.append((attention_mask is not None, key.shape[-2]))
    return sinks_attention(module, query, key, value, attention_mask, **kwargs)


register("hfx_test_checked_sinks", checked_sinks)


def recording_mask_sizes(cache):
    ask = cache.get_mask_sizes

    def get_mask_sizes(*args, **kwargs):
        PREDICTED.append(ask(*args, **kwargs))
        return PREDICTED[-1]

    cache.get_mask_sizes = get_mask_sizes
    return cache


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_mask_sizes_match_kv_length_and_length_is_cumulative(family):
    model = sinks_model(family, num_sink_tokens=1, window=3)
    model.set_attn_implementation("hfx_test_checked_sinks")
    batch = left_padded_batch(TOK)
    cache = recording_mask_sizes(SinkCache(model, 1, 3))
    SEEN.clear()
    PREDICTED.clear()
    seq, _ = policy_generate(model, batch["input_ids"], cache, new_tokens=6, attention_mask=batch["attention_mask"])
    assert len(SEEN) == 6 * model.config.num_hidden_layers and len(PREDICTED) >= 6
    assert SEEN[0] == (True, batch["input_ids"].shape[1])  # the padded prefill had a mask of the full length
    assert [n for _, n in SEEN[-2:]] == [4, 4]  # the budget at the last steps
    assert cache.get_seq_length() == seq.shape[1] - 1  # cumulative: tokens fed, not slots held
    # a manual loop: get_seq_length after every step, get_mask_sizes before it
    cache = recording_mask_sizes(SinkCache(model, 1, 3))
    ids = prompt(batch=1, length=5)
    with torch.no_grad():
        for step in range(6):
            chunk = ids if step == 0 else torch.tensor([[7]])
            before = cache.get_seq_length()
            predicted = cache.layers[0].get_mask_sizes(chunk.shape[1])
            model(chunk, **{cache_argument(): cache})
            assert cache.get_seq_length() == before + chunk.shape[1]
            assert predicted == (cache.layers[0].keys.shape[-2], cache.get_seq_length() - predicted[0])


# ---------------------------------------------------------------------------------------------------------------
# apply / revert / registry / bad input
# ---------------------------------------------------------------------------------------------------------------


def test_apply_builds_the_cache_and_revert_restores_dense_generation():
    stock = tiny_model("qwen2", attn_implementation="sdpa")
    model = tiny_model("qwen2", attn_implementation="sdpa")
    dense = generate_greedy(stock, TOK, max_new_tokens=6)
    hfx.attention.apply(model, "sinks", num_sink_tokens=1, window=2)
    assert hfx.attention.applied(model) == ["sinks"] and model.config._attn_implementation == "hfx_sinks"
    with torch.no_grad():
        out = model(prompt(), use_cache=True)
    assert isinstance(hfx._compat.output_cache(out), SinkCache)
    ids = prompt()
    _, auto = policy_generate(model, ids)
    _, explicit = policy_generate(model, ids, SinkCache(model, 1, 2))
    torch.testing.assert_close(auto, explicit, atol=0, rtol=0)
    _, dense_logits = policy_generate(stock, ids)
    assert not torch.allclose(auto, dense_logits, atol=1e-3)
    hfx.attention.revert(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(generate_greedy(model, TOK, max_new_tokens=6), dense)
    torch.testing.assert_close(policy_generate(model, ids)[1], dense_logits, atol=0, rtol=0)


def test_training_forward_without_cache_is_plain_attention():
    stock = tiny_model("llama", attn_implementation="sdpa")
    model = sinks_model("llama", num_sink_tokens=1, window=2)
    batch = left_padded_batch(TOK)
    keep = batch["attention_mask"].bool()
    model.train()
    stock.train()
    got = model(**batch).logits[keep]
    torch.testing.assert_close(got, stock(**batch).logits[keep], atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("opts, match", [
    ({"window": 0}, "window must be >= 1"),
    ({"num_sink_tokens": -1}, "num_sink_tokens must be an int >= 0"),
    ({"positions": "absolute"}, "positions must be one of"),
])
def test_bad_options_are_refused(opts, match):
    with pytest.raises(ValueError, match=match):
        hfx.attention.apply(tiny_model("llama"), "sinks", **opts)


def test_misuse_is_refused_with_the_fix():
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2,
                                                                                 vocab_size=50))
    with pytest.raises(ValueError, match="does not support GPT2LMHeadModel"):
        hfx.attention.apply(gpt2, "sinks")
    with pytest.raises(ValueError, match="needs a model prepared with"):
        SinkCache(tiny_model("llama"))
    with pytest.raises(ValueError, match=r"before \(and instead of\) torch.compile"):
        hfx.attention.apply(torch.compile(tiny_model("llama")), "sinks")
    model = sinks_model("llama")
    with pytest.raises(ValueError, match="already has hfx sinks applied"):
        hfx.attention.apply(model, "h2o")
    ids = prompt()
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(TypeError, match="needs its own cache"):
        model(ids, **{cache_argument(): transformers.DynamicCache()})
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        SinkCache(model).crop(-1)
    # the function alone (attn_implementation="hfx_sinks") has no rotary bypass: it says how to apply it
    plain = tiny_model("llama", attn_implementation="hfx_sinks")
    with pytest.raises(RuntimeError, match="rotary bypass"):
        plain(ids)


@pytest.mark.parametrize("method, opts", [("sinks", {"num_sink_tokens": 2, "window": 64}),
                                          ("h2o", {"heavy": 32, "recent": 32})])
def test_beam_search_reorders_the_policy_state(method, opts):
    """Beam search runs through the policy cache's ``reorder_cache``: with a budget covering everything it equals
    the dense model's."""
    stock = tiny_model("llama", attn_implementation="sdpa")
    model = tiny_model("llama", attn_implementation="sdpa")
    hfx.attention.apply(model, method, **opts)
    ids = prompt(length=7)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, num_beams=3,
                  do_sample=False, pad_token_id=TOK.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kwargs), stock.generate(ids, **kwargs))
