"""The shared attention infrastructure (spec Part E 1–4): registration with the mask, masks handed to custom
functions, the rotary bypass, supported families and revert, on every supported family and both version rows."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hfx
from hfx.testing import FAMILIES, generate_greedy, left_padded_batch, tiny_model, tiny_tokenizer
from hfx_attention._core import check_supported, keep_mask, register, repeat_kv, set_attention
from hfx_attention.rotary import BypassedRotary, apply_rope, bypass_rotary, rope_cos_sin

pytestmark = pytest.mark.floor


def eager_on_keep_mask(module, query, key, value, attention_mask, *, scaling, dropout=0.0, **kwargs):
    """A from-scratch softmax attention driven by ``keep_mask``: what every hfx function does with masks."""
    keep = keep_mask(attention_mask, query.shape[2], key.shape[2], query.device)
    groups = module.num_key_value_groups
    scores = (query @ repeat_kv(key, groups).transpose(-1, -2)) * scaling
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (probs @ repeat_kv(value, groups)).transpose(1, 2).contiguous(), None


def rope_inside(module, query, key, value, attention_mask, **kwargs):
    """Rotary bypass + RoPE applied inside the attention function (spec TL;DR #5)."""
    positions = kwargs["position_ids"]
    q_cos, q_sin = rope_cos_sin(module, query, positions)
    query = apply_rope(query, q_cos, q_sin)
    # keys come back from the cache un-rotated: rotate each at its own position (absolute, from 0)
    k_pos = kwargs.get("hfx_key_positions")
    if k_pos is None:
        k_pos = torch.arange(key.shape[2], device=key.device)[None].expand(key.shape[0], -1)
    k_cos, k_sin = rope_cos_sin(module, key, k_pos)
    return sdpa_attention_forward(module, query, apply_rope(key, k_cos, k_sin), value, attention_mask, **kwargs)


register("hfx_test_keepmask", eager_on_keep_mask)
register("hfx_test_rope_inside", rope_inside)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_mask_function_matches_sdpa_on_left_padding(family):
    model = tiny_model(family, attn_implementation="hfx_test_keepmask")
    hfx.testing.assert_matches_sdpa(model, atol=1e-5)


def test_without_mask_registration_padding_is_ignored():
    """The regression guard: the same function registered without its mask function gives wrong padded rows."""
    from transformers import AttentionInterface

    AttentionInterface.register("hfx_test_no_mask", eager_on_keep_mask)
    model = tiny_model("llama", attn_implementation="hfx_test_no_mask")
    with pytest.raises(AssertionError, match="differ from SDPA"):
        hfx.testing.assert_matches_sdpa(model, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_mask_none_is_bottom_right_causal(family):
    """A chunked prefill against a warm cache (no padding, so transformers passes no mask) equals one full pass."""
    model = tiny_model(family, attn_implementation="hfx_test_keepmask").double()
    ids = torch.randint(3, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :6], use_cache=True)
        rest = model(ids[:, 6:], **{hfx._compat.cache_argument(): hfx._compat.output_cache(first)}).logits
    torch.testing.assert_close(rest, full[:, 6:], atol=1e-12, rtol=0)


def test_keep_mask_forms():
    additive = torch.tensor([[0.0, torch.finfo(torch.float32).min]])[None, None]
    assert keep_mask(additive, 1, 2).tolist() == [[[[True, False]]]]
    assert keep_mask(None, 2, 4).tolist() == [[[[True, True, True, False], [True, True, True, True]]]]


@pytest.mark.parametrize("family", FAMILIES)
def test_rotary_bypass_is_identical_to_stock(family):
    """Prefill logits on a left-padded batch and greedy generation are unchanged when RoPE moves inside the
    attention function (keys are cached pre-RoPE and rotated at their positions at every step)."""
    stock = tiny_model(family, attn_implementation="sdpa")
    model = tiny_model(family, attn_implementation="sdpa")
    bypass_rotary(model)
    set_attention(model, "hfx_test_rope_inside")
    assert isinstance(model.model.rotary_emb, BypassedRotary)
    tok = tiny_tokenizer()
    batch = left_padded_batch(tok)
    keep = batch["attention_mask"].bool()
    # generate's positions are cumsum(mask) - 1: keys of a padded row sit at those positions too
    with torch.no_grad():
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        got = model(**batch, position_ids=positions, hfx_key_positions=positions).logits[keep]
        want_pos = stock(**batch, position_ids=positions).logits[keep]
    torch.testing.assert_close(got, want_pos, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # keys left un-rotated would differ: the comparison above has teeth
        unrotated = model(**batch, position_ids=positions, hfx_key_positions=torch.zeros_like(positions)).logits
    assert not torch.allclose(unrotated[keep], want_pos, atol=1e-3)
    # generation without padding: key positions are 0..T-1, as the function assumes by default
    one = {"texts": ["12+7=19. hello world"]}
    assert torch.equal(generate_greedy(model, tok, max_new_tokens=6, **one),
                       generate_greedy(stock, tok, max_new_tokens=6, **one))


def test_rope_cos_sin_needs_the_bypass():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="rotary bypass"):
        rope_cos_sin(model.model.layers[0].self_attn, torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, dtype=torch.long))


def test_unsupported_model_is_refused_with_the_list():
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"does not support GPT2LMHeadModel.*llama, qwen2, qwen3, mistral"):
        check_supported(model, "sinks")


def test_revert_restores_modules_and_implementation():
    model = tiny_model("qwen2", attn_implementation="sdpa")
    rotary = model.model.rotary_emb
    batch = left_padded_batch(tiny_tokenizer())
    with torch.no_grad():
        before = model(**batch).logits
    bypass_rotary(model)
    set_attention(model, "hfx_test_keepmask")
    assert model.config._attn_implementation == "hfx_test_keepmask"
    hfx.attention.revert(model)
    assert model.model.rotary_emb is rotary and model.config._attn_implementation == "sdpa"
    assert not hasattr(model.model.layers[0].self_attn, "hfx_rotary")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=0, rtol=0)
    assert hfx.attention.applied(model) == []


def test_cache_bytes_counts_every_held_tensor():
    from hfx._compat import output_cache
    from hfx_attention._core import cache_bytes

    model = tiny_model("llama")
    ids = torch.randint(3, 50, (2, 7))
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
    c = model.config  # keys + values, every layer: 2 × layers × batch × kv heads × tokens × head_dim × 4 bytes
    assert cache_bytes(cache) == 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * 7 * c.head_dim * 4


def test_register_makes_every_name_known_to_transformers_in_a_fresh_process():
    import subprocess
    import sys

    code = ("import hfx; keys = hfx.attention.register(); from transformers import AttentionInterface, "
            "AttentionMaskInterface; print(sorted(keys)); "
            "print(all(k in AttentionInterface() and k in AttentionMaskInterface() for k in keys))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    names = ["castle", "grape", "h2o", "sinks", "softplus", "tpa"]
    assert out[0] == str([f"hfx_{n}" for n in names]) and out[1] == "True"
