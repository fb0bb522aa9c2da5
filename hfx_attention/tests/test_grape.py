"""GRAPE (spec C3, C4, Part E 10-15): the Rodrigues and canonical-plane math against independent references, every
preset as an exact graft, the additive forms against explicit biases, decode with cache against a full forward,
packing, training through an hfx trainer config, revert and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import hfx
from hfx._compat import rope_config_overrides, rope_parameters
from hfx.testing import (
    FAMILIES,
    fast_training_args,
    left_padded_batch,
    make_tiny_datasets,
    params_changed,
    snapshot_params,
    tiny_model,
    tiny_tokenizer,
)
from hfx_attention import grape
from hfx_attention.grape import alibi_slopes, grape_attention, rodrigues, rotate_planes

pytestmark = pytest.mark.floor

TOK = tiny_tokenizer()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randomize(model, seed=1, scale=0.3):
    """Give every GRAPE parameter a random non-trivial value (so exactness tests are not about zeros)."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grape." in name:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def grafted(family="llama", variant="rope", dtype=torch.float32, **opts):
    model = tiny_model(family, attn_implementation="sdpa").to(dtype)
    grape.apply(model, variant, **opts)
    return model


def generate_positions(batch):
    return (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------------------
# E10-E12: the math
# --------------------------------------------------------------------------------------------------


def test_canonical_planes_equal_hf_rope_fp64():
    d, base = 16, 10000.0
    q = torch.randn(2, 3, 7, d, generator=gen(0), dtype=torch.float64)
    k = torch.randn(2, 3, 7, d, generator=gen(1), dtype=torch.float64)
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    pos = torch.tensor([[0, 1, 2, 5, 9, 100, 4096], [3, 4, 5, 6, 7, 8, 9]], dtype=torch.float64)
    theta = pos[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((theta, theta), -1)
    want_q, want_k = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    torch.testing.assert_close(rotate_planes(q, theta[:, None]), want_q, atol=1e-12, rtol=0)
    torch.testing.assert_close(rotate_planes(k, theta[:, None]), want_k, atol=1e-12, rtol=0)
    # and as the literal product of Rodrigues rotations in the planes (e_j, e_{j+D/2}) with HF's sign
    eye = torch.eye(d, dtype=torch.float64)
    y = q
    for j in range(d // 2):
        y = rodrigues(y, eye[j + d // 2], eye[j], theta[:, None, :, j])
    torch.testing.assert_close(y, want_q, atol=1e-12, rtol=0)


def test_rodrigues_equals_matrix_exp():
    d = 6
    for seed in range(3):
        a, b = torch.randn(2, d, generator=gen(seed), dtype=torch.float64)  # neither unit nor orthogonal
        x = torch.randn(5, d, generator=gen(10 + seed), dtype=torch.float64)
        theta = torch.randn(5, generator=gen(20 + seed), dtype=torch.float64) * 3
        gen_l = torch.outer(a, b) - torch.outer(b, a)
        want = torch.stack([torch.linalg.matrix_exp(t * gen_l) @ xi for t, xi in zip(theta, x, strict=True)])
        torch.testing.assert_close(rodrigues(x, a, b, theta), want, atol=1e-12, rtol=0)
    a = torch.randn(d, generator=gen(5), dtype=torch.float64)  # degenerate plane (b = 2a): the identity
    torch.testing.assert_close(rodrigues(x, a, 2 * a, theta), x, atol=1e-12, rtol=0)


def test_shift_invariance_non_commuting_single_generator():
    """<G(n+c)q, G(m+c)k> = <G(n)q, G(m)k> for a random (non-canonical) plane: attention outputs do not move."""
    d, t = 8, 6
    a, b = torch.randn(2, d, generator=gen(3), dtype=torch.float64)
    q, k, v = torch.randn(3, t, d, generator=gen(4), dtype=torch.float64)
    pos = torch.arange(t, dtype=torch.float64)
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def attend(shift):
        qr, kr = rodrigues(q, a, b, 0.37 * (pos + shift)), rodrigues(k, a, b, 0.37 * (pos + shift))
        return ((qr @ kr.T / math.sqrt(d)).masked_fill(~causal, -math.inf)).softmax(-1) @ v

    torch.testing.assert_close(attend(13.0), attend(0.0), atol=1e-12, rtol=0)
    assert not torch.allclose(attend(0.0), ((q @ k.T / math.sqrt(d)).masked_fill(~causal, -math.inf)).softmax(-1) @ v)


@pytest.mark.parametrize("opts", [dict(variant="learned", per_head=True, basis=True), dict(variant="contextual")])
def test_shift_invariance_commuting_whole_model(opts):
    """Learned spectrum and learned planes (commuting), fp64: adding a constant to every position changes nothing."""
    model = randomize(grafted("llama", dtype=torch.float64, **opts))
    ids = torch.randint(3, 400, (2, 9), generator=gen(0))
    pos = torch.arange(9)[None].expand(2, -1)
    with torch.no_grad():
        base, shifted = model(ids, position_ids=pos).logits, model(ids, position_ids=pos + 37).logits
    torch.testing.assert_close(shifted, base, atol=1e-10, rtol=0)
    if opts["variant"] == "learned":  # positions matter at all (the test has teeth)
        with torch.no_grad():
            other = model(ids, position_ids=pos * 2).logits
        assert (other - base).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------
# E10, E13: exact grafts (whole model)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["rope", "learned", "contextual"])
def test_multiplicative_grafts_are_stock_exactly(family, variant):
    stock = tiny_model(family, attn_implementation="sdpa")
    model = grafted(family, variant)
    batch = left_padded_batch(TOK)
    keep = batch["attention_mask"].bool()
    pos = generate_positions(batch)
    with torch.no_grad():
        got, want = model(**batch, position_ids=pos).logits[keep], stock(**batch, position_ids=pos).logits[keep]
    if variant == "contextual":  # the phase counts tokens from the row start: relative law, not bit identity
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:
        assert torch.equal(got, want)
    assert model.config._attn_implementation == "hfx_grape"


def test_contextual_constant_rate_is_interpolated_rope():
    """ω ≡ c (w = 0, bias set) makes Φ_t = c t: contextual GRAPE then equals the PI preset with factor 1/c."""
    ctx = grafted("qwen2", "contextual", dtype=torch.float64)
    pi = grafted("qwen2", "pi", dtype=torch.float64, factor=2.0)
    for m in grape_modules(ctx):  # omega_max * sigmoid(b / 16) = 2 sigmoid(b / 16) = 0.5
        m.grape.omega_proj.bias.data.fill_(16 * math.log(0.25 / 0.75))
    ids = torch.randint(3, 400, (1, 10), generator=gen(1))
    with torch.no_grad():
        torch.testing.assert_close(ctx(ids).logits, pi(ids).logits, atol=1e-10, rtol=0)
    softplus = grafted("qwen2", "contextual", gate="softplus")
    stock = tiny_model("qwen2", attn_implementation="sdpa")
    with torch.no_grad():  # softplus gate at init: ω = softplus(softplus⁻¹(1)) = 1 to rounding
        torch.testing.assert_close(softplus(ids).logits, stock(ids).logits, atol=1e-5, rtol=0)
    official = grafted("qwen2", "contextual", init="official")
    with torch.no_grad():  # the from-scratch init is not RoPE
        assert (official(ids).logits - stock(ids).logits).abs().max() > 1e-3


def grape_modules(model):
    return [layer.self_attn for layer in model.model.layers]


# --------------------------------------------------------------------------------------------------
# E14: Position Interpolation
# --------------------------------------------------------------------------------------------------


def test_pi_equals_hf_linear_rope():
    s = 4.0
    theta = rope_parameters(tiny_model("llama").config)["rope_theta"]
    linear = tiny_model("llama", attn_implementation="sdpa", **rope_config_overrides("linear", theta, factor=s))
    pi = grafted("llama", "pi", factor=s)
    batch = left_padded_batch(TOK)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(pi(**batch).logits[keep], linear(**batch).logits[keep], atol=1e-6, rtol=0)
        # HF linear at positions m*s equals default RoPE at m
        default = tiny_model("llama", attn_implementation="sdpa")
        ids = batch["input_ids"][-1:]
        m = torch.arange(ids.shape[1])[None]
        torch.testing.assert_close(linear(ids, position_ids=m * int(s)).logits, default(ids, position_ids=m).logits,
                                   atol=1e-5, rtol=0)
        assert (pi(ids).logits - default(ids).logits).abs().max() > 1e-4  # PI does change the model


# --------------------------------------------------------------------------------------------------
# E15: GRAPE-A against explicit biases (attention function, fp64)
# --------------------------------------------------------------------------------------------------


def explicit_attention(q, k, v, bias, scaling):
    """softmax(q kᵀ scaling + bias) v over causal keys, GQA by repetition; out (B, T, H, D)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    t = q.shape[2]
    logits = q @ k.transpose(-1, -2) * scaling + bias
    logits = logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
    return (logits.softmax(-1) @ v).transpose(1, 2)


def additive_case(variant, **opts):
    model = randomize(grafted("llama", variant, dtype=torch.float64, rope=False, scale_init=1.0, **opts), seed=2)
    module = model.model.layers[0].self_attn
    b, t, d = 2, 7, module.head_dim
    q = torch.randn(b, 4, t, d, generator=gen(5), dtype=torch.float64)
    k, v = torch.randn(2, b, 2, t, d, generator=gen(6), dtype=torch.float64)
    x = torch.randn(b, t, model.config.hidden_size, generator=gen(7), dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
    return module, q, k, v, x, pos


def run_grape(module, q, k, v, x, pos):
    module.__dict__[grape._INPUT] = x
    out, _ = grape_attention(module, q, k, v, None, scaling=module.scaling, position_ids=pos)
    return out


def rel(pos):
    return (pos[:, :, None] - pos[:, None, :]).to(torch.float64)[:, None]  # (B, 1, T, T): i - j


def test_alibi_appended_dims_equal_explicit_bias():
    module, q, k, v, x, pos = additive_case("alibi")
    s = module.grape.scale.detach() * torch.tensor(alibi_slopes(4), dtype=torch.float64)
    bias = -s[None, :, None, None] * rel(pos)
    torch.testing.assert_close(run_grape(module, q, k, v, x, pos), explicit_attention(q, k, v, bias, module.scaling),
                               atol=1e-12, rtol=0)


def test_alibi_slopes_non_power_of_two():
    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    assert alibi_slopes(6) == alibi_slopes(4) + alibi_slopes(8)[0:4:2]
    assert alibi_slopes(12)[8:] == alibi_slopes(16)[0:8:2]


def test_fox_key_only_bias_equals_explicit_path_sum():
    module, q, k, v, x, pos = additive_case("fox")
    gate = module.grape.forget_gate
    logf = F.logsigmoid(x @ gate.weight.detach().T + gate.bias.detach())  # (B, T, Hkv)
    t = q.shape[2]
    path = torch.zeros(2, 2, t, t, dtype=torch.float64)
    for i in range(t):
        for j in range(i + 1):
            path[:, :, i, j] = logf[:, j + 1: i + 1].sum(1)  # Σ_{l=j+1..i} log f_l
    bias = module.grape.scale.detach()[None, :, None, None] * path.repeat_interleave(2, 1)
    torch.testing.assert_close(run_grape(module, q, k, v, x, pos), explicit_attention(q, k, v, bias, module.scaling),
                               atol=1e-12, rtol=0)


def test_keygated_appended_dims_equal_explicit_and_reduce_to_alibi():
    module, q, k, v, x, pos = additive_case("keygated")
    omega = module.grape.scale.detach() * torch.tensor(alibi_slopes(4), dtype=torch.float64)
    g = F.softplus((k * module.grape.gate_u.detach()[None, :, None]).sum(-1) / math.sqrt(k.shape[-1]))  # (B,Hkv,T)
    bias = -rel(pos) * omega[None, :, None, None] * g.repeat_interleave(2, 1)[:, :, None, :]
    torch.testing.assert_close(run_grape(module, q, k, v, x, pos), explicit_attention(q, k, v, bias, module.scaling),
                               atol=1e-12, rtol=0)
    # a constant gate (u = 0: g = softplus(0) = log 2) is ALiBi with slopes ω_h log 2
    module.grape.gate_u.data.zero_()
    alibi_bias = -rel(pos) * (omega * math.log(2))[None, :, None, None]
    torch.testing.assert_close(run_grape(module, q, k, v, x, pos),
                               explicit_attention(q, k, v, alibi_bias, module.scaling), atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["alibi", "fox", "keygated"])
def test_zero_init_additive_graft_is_base_model(variant):
    stock = tiny_model("qwen3", attn_implementation="sdpa").double()
    model = grafted("qwen3", variant, dtype=torch.float64)
    batch = left_padded_batch(TOK)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        got = model(**batch).logits[keep]
        torch.testing.assert_close(got, stock(**batch).logits[keep], atol=1e-12, rtol=0)
        randomize(model)  # non-zero strengths do change it
        assert (model(**batch).logits[keep] - got).abs().max() > 1e-4


def test_fox_packed_sequences_equal_separate_runs():
    model = randomize(grafted("llama", "fox", dtype=torch.float64, scale_init=1.0))
    ids = torch.randint(3, 400, (1, 11), generator=gen(8))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        packed = model(ids, position_ids=pos, use_cache=False).logits
        first, second = model(ids[:, :4], use_cache=False).logits, model(ids[:, 4:], use_cache=False).logits
    torch.testing.assert_close(packed, torch.cat((first, second), 1), atol=1e-10, rtol=0)


# --------------------------------------------------------------------------------------------------
# Decode with cache = full forward
# --------------------------------------------------------------------------------------------------

CACHE_CASES = [
    ("llama", dict(variant="learned", per_head=True)),
    ("qwen3", dict(variant="contextual", per_head=True)),
    ("qwen2", dict(variant="pi", factor=3.0)),
    ("mistral", dict(variant="alibi", scale_init=1.0)),
    ("llama", dict(variant="fox", scale_init=1.0)),
    ("qwen2", dict(variant="keygated", scale_init=1.0)),
]


@pytest.mark.parametrize(("family", "opts"), CACHE_CASES, ids=[c[1]["variant"] for c in CACHE_CASES])
def test_generate_with_cache_equals_full_forward(family, opts):
    model = randomize(grafted(family, dtype=torch.float64, **opts))
    batch = left_padded_batch(TOK)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=TOK.pad_token_id)
        mask = torch.cat((batch["attention_mask"], torch.ones(3, 4, dtype=torch.long)), 1)
        full = model(out.sequences, attention_mask=mask, position_ids=generate_positions({"attention_mask": mask}))
    prompt = batch["input_ids"].shape[1]
    stepped = torch.stack(out.logits, 1)
    # generate hands back float32 logits: fp64 agreement shows as equality to float32 rounding
    torch.testing.assert_close(stepped, full.logits[:, prompt - 1: -1].float(), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# Training through an hfx trainer config; revert; bad input
# --------------------------------------------------------------------------------------------------

TRAINABLE = [
    dict(variant="learned", basis=True),
    dict(variant="contextual"),
    dict(variant="alibi"),
    dict(variant="fox"),
    dict(variant="keygated"),
]


@pytest.mark.parametrize("args", TRAINABLE, ids=[a["variant"] for a in TRAINABLE])
def test_trains_through_hfx_trainer_config(args, tiny_model_dir, tmp_path):
    from trl import SFTConfig, SFTTrainer

    config = fast_training_args(hfx.extend(SFTConfig), tmp_path, hfx_attention="grape", hfx_attention_args=args,
                                max_length=32)
    trainer = hfx.extend(SFTTrainer)(model=str(tiny_model_dir("qwen2")), args=config,
                                     train_dataset=make_tiny_datasets(4)["language_modeling"])
    new = {n for n, p in trainer.model.named_parameters() if ".grape." in n}
    assert new and all(p.requires_grad for n, p in trainer.model.named_parameters() if n in new)
    before = snapshot_params(trainer.model)
    trainer.train()
    changed = set(params_changed(before, trainer.model))
    assert new <= changed, f"GRAPE parameters that did not change: {sorted(new - changed)}"
    assert hfx.attention.applied(trainer.model) == ["grape"]


def test_revert_restores_the_model():
    model = tiny_model("mistral", attn_implementation="sdpa")
    keys = set(model.state_dict())
    batch = left_padded_batch(TOK)
    with torch.no_grad():
        before = model(**batch).logits
    hfx.attention.apply(model, "grape", variant="fox", scale_init=1.0)
    assert {k for k in model.state_dict() if ".grape." in k} and set(model.state_dict()) > keys
    with torch.no_grad():
        assert not torch.equal(randomize(model)(**batch).logits, before)
    hfx.attention.revert(model)
    assert set(model.state_dict()) == keys and model.config._attn_implementation == "sdpa"
    attn = model.model.layers[0].self_attn
    assert not attn._forward_pre_hooks and not hasattr(attn, "grape") and not hasattr(attn, "hfx_rotary")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_bad_input_names_the_fix():
    model = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="variant must be one of rope, pi"):
        grape.apply(model, "yarn")
    with pytest.raises(ValueError, match="needs factor=s > 0"):
        grape.apply(model, "pi")
    with pytest.raises(ValueError, match='with variant="pi"'):
        grape.apply(model, "rope", factor=2.0)
    with pytest.raises(ValueError, match='gate must be "sigmoid" or "softplus"'):
        grape.apply(model, "contextual", gate="relu")
    grape.apply(model, "rope")
    with pytest.raises(ValueError, match=r"already applied.*revert"):
        grape.apply(model, "alibi")
    import transformers

    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match="supported model types: llama"):
        grape.apply(gpt2, "rope")
    plain = tiny_model("llama", attn_implementation="hfx_grape")
    with pytest.raises(RuntimeError, match=r'hfx\.attention\.apply\(model, "grape"'):
        plain(torch.tensor([[5, 6, 7]]))
