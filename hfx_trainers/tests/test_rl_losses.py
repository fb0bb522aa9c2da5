"""RPG and DRPO losses: the spec's test vectors (specs/trainers.md §6.6, §7.6) and independent re-derivations.

The references here are written from the formulas in the spec, elementwise in plain Python floats, and never call
the code under test's helpers; exact expectations over a finite support check that each KL term is unbiased."""

import math
import random

import pytest
import torch

from hfx_trainers.losses import (
    RPG_KL_KINDS,
    binary_rewards,
    drpo_loss,
    drpo_positive_weights,
    rpg_kl_term,
    rpg_loss,
)

F64 = torch.float64


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.item(), grad


# --------------------------------------------------------------------------------------------------
# RPG: spec vectors
# --------------------------------------------------------------------------------------------------

DIFF_LOGP = torch.tensor([[-1.0, -2.0, -0.5, -1.5]], dtype=F64)
DIFF_OLD = torch.tensor([[-1.2, -1.8, -0.5, -1.0]], dtype=F64)
DIFF_ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=F64)
# kind -> (token-mean kl, d kl/dlogp, total loss, d total/dlogp), spec §6.6
DIFF_VECTORS = {
    "fkl": (0.125, [-0.25, -0.25, -0.25, -0.25], -0.047533, [-0.330351, -0.229683, 0.225, -0.025]),
    "rkl": (-0.055683, [0.366421, 0.163746, 0.25, 0.075816], -0.065602, [-0.268709, -0.188308, 0.275, 0.007582]),
    "ufkl": (0.036666, [0.055351, -0.045317, 0.0, -0.098367], -0.056367, [-0.299816, -0.209214, 0.25, -0.009837]),
    "urkl": (0.032651, [0.061070, -0.040937, 0.0, -0.075816], -0.056768, [-0.299244, -0.208776, 0.25, -0.007582]),
}

RF_LOGP = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -0.3]], dtype=F64)
RF_OLD = torch.tensor([[-1.2, -1.8, -0.5, -1.0, -1.0]], dtype=F64)
RF_ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]], dtype=F64)
RF_VECTORS = {
    "fkl": (0.342573, [-0.264281, -0.183746, 0.18, 0, 0]),
    "rkl": (0.271280, [-0.214967, -0.150646, 0.22, 0, 0]),
    "ufkl": (0.307076, [-0.239852, -0.167372, 0.20, 0, 0]),
    "urkl": (0.306778, [-0.239395, -0.167021, 0.20, 0, 0]),
}


@pytest.mark.parametrize("kind", RPG_KL_KINDS)
def test_rpg_kl_term_matches_spec_vector(kind):
    kl, kl_grad, _, _ = DIFF_VECTORS[kind]
    value, grad = _grad(lambda lp: rpg_kl_term(lp, DIFF_OLD, kind).mean(), DIFF_LOGP)
    assert value == pytest.approx(kl, abs=1e-6)
    torch.testing.assert_close(grad[0], torch.tensor(kl_grad, dtype=F64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", RPG_KL_KINDS)
def test_rpg_differentiable_loss_matches_spec_vector(kind):
    _, _, total, total_grad = DIFF_VECTORS[kind]
    mask = torch.ones_like(DIFF_LOGP)
    value, grad = _grad(lambda lp: rpg_loss(lp, DIFF_OLD, DIFF_ADV, mask, kind=kind, beta=0.1, clip_c=10.0), DIFF_LOGP)
    assert value == pytest.approx(total, abs=1e-6)
    torch.testing.assert_close(grad[0], torch.tensor(total_grad, dtype=F64), atol=1e-6, rtol=0)


def test_rpg_ppo_part_alone_matches_spec():
    mask = torch.ones_like(DIFF_LOGP)
    assert rpg_loss(DIFF_LOGP, DIFF_OLD, DIFF_ADV, mask, beta=0.0, clip_c=10.0).item() == pytest.approx(-0.060033,
                                                                                                       abs=1e-6)


@pytest.mark.parametrize("kind", RPG_KL_KINDS)
def test_rpg_reinforce_matches_spec_vector(kind):
    loss, loss_grad = RF_VECTORS[kind]
    mask = torch.ones_like(RF_LOGP)
    value, grad = _grad(
        lambda lp: rpg_loss(lp, RF_OLD, RF_ADV, mask, kind=kind, estimator="reinforce", beta=0.1, clip_c=3.0), RF_LOGP
    )
    torch.testing.assert_close(grad[0], torch.tensor(loss_grad, dtype=F64), atol=1e-6, rtol=0)
    assert value == pytest.approx(loss, abs=1e-6)


def test_rpg_gradient_identity_spec_vector():
    lp, old = torch.tensor([[-1.0, -2.0]], dtype=F64), torch.tensor([[-1.1, -1.9]], dtype=F64)
    adv, mask = torch.tensor([[0.5, -0.5]], dtype=F64), torch.ones(1, 2, dtype=F64)
    no_clip = dict(kind="urkl", beta=0.1, epsilon_low=0.999, epsilon_high=1e9, clip_c=1e9)
    expected = torch.tensor([-0.270767, 0.221685], dtype=F64)
    for estimator in ("differentiable", "reinforce"):
        _, grad = _grad(lambda x, e=estimator: rpg_loss(x, old, adv, mask, estimator=e, **no_clip), lp)
        torch.testing.assert_close(grad[0], expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# RPG: independent re-derivation on random inputs
# --------------------------------------------------------------------------------------------------


def _ref_kl_and_slope(kind, log_w):
    """The spec's table with reference π_old: (term value, d term / d log π_θ)."""
    w = math.exp(log_w)
    return {
        "fkl": (-log_w, -1.0),
        "rkl": (w * log_w, w * log_w + w),
        "ufkl": (w - log_w - 1.0, w - 1.0),
        "urkl": (w * (log_w - 1.0) + 1.0, w * log_w),
    }[kind]


def _ref_rpg_token(kind, estimator, lp, old, a, beta, lo, hi, c):
    """(loss value, d loss / d log π_θ) of one token, written from spec §6.1 case by case."""
    log_w = lp - old
    w = math.exp(log_w)
    kl, slope = _ref_kl_and_slope(kind, log_w)
    if estimator == "differentiable":
        clip_w = min(max(w, lo), hi)
        if -w * a >= -clip_w * a:  # unclipped branch active
            pg, dpg = -w * a, -w * a
        else:
            pg, dpg = -clip_w * a, 0.0
        if a < 0 and -c * a < pg:
            pg, dpg = -c * a, 0.0
        return pg + beta * kl, dpg + beta * slope
    w_bar = min(max(w, lo), hi)
    big_c = -beta * _ref_kl_and_slope(kind, math.log(w_bar))[1]
    a_prime = a + big_c / w
    live = w < hi if a_prime >= 0 else lo < w < c
    if live:
        return -(w * a + big_c) * lp, -(w * a + big_c)
    if a_prime >= 0:
        return -(a * hi - big_c) * lp, 0.0
    return (-(a * lo - big_c) * lp if w <= lo else -(a * c + big_c) * lp), 0.0


@pytest.mark.parametrize("estimator", ["differentiable", "reinforce"])
@pytest.mark.parametrize("kind", RPG_KL_KINDS)
def test_rpg_loss_matches_elementwise_reference(kind, estimator):
    gen = torch.Generator().manual_seed(hash((kind, estimator)) % 2**31)
    b, t = 3, 7
    lp = -torch.rand(b, t, generator=gen, dtype=F64) * 3
    old = lp + torch.randn(b, t, generator=gen, dtype=F64) * 0.4  # ratios on both sides of every clip bound
    adv = torch.randn(b, generator=gen, dtype=F64)
    mask = (torch.rand(b, t, generator=gen) < 0.8).to(F64)
    mask[:, 0] = 1
    opts = dict(beta=0.3, epsilon_low=0.2, epsilon_high=0.28, clip_c=2.0)
    value, grad = _grad(lambda x: rpg_loss(x, old, adv, mask, kind=kind, estimator=estimator, **opts), lp)
    n = mask.sum().item()
    ref_value, ref_grad = 0.0, torch.zeros(b, t, dtype=F64)
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                v, g = _ref_rpg_token(kind, estimator, lp[i, j].item(), old[i, j].item(), adv[i].item(), 0.3, 0.8,
                                      1.28, 2.0)
                ref_value += v / n
                ref_grad[i, j] = g / n
    assert value == pytest.approx(ref_value, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", RPG_KL_KINDS)
def test_rpg_estimators_share_the_gradient_without_clipping(kind):
    gen = torch.Generator().manual_seed(7)
    lp = -torch.rand(4, 5, generator=gen, dtype=F64) * 2
    old = lp + torch.randn(4, 5, generator=gen, dtype=F64) * 0.3
    adv, mask = torch.randn(4, generator=gen, dtype=F64), torch.ones(4, 5, dtype=F64)
    no_clip = dict(kind=kind, beta=0.2, epsilon_low=0.9999, epsilon_high=1e9, clip_c=1e9)
    _, g_diff = _grad(lambda x: rpg_loss(x, old, adv, mask, **no_clip), lp)
    _, g_rf = _grad(lambda x: rpg_loss(x, old, adv, mask, estimator="reinforce", **no_clip), lp)
    torch.testing.assert_close(g_diff, g_rf, rtol=1e-10, atol=1e-12)


def _categorical(seed, n=6):
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, generator=gen, dtype=F64), 0)


@pytest.mark.parametrize("kind", RPG_KL_KINDS)
def test_rpg_kl_term_is_unbiased_for_its_divergence(kind):
    """Σ_x π_old(x)·term(x) equals the divergence, and its gradient the divergence's, for π_ref = π_old and π_ref ≠
    π_old, on an exact finite support."""
    log_old, log_ref, logits = _categorical(1), _categorical(2), torch.randn(6, dtype=F64) * 0.5

    def divergences(log_theta, log_r):
        p, r = log_theta.exp(), log_r.exp()
        return {
            "fkl": (r * (log_r - log_theta)).sum(),
            "rkl": (p * (log_theta - log_r)).sum(),
            "ufkl": (r * (log_r - log_theta)).sum() + p.sum() - r.sum(),
            "urkl": (p * (log_theta - log_r)).sum() - p.sum() + r.sum(),
        }[kind]

    for ref, old_arg in ((log_old, None), (log_ref, log_old)):
        def expected(z, ref=ref):
            return divergences(torch.log_softmax(z, 0), ref)

        def estimate(z, ref=ref, old_arg=old_arg):
            return (log_old.exp() * rpg_kl_term(torch.log_softmax(z, 0), ref, kind, old_logps=old_arg)).sum()

        v_est, g_est = _grad(estimate, logits)
        v_exp, g_exp = _grad(expected, logits)
        assert v_est == pytest.approx(v_exp, rel=1e-12, abs=1e-14)
        torch.testing.assert_close(g_est, g_exp, rtol=1e-10, atol=1e-13)


def test_rpg_sequence_level_uses_whole_response_ratios():
    gen = torch.Generator().manual_seed(3)
    lp = -torch.rand(3, 4, generator=gen, dtype=F64)
    old = lp + 0.05 * torch.randn(3, 4, generator=gen, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)
    adv = torch.tensor([0.5, -1.0, 0.2], dtype=F64)
    seq = rpg_loss(lp, old, adv, mask, kind="rkl", beta=0.1, level="sequence")
    # by hand: w = exp(Σ_t (lp − old)), loss per sequence = dual-clip PPO + β·w·log w, mean over sequences
    total = 0.0
    for i in range(3):
        log_w = ((lp[i] - old[i]) * mask[i]).sum().item()
        w, a = math.exp(log_w), adv[i].item()
        pg = max(-w * a, -min(max(w, 0.8), 1.28) * a)
        if a < 0:
            pg = min(pg, -3.0 * a)
        total += (pg + 0.1 * w * log_w) / 3
    assert seq.item() == pytest.approx(total, rel=1e-12)
    # one token per sequence: both levels agree
    one = torch.ones(3, 1, dtype=F64)
    tok = rpg_loss(lp[:, :1], old[:, :1], adv, one, kind="ufkl", level="token")
    assert rpg_loss(lp[:, :1], old[:, :1], adv, one, kind="ufkl", level="sequence").item() == pytest.approx(tok.item())


def test_rpg_bad_input_is_named():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown kind 'kl'"):
        rpg_loss(lp, lp, torch.zeros(2), torch.ones(2, 3), kind="kl")
    with pytest.raises(ValueError, match="unknown estimator"):
        rpg_loss(lp, lp, torch.zeros(2), torch.ones(2, 3), estimator="ppo")
    with pytest.raises(ValueError, match="advantages must have shape"):
        rpg_loss(lp, lp, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="old_logps has shape"):
        rpg_loss(lp, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="clip_c"):
        rpg_loss(lp, lp, torch.zeros(2), torch.ones(2, 3), clip_c=1.0)


# --------------------------------------------------------------------------------------------------
# DRPO
# --------------------------------------------------------------------------------------------------

DRPO_S = torch.tensor([-0.30, -0.45, -0.60, -0.20, -0.5, -0.7, -0.4, -0.9], dtype=F64)
DRPO_R = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0])
DRPO_LEN = torch.tensor([1000, 3000, 2000, 4000, 100, 200, 300, 400])
DRPO_GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_drpo_matches_spec_vector():
    weights = drpo_positive_weights(DRPO_LEN[:4], DRPO_R[:4] == 1, lam=0.1, max_length=8192)
    torch.testing.assert_close(weights, torch.tensor([0.919931, 0.080069, 0, 0], dtype=F64), atol=1e-6, rtol=0)
    value, grad = _grad(lambda s: drpo_loss(s, DRPO_R, DRPO_LEN, DRPO_GROUPS, max_length=8192), DRPO_S)
    assert value == pytest.approx(-0.042995, abs=1e-6)
    expected = torch.tensor([-0.459965, -0.040035, 0.245001, 0.254999, 0, 0, 0, 0], dtype=F64)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)
    # group 1's negatives term τ·log-mean-exp(s/τ) = −0.398005: with one positive, loss = −(s_pos − that term)
    one_positive = drpo_loss(DRPO_S[[0, 2, 3]], torch.tensor([1, 0, 0]), torch.ones(3), torch.zeros(3), max_length=1)
    # (the spec prints −0.398005; the exact value is −0.3980001, which its loss value −0.042995 agrees with)
    assert DRPO_S[0].item() + one_positive.item() == pytest.approx(-0.398005, abs=1e-5)


def test_drpo_kl_penalty_matches_spec_vector():
    kl = torch.tensor(3e-4, dtype=F64)
    base = drpo_loss(DRPO_S, DRPO_R, DRPO_LEN, DRPO_GROUPS, max_length=8192)
    with_kl, grad = _grad(lambda k: drpo_loss(DRPO_S, DRPO_R, DRPO_LEN, DRPO_GROUPS, max_length=8192, kl=k), kl)
    assert with_kl - base.item() == pytest.approx(6e-5, rel=1e-9)
    assert grad.item() == pytest.approx(0.2, rel=1e-12)  # the detached coefficient β(KL − δ)
    small = torch.tensor(1e-4, dtype=F64)
    value, grad = _grad(lambda k: drpo_loss(DRPO_S, DRPO_R, DRPO_LEN, DRPO_GROUPS, max_length=8192, kl=k), small)
    assert value == pytest.approx(base.item()) and grad.item() == 0.0


def _ref_drpo(scores, rewards, lengths, groups, tau, lam, max_length):
    """(value, gradient) from the spec's formula: w̃ on positives, softmax(s/τ) on negatives, divided by #groups."""
    ids = sorted(set(groups))
    value, grad = 0.0, [0.0] * len(scores)
    for g in ids:
        members = [i for i, x in enumerate(groups) if x == g]
        pos = [i for i in members if rewards[i] == 1]
        neg = [i for i in members if rewards[i] == 0]
        if not pos or not neg:
            continue
        w = [math.exp((1 - lengths[i] / max_length) / lam) for i in pos]
        w = [x / sum(w) for x in w]
        e = [math.exp(scores[j] / tau) for j in neg]
        j_q = sum(wi * scores[i] for wi, i in zip(w, pos)) - tau * math.log(sum(e) / len(neg))
        value -= j_q / len(ids)
        for wi, i in zip(w, pos):
            grad[i] = -wi / len(ids)
        for ej, j in zip(e, neg):
            grad[j] = ej / sum(e) / len(ids)
    return value, grad


def test_drpo_matches_reference_on_random_groups():
    rng = random.Random(0)
    n_groups, size = 5, 6
    groups = [g for g in range(n_groups) for _ in range(size)]
    rewards = [float(rng.random() < 0.5) for _ in groups]
    rewards[:size] = [1.0] * size  # an all-correct group: contributes 0, still counts
    lengths = [rng.randint(5, 500) for _ in groups]
    scores = torch.tensor([-rng.random() for _ in groups], dtype=F64)
    value, grad = _grad(lambda s: drpo_loss(s, torch.tensor(rewards), torch.tensor(lengths), torch.tensor(groups),
                                            tau=2.0, lam=0.3, max_length=512), scores)
    ref_value, ref_grad = _ref_drpo(scores.tolist(), rewards, lengths, groups, 2.0, 0.3, 512)
    assert value == pytest.approx(ref_value, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=F64), rtol=1e-10, atol=1e-14)


def test_drpo_infinite_lambda_is_disco_uniform_weights():
    weights = drpo_positive_weights(torch.tensor([10, 500, 40]), torch.tensor([True, True, False]), lam=math.inf,
                                    max_length=512)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5, 0.0], dtype=F64))


def test_drpo_rewards_must_be_binary():
    with pytest.raises(ValueError, match=r"binary rewards.*reward_threshold"):
        drpo_loss(DRPO_S, DRPO_R * 0.5, DRPO_LEN, DRPO_GROUPS, max_length=8192)
    with pytest.raises(ValueError, match="NaN"):
        binary_rewards(torch.tensor([1.0, float("nan")]))
    graded = torch.tensor([0.9, 0.7, 0.1, 0.0, 0, 0, 0, 0])
    thresholded = drpo_loss(DRPO_S, graded, DRPO_LEN, DRPO_GROUPS, max_length=8192, reward_threshold=0.5)
    assert thresholded.item() == pytest.approx(drpo_loss(DRPO_S, DRPO_R, DRPO_LEN, DRPO_GROUPS, max_length=8192).item())
