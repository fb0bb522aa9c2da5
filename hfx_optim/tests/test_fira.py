"""Fira: an independent numpy float64 re-derivation of the spec's update (§4.1) for every proj_type, both residual
forms and every option, with subspace refreshes and the norm-growth limiter firing; reductions (official == paper at
scale 1, full-rank subspace == GaLore2); the conformance kit; Trainer/TRL integration; input errors.

The reference (here and in spec_reference.py) shares no code with hfx_optim (numpy; its own SVD, randomized SVD, sign
convention and seed derivation from the documented contract). Gradient amplitudes 1, 1, 3, 1, 3 make the limiter fire (spec §11).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from spec_reference import down, grad_t, rel, run_projected, subspace_schedule, up, w0
from torch import nn

import hfx
from hfx.testing import OptimizerConformance
from hfx_optim.fira import Fira, FiraFactory
from hfx_optim.galore2 import GaLore2
from hfx_optim.targets import TARGET_FLAG, param_groups

# --------------------------------------------------------------------------------------------------
# Independent reference (numpy, float64)
# --------------------------------------------------------------------------------------------------


DEFAULTS = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=2, update_proj_gap=2, scale=0.25,
                proj_type="std", svd="exact", oversample=2, power_iters=1, seed=0, moments_on_refresh="keep",
                correct_bias=True, eps_mode="hf", decay_mode="after", residual="official", norm_growth_limit=1.01)
AMPS = (1.0, 1.0, 3.0, 1.0, 3.0)


def reference_fira(shape, steps, amps=AMPS, **options):
    """W (Fira, param index 0) and a bias (AdamW group, no decay) after ``steps`` steps, the limiter values per step
    and the last ||S|| after limiting."""
    o = {**DEFAULTS, **options}
    lr, (b1, b2), eps, wd, alpha = o["lr"], o["betas"], o["eps"], o["weight_decay"], o["scale"]
    m, n = shape
    w, b = w0(m, n), w0(m, 1)[:, 0]
    mb, vb = np.zeros(m), np.zeros(m)
    mw = vw = prev = None
    tw = 0
    limiters = []

    def bc(t):
        return (1 - b1**t, 1 - b2**t) if o["correct_bias"] else (1.0, 1.0)

    def decay(x, step, wd_):
        return (x * (1 - lr * wd_) - step) if o["decay_mode"] == "before" else (x - step) * (1 - lr * wd_)

    grads = (grad_t(m, n, t, amps[t - 1]) for t in range(1, steps + 1))
    for t, (g, lb, rb, fresh) in enumerate(subspace_schedule(o, grads), 1):  # exactly one of lb, rb for Fira
        if fresh:
            mw = vw = np.zeros_like(down(g, lb, rb))
            tw = 0
        tw += 1
        r = down(g, lb, rb)
        mw, vw = b1 * mw + (1 - b1) * r, b2 * vw + (1 - b2) * r * r
        bc1, bc2 = bc(tw)
        # Adam direction N with lr * sqrt(bc2)/bc1 * N the step; "torch" moves eps inside the bias correction
        nw = mw / (np.sqrt(vw) + (eps if o["eps_mode"] == "hf" else eps * np.sqrt(bc2)))
        residual = g - (alpha if o["residual"] == "official" else 1.0) * up(r, lb, rb)
        if lb is not None:  # R = r×n: one factor per column
            s = residual * (np.linalg.norm(nw, axis=0) / (np.linalg.norm(r, axis=0) + 1e-8))[None, :]
        else:  # R = m×r: one factor per row
            s = residual * (np.linalg.norm(nw, axis=1) / (np.linalg.norm(r, axis=1) + 1e-8))[:, None]
        if o["norm_growth_limit"] is not None:
            norm = np.linalg.norm(s)
            if prev is None:
                prev, lim = norm, 1.0
            else:
                lim = max(norm / (prev + 1e-8), o["norm_growth_limit"]) / o["norm_growth_limit"]
                s, prev = s / lim, norm / lim
            limiters.append(lim)
        w = decay(w, lr * np.sqrt(bc2) / bc1 * (alpha * up(nw, lb, rb) + s), wd)
        gb = grad_t(m, 1, t, amps[t - 1])[:, 0]
        mb, vb = b1 * mb + (1 - b1) * gb, b2 * vb + (1 - b2) * gb * gb
        bc1, bc2 = bc(t)
        nb = mb / (np.sqrt(vb) + (eps if o["eps_mode"] == "hf" else eps * np.sqrt(bc2)))
        b = decay(b, lr * np.sqrt(bc2) / bc1 * nb, 0.0)
    return w, b, limiters, prev


def run(shape, steps, dtype=torch.float64, amps=AMPS, cls=Fira, **options):
    o = {**DEFAULTS, **options}
    if cls is GaLore2:
        del o["residual"], o["norm_growth_limit"]
    return run_projected(cls, shape, steps, o, dtype, amps)


PROJ_TYPES = ("std", "reverse_std", "left", "right")
SHAPES = ((5, 3), (3, 5), (12, 9), (9, 12))


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("residual", ["official", "paper"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_reference_fp64(proj_type, shape, residual, svd):
    steps = 5  # refreshes before steps 1, 3, 5; the gradient triples at steps 3 and 5
    w_ref, b_ref, limiters, prev = reference_fira(shape, steps, proj_type=proj_type, residual=residual, svd=svd)
    assert max(limiters) > 1.05, limiters  # the limiter fires in this configuration
    w, b, opt = run(shape, steps, proj_type=proj_type, residual=residual, svd=svd)
    w_init = w0(*shape)
    assert rel(w, w_ref) < 1e-10 and rel(b, b_ref) < 1e-10
    assert rel(w - torch.from_numpy(w_init), w_ref - w_init) < 1e-9
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert abs(float(state["scaling_norm"]) - prev) < 1e-10 * prev
    assert (state["step"], state["refreshes"]) == (5, 3)


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("options", [
    {"moments_on_refresh": "reset"},
    {"eps_mode": "torch"},
    {"decay_mode": "before", "weight_decay": 0.1},
    {"weight_decay": 0.1},
    {"correct_bias": False},
    {"norm_growth_limit": None},
    {"norm_growth_limit": 1.5},
    {"scale": 1.0},
    {"svd": "randomized", "oversample": 0, "power_iters": 0, "seed": 99},
    {"update_proj_gap": 1, "rank": 3, "betas": (0.8, 0.95), "lr": 0.03},
])
@pytest.mark.parametrize("residual", ["official", "paper"])
def test_options_match_reference_fp64(options, residual):
    w_ref, b_ref, _, _ = reference_fira((9, 12), 5, residual=residual, **options)
    w, b, _ = run((9, 12), 5, residual=residual, **options)
    assert rel(w, w_ref) < 1e-10 and rel(b, b_ref) < 1e-10


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("residual", ["official", "paper"])
@pytest.mark.parametrize("shape", [(12, 9), (9, 12)])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_reference_fp32(proj_type, shape, residual):
    w_ref, b_ref, _, _ = reference_fira(shape, 5, proj_type=proj_type, residual=residual)
    w, b, opt = run(shape, 5, dtype=torch.float32, proj_type=proj_type, residual=residual)
    assert w.dtype == torch.float32 and opt.state[opt.param_groups[0]["params"][0]]["scaling_norm"].dtype == w.dtype
    assert rel(w, w_ref) < 1e-6 and rel(b, b_ref) < 1e-6


@pytest.mark.usefixtures("kernel_backend")
def test_limiter_state_after_the_first_step_is_the_residual_norm():
    _, _, limiters, prev = reference_fira((5, 3), 1)
    _, _, opt = run((5, 3), 1)
    assert limiters == [1.0]
    assert abs(float(opt.state[opt.param_groups[0]["params"][0]]["scaling_norm"]) - prev) < 1e-12 * prev


@pytest.mark.usefixtures("kernel_backend")
def test_variants_differ_where_they_should_and_agree_where_they_must():
    official, _, _ = run((9, 12), 5)
    paper, _, _ = run((9, 12), 5, residual="paper")
    no_limit, _, _ = run((9, 12), 5, norm_growth_limit=None)
    assert (official - paper).abs().max() > 1e-6  # (1 - scale) of the in-subspace gradient is kept by "official"
    assert (official - no_limit).abs().max() > 1e-6  # the limiter fired
    at_one = [run((9, 12), 5, scale=1.0, residual=form)[0] for form in ("official", "paper")]
    assert torch.equal(*at_one)  # the two residual forms are the same at scale 1
    loose = run((9, 12), 5, norm_growth_limit=1e6)[0]
    assert torch.equal(loose, no_limit)  # a limit no step reaches leaves the update exactly as without one


@pytest.mark.usefixtures("kernel_backend")
def test_full_rank_subspace_reduces_to_galore2():
    """rank = min(m, n): the subspace is everything, the paper-form residual is 0 and Fira is GaLore-AdamW."""
    for shape in ((5, 3), (3, 5)):
        common = dict(rank=3, svd="exact", scale=0.5, weight_decay=0.1)
        fira, _, _ = run(shape, 4, residual="paper", **common)
        galore, _, _ = run(shape, 4, cls=GaLore2, **common)
        assert (fira - torch.from_numpy(w0(*shape))).abs().max() > 1e-3  # it did move
        torch.testing.assert_close(fira, galore, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------------------------------
# Conformance kit
# --------------------------------------------------------------------------------------------------


class _FiraConformance(OptimizerConformance):
    options: dict = {}

    def make_optimizer(self, model):
        groups = param_groups(model, "all-linear", weight_decay=0.01,
                              target_options={"rank": 2, "update_proj_gap": 2, **self.options})
        return Fira(groups, lr=1e-2)


class TestConformanceDefault(_FiraConformance):
    options = {}


class TestConformancePaperRandomized(_FiraConformance):
    options = {"residual": "paper", "svd": "randomized", "scale": 0.25, "proj_type": "reverse_std"}


# --------------------------------------------------------------------------------------------------
# Registry, facade, Trainer and TRL
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
def test_registered_and_resolved_through_the_facade(registered):
    registered("fira", Fira, ("Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?",
                              "2410.01623"), factory=FiraFactory)
    cls, kwargs = hfx.optimizer("fira", rank=4)
    assert cls is FiraFactory and kwargs == {"rank": 4}


@pytest.mark.floor
def test_sft_trainer_with_hfx_optimizer_fira(registry, sft_trainer, train_all, tmp_path):
    trainer = sft_trainer(tmp_path, learning_rate=1e-2, weight_decay=0.01, hfx_optimizer="fira",
                          hfx_optimizer_args={"rank": 4, "residual": "paper"})
    opt = train_all(trainer)
    assert type(opt) is Fira and trainer.state.global_step == 2
    targets = [g for g in opt.param_groups if g[TARGET_FLAG]]
    assert targets and all(g["rank"] == 4 and g["residual"] == "paper" and g["weight_decay"] == 0.01 for g in targets)
    q = opt.state[dict(trainer.model.named_parameters())["model.layers.0.mlp.down_proj.weight"]]  # 32×64: left
    assert q["proj_left"].shape == (32, 4) and q["exp_avg"].shape == (4, 64) and torch.isfinite(q["scaling_norm"])


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def matrix():
    return nn.Parameter(torch.ones(4, 3))


@pytest.mark.parametrize(("group", "kwargs", "message"), [
    ({"proj_type": "full"}, {}, r"proj_type='full' is not supported by Fira.*use one of 'std', 'reverse_std', 'left', "
                                r"'right'"),
    ({}, {"proj_type": "full"}, r"proj_type='full' is not supported by Fira"),
    ({"proj_type": "diag"}, {}, r"unknown proj_type 'diag'"),
    ({"alpha": 0.25}, {}, r"Fira calls the official 'alpha' scale: pass scale=0\.25 instead of alpha"),
    ({"residual": "both"}, {}, r"unknown residual 'both': use one of 'official', 'paper'"),
    ({}, {"norm_growth_limit": 0.5}, r"norm_growth_limit must be a finite number >= 1.*or None to turn it off"),
    ({}, {"betas": (0.9, 1.0)}, r"betas\[1\] must be in \[0, 1\)"),
    ({}, {"lr": -1.0}, r"lr must be a finite number >= 0"),
    ({"rank": 5}, {}, r"rank=5 is larger than parameter #0 of its group \(shape 4×3\)"),
])
def test_bad_arguments(group, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Fira([{"params": [matrix()], "rank": 1, **group}], **kwargs)


def test_non_matrix_names_the_parameter():
    with pytest.raises(ValueError, match=r"Fira: parameter 'ln\.weight' \(shape 3\) is in a projected group"):
        Fira([{"params": [("ln.weight", nn.Parameter(torch.ones(3)))], "rank": 1}])


@pytest.mark.parametrize("kept", [0.25, 1.0])
@pytest.mark.parametrize("side", ["left", "right"])
def test_residual_norm_from_column_norms_equals_the_formed_residual(side, kept):
    """The limiter's ||phi * (G - kept * back(R))|| from column (row) norms equals the norm of the formed residual:
    to 1e-12 in fp64; in fp32 to 1e-4 with ~1% of G's energy outside the subspace (the identity's rounding error
    grows as ||G||^2 / ||residual||^2, the cancellation-prone case being G almost inside the subspace)."""
    from hfx_optim.fira import residual_norm

    gen = torch.Generator().manual_seed(0)
    m, n, r = 40, 24, 6
    basis, _ = torch.linalg.qr(torch.randn(m if side == "left" else n, r, generator=gen, dtype=torch.float64))
    for tail, dtype, tol in ((1.0, torch.float64, 1e-12), (3e-2, torch.float32, 1e-4)):
        inside = torch.randn(r, n if side == "left" else m, generator=gen, dtype=torch.float64)
        g = (basis @ inside).T if side == "right" else basis @ inside
        g = g + tail * torch.randn(m, n, generator=gen, dtype=torch.float64)
        dim = 0 if side == "left" else 1
        phi = torch.rand(*((1, n) if side == "left" else (m, 1)), generator=gen, dtype=torch.float64)
        back = basis @ (basis.T @ g) if side == "left" else (g @ basis) @ basis.T
        expected = (phi * (g - kept * back)).norm()
        low = basis.T.to(dtype) @ g.to(dtype) if side == "left" else g.to(dtype) @ basis.to(dtype)
        got = residual_norm(g.to(dtype), torch.linalg.vector_norm(low, dim=dim, keepdim=True), phi.to(dtype), kept,
                            dim)
        assert abs(float(got) - float(expected)) <= tol * float(expected), (dtype, float(got), float(expected))
