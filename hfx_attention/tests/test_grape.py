"""GRAPE (spec C3, C4, Part E 10-15): the Rodrigues and canonical-plane math against independent references, every
preset as an exact graft, contextual phases and learned spectra/bases against hand-built rotations, the additive
forms against explicit biases (also in bf16 at long positions), decode with cache (greedy, beam search, prompt
lookup, sliding window) against recomputing, packing, training through an hfx trainer config, revert and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import hfx
from hfx._compat import cache_argument, output_cache, rope_config_overrides, rope_parameters
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


def rope_inv_freq(model):
    """HF's default spectrum 1 / theta^(2j/D), from the config (not from the module under test), computed in float32
    as HF does (a float64 model keeps that float32 spectrum)."""
    d = model.model.layers[0].self_attn.head_dim
    theta = rope_parameters(model.config)["rope_theta"]
    return (1.0 / theta ** (torch.arange(0, d, 2).float() / d)).double()


def attention_case(model, t=7, seed=5):
    """Layer 0's attention module and fp64 inputs q (B, 4, T, D), k, v (B, 2, T, D), x (B, T, hidden)."""
    module = model.model.layers[0].self_attn
    d = module.head_dim
    q = torch.randn(2, 4, t, d, generator=gen(seed), dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, t, d, generator=gen(seed + 1), dtype=torch.float64)
    x = torch.randn(2, t, model.config.hidden_size, generator=gen(seed + 2), dtype=torch.float64)
    return module, q, k, v, x


@pytest.mark.parametrize("per_head", [False, True])
def test_contextual_phase_is_exclusive_cumsum_of_varying_omega(per_head):
    """Spec C3: ω_t = omega_max σ(z_t / omega_scale) (the rope init: 2, 16), Φ_t = Σ_{τ<t} ω_τ, q_t and k_t rotated by
    HF's apply_rotary_pos_emb at angles Φ_t ω_j. Varying ω (random gate weights) tells exclusive from inclusive."""
    model = randomize(grafted("llama", "contextual", dtype=torch.float64, per_head=per_head), scale=1.0)
    module, q, k, v, x = attention_case(model)
    proj, delta = module.grape.omega_proj, module.grape.log_freq_delta.detach()
    omega = 2 * torch.sigmoid((x @ proj.weight.detach().T + proj.bias.detach()) / 16)  # (B, T, 1|Hkv)
    assert omega.std() > 0.1  # per-token rates that really vary
    phase = torch.cat((torch.zeros_like(omega[:, :1]), omega.cumsum(1)[:, :-1]), 1).transpose(1, 2)  # (B, 1|Hkv, T)
    theta = phase[..., None] * (rope_inv_freq(model) * torch.exp(delta / 16))[None, :, None]  # (B, 1|Hkv, T, D/2)
    emb = torch.cat((theta, theta), -1).expand(-1, 2, -1, -1)
    rotated = [apply_rotary_pos_emb(q[:, 2 * h: 2 * h + 2], k[:, h: h + 1], emb[:, h].cos(), emb[:, h].sin())
               for h in range(2)]
    q_rot, k_rot = torch.cat([r[0] for r in rotated], 1), torch.cat([r[1] for r in rotated], 1)
    want = explicit_attention(q_rot, k_rot, v, 0.0, module.scaling)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9]])  # ignored: the phase replaces the position
    torch.testing.assert_close(run_grape(module, q, k, v, x, pos), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("per_head", [False, True])
def test_learned_frequencies_and_basis_equal_explicit_rotation(per_head):
    """ω_j = ω0_j exp(δ_j / log_freq_scale) and P = exp(A - Aᵀ) (rows per KV head with per_head): q_t -> exp(n_t L) q_t
    with the generator L = Σ_j ω_j (p_{j+D/2} p_jᵀ - p_j p_{j+D/2}ᵀ) on the columns p of P, built as a dense matrix
    and exponentiated here, against the module's per-plane rotations in the learned basis."""
    scale = 4.0
    model = grafted("llama", "learned", dtype=torch.float64, per_head=per_head, basis=True, log_freq_scale=scale)
    module, q, k, v, x = attention_case(model)
    with torch.no_grad():  # keeps P = I for generation: the in-place change below must renew it
        run_grape(module, q, k, v, x, torch.arange(7)[None].expand(2, -1))
    randomize(model, scale=0.5)
    delta, a = module.grape.log_freq_delta.detach(), module.grape.basis_generator.detach()  # (R, D/2), (R, D, D)
    omega = rope_inv_freq(model) * torch.exp(delta / scale)
    basis = torch.linalg.matrix_exp(a - a.transpose(-1, -2))
    half = q.shape[-1] // 2
    lo, hi = basis[..., :half], basis[..., half:]  # the planes (p_j, p_{j+D/2}) as columns
    generator = (hi * omega[:, None]) @ lo.transpose(-1, -2) - (lo * omega[:, None]) @ hi.transpose(-1, -2)
    pos = torch.tensor([[0, 1, 2, 5, 9, 30, 31], [3, 4, 5, 6, 7, 8, 200]])

    def move(x, rows):  # x (B, H, T, D), row of the generator for every head
        g = torch.linalg.matrix_exp(pos[:, None, :, None, None].double() * generator[rows][None, :, None])
        return (g @ x[..., None])[..., 0]

    rows = [h // 2 if per_head else 0 for h in range(4)]
    want = explicit_attention(move(q, rows), move(k, rows[::2]), v, 0.0, module.scaling)
    torch.testing.assert_close(run_grape(module, q, k, v, x, pos), want, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(run_grape(module, q, k, v, x, pos), want, atol=1e-12, rtol=0)
    assert (torch.linalg.matrix_exp(a - a.transpose(-1, -2)) - torch.eye(q.shape[-1])).abs().max() > 0.1


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


def explicit_bias(variant, module, k, x, pos):
    """The fp64 GRAPE-A bias b(i, j) (B, H, T, T) of spec C3 over all tokens, from the module's parameters, the keys
    k (B, Hkv, T, D) and layer inputs x (B, T, hidden)."""
    scale = module.grape.scale.detach().double()
    slope = (scale * torch.tensor(alibi_slopes(4), dtype=torch.float64))[None, :, None, None]
    if variant == "alibi":
        return -slope * rel(pos)
    if variant == "fox":
        gate = module.grape.forget_gate
        logf = F.logsigmoid(x.double() @ gate.weight.detach().double().T + gate.bias.detach().double())  # (B, T, Hkv)
        c = logf.cumsum(1).transpose(1, 2).repeat_interleave(2, 1)  # (B, H, T)
        return scale[None, :, None, None] * (c[..., :, None] - c[..., None, :])  # Σ_{l=j+1..i} log f_l
    u = module.grape.gate_u.detach().double()
    g = F.softplus((k.double() * u[None, :, None]).sum(-1) / math.sqrt(k.shape[-1])).repeat_interleave(2, 1)
    return -rel(pos) * slope * g[:, :, None, :]


@pytest.mark.parametrize("variant", ["alibi", "fox", "keygated"])
def test_additive_bf16_near_diagonal_matches_fp64_at_long_positions(variant):
    """bf16, a chunk of 4 queries after 3000 cached keys, positions 1000..4003 (FoX: log f ≈ -0.7, sums to ≈ -2000):
    bf16 rounds 3001 to 3008, so appended absolute positions or sums would move near-diagonal biases by slope x 4-16.
    With q = 0 the logits are the bias alone, and one-hot values on the last 8 keys read the attention probabilities
    near the diagonal, against the fp64 explicit bias from the same (bf16) parameters, keys and inputs."""
    model = randomize(grafted("llama", variant, dtype=torch.bfloat16, rope=False, scale_init=1.0, fox_bias_init=0.0),
                      seed=2)
    module = model.model.layers[0].self_attn
    n, t, d = 3000, 4, module.head_dim
    k = torch.randn(1, 2, n + t, d, generator=gen(9)).bfloat16()
    x = torch.randn(1, n + t, model.config.hidden_size, generator=gen(10)).bfloat16()
    v = torch.zeros(1, 2, n + t, d, dtype=torch.bfloat16)
    v[:, :, -d:] = torch.eye(d).flip(0)  # key n + t - 1 - c carries e_c
    pos = 1000 + torch.arange(n + t)[None]
    q = torch.zeros(1, 4, n + t, d, dtype=torch.bfloat16)
    with torch.no_grad():
        run_grape(module, q[:, :, :n], k[:, :, :n], v[:, :, :n], x[:, :n], pos[:, :n])  # prefill: fills the state
        keep = torch.arange(n + t)[None, :] <= n + torch.arange(t)[:, None]  # (t, n + t): causal after the cache
        module.__dict__[grape._INPUT] = x[:, n:]
        got, _ = grape_attention(module, q[:, :, n:], k, v, keep[None, None], scaling=module.scaling,
                                 position_ids=pos[:, n:])
    bias = explicit_bias(variant, module, k, x, pos)[:, :, n:]
    probs = bias.masked_fill(~keep, -math.inf).softmax(-1)[..., -d:].flip(-1)  # (1, H, t, 8): keys n+t-1, n+t-2, ...
    assert probs[..., -1, :].sum(-1).min() > 0.01  # near-diagonal mass worth checking in every head
    torch.testing.assert_close(got.double(), probs.transpose(1, 2), atol=2e-3, rtol=2e-2)


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


@pytest.mark.parametrize("variant", ["contextual", "fox"])
def test_sliding_window_cache_equals_full_forward(variant):
    """A rolled sliding window (window 5, 15 tokens) drops keys from the front of the cache, and the state with them."""
    model = tiny_model("mistral", attn_implementation="sdpa", sliding_window=5).double()
    randomize(grape.apply(model, variant, **({} if variant == "contextual" else dict(scale_init=1.0))))
    ids = torch.randint(3, 400, (2, 9), generator=gen(12))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=TOK.pad_token_id)
        full = model(out.sequences).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 8:-1].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("family", "opts"), CACHE_CASES, ids=[c[1]["variant"] for c in CACHE_CASES])
def test_beam_search_with_cache_equals_without(family, opts):
    """Beam search reorders the cache rows between steps; the per-key state (positions, contextual phases, FoX sums)
    must follow them: with a cache = recomputing every step (fp64, 4 beams over 3 left-padded prompts)."""
    model = randomize(grafted(family, dtype=torch.float64, **opts))
    batch = left_padded_batch(TOK)
    runs = []
    with torch.no_grad():
        for use_cache in (True, False):
            runs.append(model.generate(**batch, num_beams=4, do_sample=False, max_new_tokens=6, min_new_tokens=6,
                                       use_cache=use_cache, output_scores=True, return_dict_in_generate=True,
                                       pad_token_id=TOK.pad_token_id))
    cached, recomputed = runs
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(recomputed.scores), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("family", "opts"), CACHE_CASES, ids=[c[1]["variant"] for c in CACHE_CASES])
def test_prompt_lookup_decoding_equals_recomputing(family, opts, monkeypatch):
    """Assisted (prompt lookup) decoding crops rejected draft tokens from the end of the cache: the per-key state must
    drop the same ones (fp64, a prompt with repeats so that drafts are proposed and rejected)."""
    from transformers import DynamicCache

    dropped = []
    crop = DynamicCache.crop

    def spy(self, max_length):
        before = self.get_seq_length()
        crop(self, max_length)
        dropped.append(before - self.get_seq_length())

    monkeypatch.setattr(DynamicCache, "crop", spy)
    model = randomize(grafted(family, dtype=torch.float64, **opts))
    ids = torch.tensor([[15, 26, 37, 48, 59, 15, 26, 37, 48, 59, 15, 26]])
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=TOK.pad_token_id)
    with torch.no_grad():
        drafted = model.generate(ids, prompt_lookup_num_tokens=3, **kwargs)
        recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert max(dropped) > 0  # drafts were rejected and cropped
    n = len(recomputed.logits)  # transformers 4.x may accept one token past max_new_tokens
    assert torch.equal(drafted.sequences[:, : ids.shape[1] + n], recomputed.sequences)
    torch.testing.assert_close(torch.stack(drafted.logits[:n]), torch.stack(recomputed.logits), atol=1e-6, rtol=0)


def test_cache_rows_follow_select_and_foreign_cache_refused():
    """Rows dropped and repeated in the cache (batch_select_indices) keep their own state; a cache GRAPE did not fill
    is refused rather than decoded with the wrong positions."""
    model = randomize(grafted("llama", "fox", dtype=torch.float64, scale_init=1.0))
    batch = left_padded_batch(TOK)
    pos = generate_positions(batch)
    nxt = torch.randint(3, 400, (3, 1), generator=gen(11))
    with torch.no_grad():
        cache = output_cache(model(**batch, position_ids=pos, use_cache=True))
        rows = torch.tensor([2, 0, 2])
        cache.batch_select_indices(rows)
        mask = torch.cat((batch["attention_mask"][rows], torch.ones(3, 1, dtype=torch.long)), 1)
        step = model(nxt, attention_mask=mask, position_ids=pos[rows, -1:] + 1, **{cache_argument(): cache})
        full = model(torch.cat((batch["input_ids"][rows], nxt), 1), attention_mask=mask,
                     position_ids=torch.cat((pos[rows], pos[rows, -1:] + 1), 1))
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-10, rtol=0)
        other = randomize(grafted("llama", "fox", dtype=torch.float64, scale_init=1.0), seed=3)
        with pytest.raises(RuntimeError, match="holds keys it did not see"):
            other(nxt, attention_mask=mask, position_ids=pos[rows, -1:] + 2, **{cache_argument(): cache})


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
