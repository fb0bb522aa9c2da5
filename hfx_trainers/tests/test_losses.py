"""The pure self-play losses (hfx_trainers.losses): the spec's test vectors, an independent float64 re-derivation of
every formula on random inputs (forward and gradient), the TRL-equivalent special cases, and input errors.

Expected constants come from specs/trainers.md (§2.6, §3.6, §4.6, §5.6) or are worked out by hand in the test. The
reference implementations below are written from the spec's formulas (§2.1, §3.1, §4.1, §5.1) element by element
with Python floats, together with their hand-derived gradients; they share no code with hfx_trainers.losses.
"""

from __future__ import annotations

import doctest
import math
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from hfx_trainers import losses
from hfx_trainers.losses import (
    RSPO_REGULARIZER_KINDS,
    implicit_reward,
    inpo_loss,
    resolve_rspo_regularizer,
    rspo_loss,
    rspo_regularizer,
    spin_loss,
    sppo_loss,
)

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def leaves(**named: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh float64 leaves that require grad, by name."""
    return {name: value.detach().clone().requires_grad_() for name, value in named.items()}


def floats(x: dict[str, torch.Tensor], *names: str) -> list[list[float]]:
    return [x[name].tolist() for name in names]


def close(actual, expected, *, rel: float = 1e-9, abs_: float = 1e-6) -> None:
    """Element-wise closeness of a tensor (or number) to a list of expected numbers."""
    actual = torch.as_tensor(actual, dtype=F64).flatten().tolist()
    expected = [expected] if isinstance(expected, int | float) else list(expected)
    assert len(actual) == len(expected), (actual, expected)
    for a, e in zip(actual, expected):
        assert a == pytest.approx(e, rel=rel, abs=abs_), (actual, expected)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --------------------------------------------------------------------------------------------------
# Spec inputs
# --------------------------------------------------------------------------------------------------

# §2.6 (SPIN)
SPIN_POLICY_REAL, SPIN_POLICY_GENERATED = [-10.0, -12.0], [-11.0, -9.0]
SPIN_OPPONENT_REAL, SPIN_OPPONENT_GENERATED = [-10.5, -12.5], [-10.0, -9.5]

# §3.6 (SPPO), reused by §4.6 (RSPO) and §5.6 (INPO)
POLICY_W, POLICY_L = [-20.0, -35.0], [-30.0, -28.0]
OPPONENT_W, OPPONENT_L = [-21.0, -36.5], [-29.0, -27.0]
P_WIN, P_LOSE, P_PAIR = [0.62, 0.70], [0.38, 0.45], [0.73, 0.80]
# §4.6 / §5.6
REF_W, REF_L = [-21.5, -34.0], [-29.0, -30.0]


# --------------------------------------------------------------------------------------------------
# Spec test vectors
# --------------------------------------------------------------------------------------------------


def spin_spec_inputs():
    return t(SPIN_POLICY_REAL), t(SPIN_POLICY_GENERATED), t(SPIN_OPPONENT_REAL), t(SPIN_OPPONENT_GENERATED)


def test_spin_spec_vector_sigmoid():
    # spec §2.6: β = 0.1, logits [1.5, 0.0]
    loss = spin_loss(*spin_spec_inputs(), beta=0.1, loss_type="sigmoid")
    close(loss, [0.620957, 0.693147])
    close(loss.mean(), 0.657052)


def test_spin_spec_vector_hinge():
    # spec §2.6
    loss = spin_loss(*spin_spec_inputs(), beta=0.1, loss_type="hinge")
    close(loss, [0.85, 1.0])
    close(loss.mean(), 0.925)


def test_spin_spec_vector_rewards():
    # spec §2.6: rewards/real = β(π − π_t) = [0.05, 0.05]; rewards/generated = [−0.10, 0.05]
    real, generated, opponent_real, opponent_generated = spin_spec_inputs()
    close(implicit_reward(real, opponent_real, beta=0.1), [0.05, 0.05])
    close(implicit_reward(generated, opponent_generated, beta=0.1), [-0.10, 0.05])


def sppo_spec_inputs():
    return t(POLICY_W), t(POLICY_L), t(OPPONENT_W), t(OPPONENT_L)


@pytest.mark.parametrize(
    ("beta", "loss_type", "probabilities", "expected", "expected_mean"),
    [
        # spec §3.6, β = 0.01 (η = 100)
        (0.01, "sppo", (P_WIN, P_LOSE), [121.0, 179.125], 150.0625),
        (0.01, "sppo_single", (P_PAIR, None), [484.0, 826.625], 655.3125),
        (0.01, "sppo_hard", (None, None), [4802.0, 4753.25], None),
        # spec §3.6, β = 0.001 (η = 1000, official)
        (0.001, "sppo", (P_WIN, P_LOSE), [14161.0, 20901.625], 17531.3125),
    ],
)
def test_sppo_spec_vectors(beta, loss_type, probabilities, expected, expected_mean):
    chosen_prob, rejected_prob = (None if p is None else t(p) for p in probabilities)
    loss = sppo_loss(*sppo_spec_inputs(), chosen_prob, rejected_prob, beta=beta, loss_type=loss_type)
    close(loss, expected)
    if expected_mean is not None:
        close(loss.mean(), expected_mean)


def test_sppo_official_beta_is_the_default():
    # spec §3.3: β = 0.001 (η = 1000) in the official scripts; the §3.6 vector for it
    close(sppo_loss(*sppo_spec_inputs(), t(P_WIN), t(P_LOSE)), [14161.0, 20901.625])


# spec §4.6: β = 0.01, λ = 0.5; SPPO part mean = 150.0625
RSPO_SPEC_TABLE = [
    ("sppo", 0.0, 150.0625),
    ("sppo_reversekl", 4.125, 152.125),
    ("sppo_reverseklnoent", -1665.0, -682.4375),
    ("sppo_forwardimportance10", 2.897515, 151.511257),
    ("sppo_forward1reverse5", 23.522515, 161.823757),
    ("sppo_chisq10", 6.303252, 153.214126),
    ("sppo_entropy", 1654.5, 977.3125),
]
# The same rows with the canonical kinds (a mapping for the combination)
CANONICAL_OF_ALIAS = {
    "sppo": "none",
    "sppo_reversekl": "reverse_kl",
    "sppo_reverseklnoent": "reverse_kl_no_entropy",
    "sppo_forwardimportance10": "forward_kl_importance",
    "sppo_forward1reverse5": {"forward_kl_importance": 1.0, "reverse_kl": 5.0},
    "sppo_chisq10": "chi_squared",
    "sppo_entropy": "entropy",
}


def rspo_spec_regularizer_inputs():
    return t(POLICY_W), t(POLICY_L), t(REF_W), t(REF_L)


@pytest.mark.parametrize(("alias", "expected_g", "expected_total"), RSPO_SPEC_TABLE)
@pytest.mark.parametrize("spelling", ["official", "canonical"])
def test_rspo_spec_vector(alias, expected_g, expected_total, spelling):
    kind = alias if spelling == "official" else CANONICAL_OF_ALIAS[alias]
    g = rspo_regularizer(*rspo_spec_regularizer_inputs(), kind=kind)
    assert g.shape == ()
    close(g, expected_g)
    total = rspo_loss(
        t(POLICY_W),
        t(POLICY_L),
        t(OPPONENT_W),
        t(OPPONENT_L),
        t(REF_W),
        t(REF_L),
        t(P_WIN),
        t(P_LOSE),
        beta=0.01,
        reg_coef=0.5,
        kind=kind,
    )
    assert total.shape == ()
    close(total, expected_total)


@pytest.mark.parametrize(
    ("eta", "tau", "expected", "expected_mean"),
    [
        # spec §5.6 (ratio = τ/η)
        (0.005, 0.005 / 3, [9571.361111, 9867.111111], 9719.236111),
        (0.0075, 0.0075 / 3, [4160.25, 4356.0], 4258.125),
        (0.1, 0.05, [7.5625, 27.5625], 17.5625),
    ],
)
def test_inpo_spec_vectors(eta, tau, expected, expected_mean):
    loss = inpo_loss(t(POLICY_W), t(POLICY_L), t(REF_W), t(REF_L), t(OPPONENT_W), t(OPPONENT_L), eta=eta, tau=tau)
    close(loss, expected)
    close(loss.mean(), expected_mean)


def test_inpo_defaults_are_the_run_scripts():
    # spec §5.3: eta = 0.005 and ratio = 1/3 in the run scripts → the first §5.6 vector with no arguments
    loss = inpo_loss(t(POLICY_W), t(POLICY_L), t(REF_W), t(REF_L), t(OPPONENT_W), t(OPPONENT_L))
    close(loss, [9571.361111, 9867.111111])


# --------------------------------------------------------------------------------------------------
# Independent re-derivation (spec §2.1, §3.1, §4.1, §5.1): Python floats, hand-derived gradients
# --------------------------------------------------------------------------------------------------


def reference_spin(real, generated, opp_real, opp_generated, beta, loss_type, reference_free=False):
    """Per-element SPIN loss and d loss / d(each input)."""
    out = []
    for pr, pg, orr, og in zip(real, generated, opp_real, opp_generated):
        z = beta * ((pr - pg) if reference_free else ((pr - orr) - (pg - og)))
        if loss_type == "sigmoid":
            value, dz = math.log1p(math.exp(-z)), -sigmoid(-z)
        else:
            value, dz = max(0.0, 1.0 - z), (-1.0 if z < 1.0 else 0.0)
        anchor = 0.0 if reference_free else 1.0
        grads = {"real": beta * dz, "generated": -beta * dz}
        grads |= {"opp_real": -anchor * beta * dz, "opp_generated": anchor * beta * dz}
        out.append((value, grads))
    return out


def reference_sppo(pw, pl, ow, ol, prob_w, prob_l, beta, loss_type):
    """Per-element SPPO loss and its gradient."""
    eta = 1.0 / beta
    out = []
    for i in range(len(pw)):
        a, b = pw[i] - ow[i], pl[i] - ol[i]
        if loss_type == "sppo":
            tw, tl, scale = eta * (prob_w[i] - 0.5), eta * (prob_l[i] - 0.5), 0.5
        elif loss_type == "sppo_single":
            tw, tl, scale = eta * (prob_w[i] - 0.5), -eta * (prob_w[i] - 0.5), 0.5
        else:
            tw, tl, scale = eta / 2, -eta / 2, 1.0
        value = scale * ((a - tw) ** 2 + (b - tl) ** 2)
        da, db = 2 * scale * (a - tw), 2 * scale * (b - tl)
        grads = {"pw": da, "pl": db, "ow": -da, "ol": -db}
        if loss_type == "sppo":
            grads |= {"prob_w": -eta * da, "prob_l": -eta * db}
        elif loss_type == "sppo_single":
            grads |= {"prob_w": -eta * da + eta * db}
        out.append((value, grads))
    return out


def reference_regularizer(pw, pl, rw, rl, kind, clip, reference_response=None):
    """RSPO's G and dG/d(policy chosen, policy rejected, ref chosen, ref rejected, reference responses)."""
    n = len(pw)
    grads = {key: [0.0] * n for key in ("pw", "pl", "rw", "rl", "resp")}
    value = 0.0
    for side_p, side_r, kp, kr in ((pw, rw, "pw", "rw"), (pl, rl, "pl", "rl")):
        for i in range(n):
            p, r = side_p[i], side_r[i]
            d = p - r
            if kind == "reverse_kl":
                value += d * d / n
                grads[kp][i] += 2 * d / n
                grads[kr][i] -= 2 * d / n
            elif kind == "reverse_kl_no_entropy":
                value -= p * r / n
                grads[kp][i] -= r / n
                grads[kr][i] -= p / n
            elif kind == "forward_kl_importance":
                clipped = -d >= clip
                w = math.exp(clip if clipped else -d)
                value += w / n
                if not clipped:
                    grads[kp][i] -= w / n
                    grads[kr][i] += w / n
            elif kind == "chi_squared":
                clipped = d >= clip
                u = math.exp(clip if clipped else d)
                value += u / n
                if not clipped:
                    grads[kp][i] += u / n
                    grads[kr][i] -= u / n
            elif kind == "smoothed_chi_squared":
                clipped = d >= clip
                u = math.exp(clip if clipped else d)
                value += u / (1 + u) / n
                if not clipped:
                    slope = u / (1 + u) ** 2  # d/dd of u/(1+u) with u = e^d
                    grads[kp][i] += slope / n
                    grads[kr][i] -= slope / n
            elif kind == "entropy":
                value += p * p / n
                grads[kp][i] += 2 * p / n
    if kind == "forward_kl_reference":
        value = -sum(reference_response) / n
        grads["resp"] = [-1.0 / n] * n
    return value, grads


def reference_inpo(pw, pl, rw, rl, ow, ol, eta, tau):
    k = tau / eta
    out = []
    for i in range(len(pw)):
        h = (pw[i] - pl[i]) - k * (rw[i] - rl[i]) - (1 - k) * (ow[i] - ol[i])
        e = h - 1 / (2 * eta)
        grads = {"pw": 2 * e, "pl": -2 * e, "rw": -2 * k * e, "rl": 2 * k * e}
        grads |= {"ow": -2 * (1 - k) * e, "ol": 2 * (1 - k) * e}
        out.append((e * e, grads))
    return out


def random_logps(generator, n=16):
    return -(1 + 39 * torch.rand(n, generator=generator, dtype=F64))


def near(base, generator, scale):
    """Anchor log-probs at a random distance from ``base`` (log-ratios of order ``scale``)."""
    return base + scale * torch.randn(base.shape, generator=generator, dtype=F64)


def assert_gradients(output, inputs: dict, expected: dict):
    """torch.autograd.grad of ``output`` (summed) w.r.t. the named leaves equals the hand-derived gradients."""
    names = list(expected)
    grads = torch.autograd.grad(output.sum(), [inputs[name] for name in names], allow_unused=True)
    for name, grad in zip(names, grads):
        close(torch.zeros_like(inputs[name]) if grad is None else grad, expected[name], rel=1e-9, abs_=1e-9)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("reference_free", [False, True])
@pytest.mark.parametrize("beta", [0.1, 5.0])
def test_spin_matches_reference(loss_type, reference_free, beta):
    g = torch.Generator().manual_seed(0)
    real, generated = random_logps(g), random_logps(g)
    x = {"real": real, "generated": generated, "opp_real": near(real, g, 3.0), "opp_generated": near(generated, g, 3.0)}
    x = leaves(**x)
    ref = reference_spin(*floats(x, "real", "generated", "opp_real", "opp_generated"), beta, loss_type, reference_free)
    loss = spin_loss(
        x["real"],
        x["generated"],
        x["opp_real"],
        x["opp_generated"],
        beta=beta,
        loss_type=loss_type,
        reference_free=reference_free,
    )
    assert loss.shape == (16,) and loss.dtype == F64
    close(loss, [v for v, _ in ref], abs_=1e-12)
    assert_gradients(loss, x, {k: [gr[k] for _, gr in ref] for k in x})


@pytest.mark.parametrize("loss_type", ["sppo", "sppo_single", "sppo_hard"])
@pytest.mark.parametrize("beta", [0.001, 0.01, 0.5])
def test_sppo_matches_reference(loss_type, beta):
    g = torch.Generator().manual_seed(1)
    pw, pl = random_logps(g), random_logps(g)
    x = {
        "pw": pw,
        "pl": pl,
        "ow": near(pw, g, 2.0),
        "ol": near(pl, g, 2.0),
        "prob_w": torch.rand(16, generator=g, dtype=F64),
        "prob_l": torch.rand(16, generator=g, dtype=F64),
    }
    x = leaves(**x)
    ref = reference_sppo(*floats(x, "pw", "pl", "ow", "ol", "prob_w", "prob_l"), beta, loss_type)
    loss = sppo_loss(x["pw"], x["pl"], x["ow"], x["ol"], x["prob_w"], x["prob_l"], beta=beta, loss_type=loss_type)
    assert loss.shape == (16,)
    close(loss, [v for v, _ in ref], rel=1e-12)
    names = [k for k in x if k in ref[0][1]]
    assert_gradients(loss, x, {k: [gr[k] for _, gr in ref] for k in names})


RANDOM_KINDS = [k for k in RSPO_REGULARIZER_KINDS if k != "none"]


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_rspo_regularizer_matches_reference(kind):
    g = torch.Generator().manual_seed(2)
    pw, pl = random_logps(g), random_logps(g)
    # log-ratios of order 1.5 against a clip of 1: both sides of the clip appear in the batch
    x = {"pw": pw, "pl": pl, "rw": near(pw, g, 1.5), "rl": near(pl, g, 1.5), "resp": random_logps(g)}
    x = leaves(**x)
    d = torch.cat([x["pw"] - x["rw"], x["pl"] - x["rl"]])
    assert (d > 1.0).any() and (d < -1.0).any() and (d.abs() < 1.0).any()
    clip = 1.0
    value, grads = reference_regularizer(*floats(x, "pw", "pl", "rw", "rl"), kind, clip, x["resp"].tolist())
    g_value = rspo_regularizer(
        x["pw"], x["pl"], x["rw"], x["rl"], kind=kind, clip=clip, reference_response_logps=x["resp"]
    )
    assert g_value.shape == ()
    close(g_value, value, rel=1e-12)
    assert_gradients(g_value, x, grads)


def test_rspo_weighted_combination_matches_reference():
    g = torch.Generator().manual_seed(3)
    pw, pl = random_logps(g), random_logps(g)
    x = {"pw": pw, "pl": pl, "rw": near(pw, g, 1.5), "rl": near(pl, g, 1.5), "resp": random_logps(g)}
    x = leaves(**x)
    weights = {"forward_kl_importance": 1.0, "reverse_kl": 0.3, "chi_squared": -0.2, "forward_kl_reference": 0.05}
    value, grads = 0.0, {k: [0.0] * 16 for k in x}
    for kind, w in weights.items():
        v, gr = reference_regularizer(*floats(x, "pw", "pl", "rw", "rl"), kind, 2.0, x["resp"].tolist())
        value += w * v
        grads = {k: [a + w * b for a, b in zip(grads[k], gr[k])] for k in grads}
    out = rspo_regularizer(
        x["pw"], x["pl"], x["rw"], x["rl"], kind=weights, clip=2.0, reference_response_logps=x["resp"]
    )
    close(out, value, rel=1e-12)
    assert_gradients(out, x, grads)


@pytest.mark.parametrize(
    ("kind", "loss_type"), [("reverse_kl", "sppo"), ("forward_kl_importance", "sppo_hard"), ("entropy", "sppo_single")]
)
def test_rspo_loss_matches_reference(kind, loss_type):
    g = torch.Generator().manual_seed(4)
    pw, pl = random_logps(g), random_logps(g)
    x = {
        "pw": pw,
        "pl": pl,
        "ow": near(pw, g, 1.0),
        "ol": near(pl, g, 1.0),
        "rw": near(pw, g, 1.0),
        "rl": near(pl, g, 1.0),
        "prob_w": torch.rand(16, generator=g, dtype=F64),
        "prob_l": torch.rand(16, generator=g, dtype=F64),
    }
    x = leaves(**x)
    beta, lam, n = 0.02, 0.7, 16
    sppo_ref = reference_sppo(*floats(x, "pw", "pl", "ow", "ol", "prob_w", "prob_l"), beta, loss_type)
    g_value, g_grads = reference_regularizer(*floats(x, "pw", "pl", "rw", "rl"), kind, 10.0)
    expected = sum(v for v, _ in sppo_ref) / n + lam * g_value
    grads = {k: [lam * gv for gv in g_grads[k]] for k in ("pw", "pl", "rw", "rl")}
    grads |= {"ow": [0.0] * n, "ol": [0.0] * n, "prob_w": [0.0] * n, "prob_l": [0.0] * n}
    for i, (_, gr) in enumerate(sppo_ref):
        for k, v in gr.items():
            grads[k][i] += v / n
    total = rspo_loss(
        x["pw"],
        x["pl"],
        x["ow"],
        x["ol"],
        x["rw"],
        x["rl"],
        x["prob_w"],
        x["prob_l"],
        beta=beta,
        reg_coef=lam,
        kind=kind,
        loss_type=loss_type,
    )
    close(total, expected, rel=1e-12)
    assert_gradients(total, x, grads)


@pytest.mark.parametrize(("eta", "tau"), [(0.005, None), (0.0075, 0.0), (0.1, 0.1), (0.3, 0.07)])
def test_inpo_matches_reference(eta, tau):
    g = torch.Generator().manual_seed(5)
    pw, pl = random_logps(g), random_logps(g)
    x = {
        "pw": pw,
        "pl": pl,
        "rw": near(pw, g, 2.0),
        "rl": near(pl, g, 2.0),
        "ow": near(pw, g, 2.0),
        "ol": near(pl, g, 2.0),
    }
    x = leaves(**x)
    ref = reference_inpo(*floats(x, "pw", "pl", "rw", "rl", "ow", "ol"), eta, eta / 3 if tau is None else tau)
    loss = inpo_loss(x["pw"], x["pl"], x["rw"], x["rl"], x["ow"], x["ol"], eta=eta, tau=tau)
    assert loss.shape == (16,)
    close(loss, [v for v, _ in ref], rel=1e-12)
    assert_gradients(loss, x, {k: [gr[k] for _, gr in ref] for k in x})


def _gradcheck_inputs(n_logps, n_probs=0, seed=6):
    g = torch.Generator().manual_seed(seed)
    logps = [(-(1 + 4 * torch.rand(5, generator=g, dtype=F64))).requires_grad_() for _ in range(n_logps)]
    probs = [torch.rand(5, generator=g, dtype=F64).requires_grad_() for _ in range(n_probs)]
    return logps + probs


@pytest.mark.parametrize(
    ("name", "fn", "n_logps", "n_probs"),
    [
        ("spin sigmoid", lambda *a: spin_loss(*a, beta=0.7), 4, 0),
        ("sppo", lambda *a: sppo_loss(*a, beta=0.3), 4, 2),
        ("sppo_single", lambda a, b, c, d, p: sppo_loss(a, b, c, d, p, beta=0.3, loss_type="sppo_single"), 4, 1),
        ("sppo_hard", lambda *a: sppo_loss(*a, beta=0.3, loss_type="sppo_hard"), 4, 0),
        ("inpo", lambda *a: inpo_loss(*a, eta=0.2, tau=0.05), 6, 0),
        (
            "rspo_loss",
            lambda *a: rspo_loss(
                *a[:6], a[6], a[7], beta=0.3, reg_coef=0.4, kind={"reverse_kl": 1.0, "smoothed_chi_squared": 2.0}
            ),
            6,
            2,
        ),
        *[
            (
                kind,
                lambda *a, kind=kind: rspo_regularizer(*a[:4], kind=kind, clip=1.5, reference_response_logps=a[4]),
                5,
                0,
            )
            for kind in RSPO_REGULARIZER_KINDS
            if kind != "none"
        ],
    ],
)
def test_gradcheck(name, fn, n_logps, n_probs):
    assert torch.autograd.gradcheck(fn, tuple(_gradcheck_inputs(n_logps, n_probs)))


# --------------------------------------------------------------------------------------------------
# Special cases
# --------------------------------------------------------------------------------------------------


def dpo_sigmoid_reference(chosen, rejected, ref_chosen, ref_rejected, beta):
    """DPO (Rafailov et al.): −log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])."""
    return [
        -math.log(sigmoid(beta * ((c - rc) - (r - rr))))
        for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)
    ]


def test_spin_sigmoid_is_dpo_sigmoid_with_real_as_chosen():
    # spec §2.1: DPO with chosen = real, rejected = generated, ref = π_t
    g = torch.Generator().manual_seed(7)
    real, generated = random_logps(g), random_logps(g)
    opp_real, opp_generated = near(real, g, 5.0), near(generated, g, 5.0)
    loss = spin_loss(real, generated, opp_real, opp_generated, beta=0.25)
    close(
        loss,
        dpo_sigmoid_reference(real.tolist(), generated.tolist(), opp_real.tolist(), opp_generated.tolist(), 0.25),
        rel=1e-12,
    )


def trl_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type):
    """TRL 1.16's own DPO loss: ``DPOTrainer._compute_loss`` run on a stub trainer whose stub model returns one
    completion token per sequence, whose log-prob is the sequence's summed log-prob (reference log-probs given as
    precomputed columns). Returns TRL's batch-mean loss; skips if TRL's private internals have changed shape."""
    trl = pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    n = chosen.shape[0]
    per_token_logps = torch.cat([chosen, rejected]).unsqueeze(1)  # rows laid out [all chosen..., all rejected...]
    zeros = torch.zeros(2 * n, 1, dtype=F64)

    class StubModel:
        training = True

        def __call__(self, **kwargs):
            return SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model = StubModel()
    stub_trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        label_smoothing=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * n, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * (2 * n)),  # one completion token per sequence
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    try:
        return DPOTrainer._compute_loss(stub_trainer, model, inputs, return_outputs=False)
    except (AttributeError, KeyError, TypeError) as error:
        pytest.skip(f"trl {trl.__version__}: DPOTrainer._compute_loss no longer runs on this stub ({error!r})")


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_spin_equals_trl_dpo(loss_type):
    # spec §2.5: SPIN = TRL DPOTrainer loss_type sigmoid/hinge with chosen = real, rejected = generated, ref = π_t
    g = torch.Generator().manual_seed(8)
    real, generated = random_logps(g, 8).requires_grad_(), random_logps(g, 8).requires_grad_()
    opp_real, opp_generated = near(real.detach(), g, 5.0), near(generated.detach(), g, 5.0)
    ours = spin_loss(real, generated, opp_real, opp_generated, beta=0.3, loss_type=loss_type).mean()
    theirs = trl_dpo_loss(real, generated, opp_real, opp_generated, beta=0.3, loss_type=loss_type)
    close(ours, theirs.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [real, generated]), torch.autograd.grad(theirs, [real, generated])):
        torch.testing.assert_close(a, b)


def test_sppo_hard_equals_trl_sppo_hard():
    # spec §1.1 / §3.1: TRL's sppo_hard = (a − 0.5/β)² + (b + 0.5/β)², which our "sppo_hard" follows
    g = torch.Generator().manual_seed(9)
    pw, pl = random_logps(g, 8).requires_grad_(), random_logps(g, 8).requires_grad_()
    ow, ol = near(pw.detach(), g, 3.0), near(pl.detach(), g, 3.0)
    ours = sppo_loss(pw, pl, ow, ol, beta=0.05, loss_type="sppo_hard").mean()
    theirs = trl_dpo_loss(pw, pl, ow, ol, beta=0.05, loss_type="sppo_hard")
    close(ours, theirs.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [pw, pl]), torch.autograd.grad(theirs, [pw, pl])):
        torch.testing.assert_close(a, b)


def test_sppo_hard_is_twice_official_sppo_with_hard_labels():
    # spec §3.1: sppo_hard = 2 × official sppo with p_w = 1, p_l = 0
    pw, pl, ow, ol = sppo_spec_inputs()
    hard = sppo_loss(pw, pl, ow, ol, beta=0.01, loss_type="sppo_hard")
    official = sppo_loss(pw, pl, ow, ol, t([1.0, 1.0]), t([0.0, 0.0]), beta=0.01, loss_type="sppo")
    close(hard, (2 * official).tolist(), rel=1e-12)


def ipo_reference(chosen, rejected, ref_chosen, ref_rejected, beta):
    """IPO (Azar et al.): ((log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)) − 1/(2β))²."""
    return [
        ((c - rc) - (r - rr) - 1 / (2 * beta)) ** 2 for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)
    ]


def test_inpo_tau_equal_eta_is_ipo_against_reference():
    # spec §5.1: τ = η (ratio 1) → online IPO against π_ref; π_t drops out of value and gradient
    g = torch.Generator().manual_seed(10)
    pw, pl = random_logps(g), random_logps(g)
    rw, rl = near(pw, g, 2.0), near(pl, g, 2.0)
    ow, ol = near(pw, g, 2.0).requires_grad_(), near(pl, g, 2.0).requires_grad_()
    eta = 0.05
    loss = inpo_loss(pw, pl, rw, rl, ow, ol, eta=eta, tau=eta)
    close(loss, ipo_reference(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), eta), rel=1e-12)
    other = inpo_loss(pw, pl, rw, rl, ow + 3.0 * torch.randn(16, generator=g, dtype=F64), ol, eta=eta, tau=eta)
    torch.testing.assert_close(loss, other, rtol=1e-12, atol=0)
    for grad in torch.autograd.grad(loss.sum(), [ow, ol]):
        assert torch.count_nonzero(grad) == 0


def test_inpo_tau_equal_eta_equals_trl_ipo():
    # TRL's ipo divides each log-ratio by the completion length; with one-token completions it is plain IPO
    g = torch.Generator().manual_seed(11)
    pw, pl = random_logps(g, 8).requires_grad_(), random_logps(g, 8).requires_grad_()
    rw, rl = near(pw.detach(), g, 2.0), near(pl.detach(), g, 2.0)
    eta = 0.2
    ours = inpo_loss(pw, pl, rw, rl, rw, rl, eta=eta, tau=eta).mean()
    theirs = trl_dpo_loss(pw, pl, rw, rl, beta=eta, loss_type="ipo")
    close(ours, theirs.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [pw, pl]), torch.autograd.grad(theirs, [pw, pl])):
        torch.testing.assert_close(a, b)


def test_inpo_tau_zero_drops_the_reference():
    # spec §5.1: τ = 0 → pure no-regret against π_t (IPO-style target against the opponent)
    g = torch.Generator().manual_seed(12)
    pw, pl = random_logps(g), random_logps(g)
    rw, rl, ow, ol = (near(x, g, 2.0) for x in (pw, pl, pw, pl))
    loss = inpo_loss(pw, pl, rw, rl, ow, ol, eta=0.05, tau=0.0)
    close(loss, ipo_reference(pw.tolist(), pl.tolist(), ow.tolist(), ol.tolist(), 0.05), rel=1e-12)


# A hand-checkable case: d_w = [0, 1], d_l = [−1, 0]
HAND_POLICY_W, HAND_POLICY_L = [-1.0, -2.0], [-2.0, -4.0]
HAND_REF_W, HAND_REF_L = [-1.0, -3.0], [-1.0, -4.0]
HAND_REFERENCE_RESPONSES = [-3.0, -5.0]
E = math.e


@pytest.mark.parametrize(
    ("kind", "clip", "expected"),
    [
        ("none", 10.0, 0.0),
        ("reverse_kl", 10.0, (0 + 1) / 2 + (1 + 0) / 2),  # mean(d_w²) + mean(d_l²)
        ("reverse_kl_no_entropy", 10.0, -(1 * 1 + 2 * 3) / 2 - (2 * 1 + 4 * 4) / 2),  # −mean(p·r) per side
        ("forward_kl_importance", 10.0, (1 + 1 / E) / 2 + (E + 1) / 2),  # mean(e^{−d}) per side
        ("forward_kl_importance", 0.5, (1 + 1 / E) / 2 + (math.sqrt(E) + 1) / 2),  # e^{1} clipped to e^{0.5}
        ("chi_squared", 10.0, (1 + E) / 2 + (1 / E + 1) / 2),  # mean(e^{d}) per side
        ("chi_squared", 0.5, (1 + math.sqrt(E)) / 2 + (1 / E + 1) / 2),
        ("smoothed_chi_squared", 10.0, (0.5 + E / (1 + E)) / 2 + (1 / (1 + E) + 0.5) / 2),  # = 1
        ("smoothed_chi_squared", 0.5, (0.5 + math.sqrt(E) / (1 + math.sqrt(E))) / 2 + (1 / (1 + E) + 0.5) / 2),
        ("entropy", 10.0, (1 + 4) / 2 + (4 + 16) / 2),  # mean(p²) per side
        ("forward_kl_reference", 10.0, 4.0),  # −mean([−3, −5])
        ({"forward_kl_importance": 1.0, "reverse_kl": 5.0}, 10.0, (1 + 1 / E) / 2 + (E + 1) / 2 + 5.0),
        ({"entropy": 0.5, "forward_kl_reference": 2.0}, 10.0, 0.5 * 12.5 + 2.0 * 4.0),
        ("sppo_forward1R0.5reverse2", 10.0, (1 + 1 / E) / 2 + (math.sqrt(E) + 1) / 2 + 2.0),
        ("sppo_forwardimportance0.5", 10.0, (1 + 1 / E) / 2 + (math.sqrt(E) + 1) / 2),
        ("sppo_forwardreverse", 10.0, (1 + 1 / E) / 2 + (E + 1) / 2 + 1.0),
        ("sppo_chisqsm1", 10.0, 1.0),
        ("sppo_forward", 10.0, 4.0),
    ],
)
def test_rspo_regularizer_hand_checked(kind, clip, expected):
    g = rspo_regularizer(
        t(HAND_POLICY_W),
        t(HAND_POLICY_L),
        t(HAND_REF_W),
        t(HAND_REF_L),
        kind=kind,
        clip=clip,
        reference_response_logps=t(HAND_REFERENCE_RESPONSES),
    )
    close(g, expected, rel=1e-12, abs_=1e-12)


@pytest.mark.parametrize(
    ("alias", "terms", "clip"),
    [
        # spec §4.1 table and §4.3 launchers
        ("sppo", {"none": 1.0}, 10.0),
        ("sppo_reversekl", {"reverse_kl": 1.0}, 10.0),
        ("sppo_reverseklnoent", {"reverse_kl_no_entropy": 1.0}, 10.0),
        ("sppo_forwardimportance7", {"forward_kl_importance": 1.0}, 7.0),
        ("sppo_forward", {"forward_kl_reference": 1.0}, 10.0),
        ("sppo_forwardreverse", {"forward_kl_importance": 1.0, "reverse_kl": 1.0}, 10.0),
        ("sppo_forward1reverse50", {"forward_kl_importance": 1.0, "reverse_kl": 50.0}, 10.0),
        ("sppo_forward1R5reverse5", {"forward_kl_importance": 1.0, "reverse_kl": 5.0}, 5.0),
        ("sppo_chisq10", {"chi_squared": 1.0}, 10.0),
        ("sppo_chisqsm1", {"smoothed_chi_squared": 1.0}, 10.0),
        ("sppo_entropy", {"entropy": 1.0}, 10.0),
    ],
)
def test_rspo_official_aliases(alias, terms, clip):
    assert resolve_rspo_regularizer(alias) == (terms, clip)


def test_rspo_clip_is_free_for_unclipped_aliases():
    assert resolve_rspo_regularizer("sppo_reversekl", clip=3.0) == ({"reverse_kl": 1.0}, 3.0)
    assert resolve_rspo_regularizer("sppo_forwardimportance7", clip=7.0) == ({"forward_kl_importance": 1.0}, 7.0)


def test_rspo_without_reference_uses_the_opponent():
    # spec §4.2: without a ref model the official code falls back to π_ref = π_t
    args = (t(POLICY_W), t(POLICY_L), t(OPPONENT_W), t(OPPONENT_L))
    fallback = rspo_loss(*args, None, None, t(P_WIN), t(P_LOSE), beta=0.01, reg_coef=0.5)
    explicit = rspo_loss(*args, t(OPPONENT_W), t(OPPONENT_L), t(P_WIN), t(P_LOSE), beta=0.01, reg_coef=0.5)
    close(fallback, explicit.item(), rel=1e-12)
    # d_w = [1, 1.5], d_l = [−1, −1] against π_t: G = (1 + 2.25)/2 + 1 = 2.625
    close(fallback, 150.0625 + 0.5 * 2.625, rel=1e-12)


def test_rspo_zero_coefficient_is_mean_sppo():
    args = (t(POLICY_W), t(POLICY_L), t(OPPONENT_W), t(OPPONENT_L), t(REF_W), t(REF_L), t(P_WIN), t(P_LOSE))
    close(rspo_loss(*args, beta=0.01, reg_coef=0.0, kind="entropy"), 150.0625, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Dtypes, import weight, docstring examples
# --------------------------------------------------------------------------------------------------


def test_half_precision_is_computed_in_float32():
    # η/2 = 500 next to a log-ratio of ~1: bfloat16 cannot hold the difference, float32 can
    pw, pl, ow, ol = (x.to(torch.bfloat16) for x in sppo_spec_inputs())
    loss = sppo_loss(pw, pl, ow, ol, beta=0.001, loss_type="sppo_hard")
    assert loss.dtype == torch.float32
    close(loss, [(1 - 500) ** 2 + (-1 + 500) ** 2, (1.5 - 500) ** 2 + (-1 + 500) ** 2], rel=1e-6)
    spin = spin_loss(*(x.to(torch.bfloat16) for x in spin_spec_inputs()))
    assert spin.dtype == torch.float32


def test_float64_probabilities_give_float64_loss():
    # spec §3.4: the official trainer builds the probabilities as float64, so its losses are float64
    pw, pl, ow, ol = (x.float() for x in sppo_spec_inputs())
    loss = sppo_loss(pw, pl, ow, ol, t(P_WIN), t(P_LOSE), beta=0.01)
    assert loss.dtype == F64
    close(loss, [121.0, 179.125])
    assert sppo_loss(pw, pl, ow, ol, P_WIN, P_LOSE, beta=0.01).dtype == torch.float32  # plain lists are accepted


def test_losses_module_imports_without_transformers_or_trl():
    code = (
        "import sys, hfx_trainers.losses; "
        "heavy = [m for m in ('transformers', 'trl', 'datasets', 'accelerate') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_docstring_examples():
    result = doctest.testmod(losses, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 7 and result.failed == 0


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def two(values=(-1.0, -2.0)):
    return t(list(values))


def three():
    return t([-1.0, -2.0, -3.0])


@pytest.mark.parametrize(
    ("call", "first", "second"),
    [
        (lambda: spin_loss(two(), two(), two(), three()), "policy_real_logps", "opponent_generated_logps"),
        (lambda: sppo_loss(two(), three(), two(), two(), two(), two()), "policy_chosen_logps", "policy_rejected_logps"),
        (
            lambda: inpo_loss(two(), two(), two(), two(), two(), three()),
            "policy_chosen_logps",
            "opponent_rejected_logps",
        ),
        (lambda: rspo_regularizer(two(), two(), three(), two()), "policy_chosen_logps", "ref_chosen_logps"),
        (
            lambda: rspo_regularizer(
                two(), two(), two(), two(), kind="forward_kl_reference", reference_response_logps=three()
            ),
            "policy_chosen_logps",
            "reference_response_logps",
        ),
    ],
)
def test_shape_mismatch_names_the_arguments(call, first, second):
    with pytest.raises(ValueError, match="shape mismatch") as info:
        call()
    assert first in str(info.value) and second in str(info.value)


def test_probability_shape_mismatch():
    with pytest.raises(ValueError, match="rejected_win_prob has shape"):
        sppo_loss(two(), two(), two(), two(), two((0.5, 0.5)), three())


def test_logps_must_be_one_dimensional_float_tensors():
    with pytest.raises(ValueError, match=r"policy_real_logps must have shape \(B,\)"):
        spin_loss(two().unsqueeze(1), two().unsqueeze(1), two().unsqueeze(1), two().unsqueeze(1))
    with pytest.raises(TypeError, match=r"policy_chosen_logps must be a torch\.Tensor"):
        sppo_loss([-1.0, -2.0], two(), two(), two(), two(), two())
    with pytest.raises(TypeError, match="floating-point"):
        inpo_loss(torch.tensor([1, 2]), two(), two(), two(), two(), two())


@pytest.mark.parametrize(
    ("call", "valid"),
    [
        (lambda: spin_loss(two(), two(), two(), two(), loss_type="ipo"), ["'sigmoid'", "'hinge'"]),
        (
            lambda: sppo_loss(two(), two(), two(), two(), two(), two(), loss_type="sigmoid"),
            ["'sppo'", "'sppo_single'", "'sppo_hard'"],
        ),
        (
            lambda: rspo_loss(two(), two(), two(), two(), two(), two(), two(), two(), loss_type="sppo_reversekl"),
            ["'sppo'", "'sppo_hard'"],
        ),
        (
            lambda: rspo_regularizer(two(), two(), two(), two(), kind="kl"),
            ["'reverse_kl'", "'forward_kl_importance'", "'smoothed_chi_squared'", "'sppo_forward1reverse<c>'"],
        ),
        (
            lambda: rspo_regularizer(two(), two(), two(), two(), kind={"reverse_kl": 1.0, "sppo_entropy": 1.0}),
            ["'sppo_entropy' in the mapping", "'entropy'"],
        ),
    ],
)
def test_unknown_names_list_the_valid_ones(call, valid):
    with pytest.raises(ValueError, match="unknown") as info:
        call()
    for name in valid:
        assert name in str(info.value)


def test_official_misspelling_gets_a_hint():
    # spec §4.4: one official launcher passes 'sppo_forward_importance', which the official trainer rejects
    with pytest.raises(ValueError, match="sppo_forwardimportance10"):
        rspo_regularizer(two(), two(), two(), two(), kind="sppo_forward_importance")


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"), True])
@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("beta", lambda v: spin_loss(two(), two(), two(), two(), beta=v)),
        ("beta", lambda v: sppo_loss(two(), two(), two(), two(), two(), two(), beta=v)),
        ("beta", lambda v: rspo_loss(two(), two(), two(), two(), two(), two(), two(), two(), beta=v)),
        ("beta", lambda v: implicit_reward(two(), two(), beta=v)),
        ("eta", lambda v: inpo_loss(two(), two(), two(), two(), two(), two(), eta=v)),
        ("clip", lambda v: rspo_regularizer(two(), two(), two(), two(), clip=v)),
    ],
)
def test_non_positive_scale_is_an_error(name, call, bad):
    with pytest.raises((ValueError, TypeError), match=name):
        call(bad)


def test_tau_above_eta_names_the_fix():
    with pytest.raises(ValueError, match=r"tau \(0\.01\) must not exceed eta \(0\.005\).*set tau <= eta"):
        inpo_loss(two(), two(), two(), two(), two(), two(), eta=0.005, tau=0.01)


def test_negative_tau_is_an_error():
    with pytest.raises(ValueError, match="tau must be >= 0"):
        inpo_loss(two(), two(), two(), two(), two(), two(), eta=0.005, tau=-0.001)


def test_missing_probabilities():
    with pytest.raises(ValueError, match=r"loss_type='sppo' needs rejected_win_prob"):
        sppo_loss(two(), two(), two(), two(), two((0.6, 0.7)))
    with pytest.raises(ValueError, match=r"loss_type='sppo_single' needs chosen_win_prob"):
        sppo_loss(two(), two(), two(), two(), loss_type="sppo_single")


def test_forward_kl_reference_needs_reference_responses():
    with pytest.raises(ValueError, match="needs reference_response_logps"):
        rspo_regularizer(two(), two(), two(), two(), kind="sppo_forward")


def test_clip_conflicting_with_an_official_alias():
    with pytest.raises(ValueError, match="fixes clip=7 but clip=3 was given"):
        rspo_regularizer(two(), two(), two(), two(), kind="sppo_forwardimportance7", clip=3.0)


def test_rspo_loss_bad_arguments():
    args = (two(), two(), two(), two())
    with pytest.raises(ValueError, match="reg_coef"):
        rspo_loss(*args, two(), two(), two(), two(), reg_coef=-0.1)
    with pytest.raises(ValueError, match="give both ref_chosen_logps and ref_rejected_logps"):
        rspo_loss(*args, two(), None, two(), two())
    with pytest.raises(ValueError, match="empty"):
        rspo_loss(*args, two(), two(), two(), two(), kind={})


def test_reference_free_spin_needs_no_opponent():
    loss = spin_loss(two((-1.0, -3.0)), two((-2.0, -1.0)), None, None, beta=0.5, reference_free=True)
    close(loss, [math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0))], rel=1e-12)
    with pytest.raises(TypeError, match=r"opponent_real_logps must be a torch\.Tensor"):
        spin_loss(two(), two(), None, None)
