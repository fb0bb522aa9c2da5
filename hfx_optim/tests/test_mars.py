"""MARS: the spec's deterministic vectors (§11), an independent per-element re-derivation of every variant, exact vs
approximate mode, the gamma=0 reduction to AdamW, the conformance kit, Trainer/TRL integration and input errors.

The reference below (`reference_mars`) is written from the formulas of the spec (§2.1) with Python floats, element
by element; it shares no code with hfx_optim.mars. Expected constants are the spec's float64 values. The reference tests
run on both kernel paths (the `kernel_backend` fixture: torch, and Triton or its CPU interpreter).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hfx
from hfx.testing import OptimizerConformance, check_weights_only_roundtrip, unwrap_optimizer
from hfx_optim.mars import MARS

# --------------------------------------------------------------------------------------------------
# Independent reference (spec §2.1), Python floats, per element
# --------------------------------------------------------------------------------------------------


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


def reference_ns5(x: torch.Tensor, eps: float, steps: int = 5) -> torch.Tensor:
    """Newton–Schulz quintic in float64: X <- aX + b(XX^T)X + c(XX^T)^2 X on X/(||X||+eps), transposed if tall."""
    a, b, c = 3.4445, -4.7750, 2.0315
    y = x.double() / (math.sqrt(float((x.double() ** 2).sum())) + eps)
    tall = y.shape[0] > y.shape[1]
    if tall:
        y = y.T
    for _ in range(steps):
        ay = (y @ y.T) @ y
        y = a * y + b * ay + c * ((y @ y.T) @ ay)
    return y.T if tall else y


def reference_mars(
    init,
    grads,
    *,
    prev=None,
    weight_decays=None,
    mars_type="adamw",
    optimize_1d=False,
    lr=3e-3,
    betas=(0.95, 0.99),
    eps=1e-8,
    gamma=0.025,
    lr_1d=None,
    betas_1d=(0.9, 0.95),
    weight_decay_1d=0.1,
    weight_decay_1d_mode="group",
):
    """Run MARS from the spec's formulas. ``init``: list of tensors; ``grads[t-1][i]``: gradient of parameter i at
    step t; ``prev[t-1][i]`` (exact mode): g_prev at step t, None meaning 0; ``weight_decays[i]``: the weight decay
    of parameter i's group. Returns float64 tensors and the pre-clip norms of c."""
    b1, b2 = betas
    out, norms = [], []
    for i, p0 in enumerate(init):
        shape = tuple(p0.shape)
        p = [float(x) for x in p0.double().flatten()]
        n = len(p)
        m, v, last = [0.0] * n, [0.0] * n, [0.0] * n
        wd = (weight_decays or [0.0] * len(init))[i]
        on_mars = optimize_1d or len(shape) == 2
        for t in range(1, len(grads) + 1):
            g = [float(x) for x in grads[t - 1][i].double().flatten()]
            if on_mars:
                if prev is None:
                    gp = last
                elif prev[t - 1][i] is None:
                    gp = [0.0] * n
                else:
                    gp = [float(x) for x in prev[t - 1][i].double().flatten()]
                k = gamma * b1 / (1 - b1)
                c = [g[e] + k * (g[e] - gp[e]) for e in range(n)]
                norm = math.sqrt(sum(x * x for x in c))
                norms.append(norm)
                if norm > 1:
                    c = [x / norm for x in c]
                m = [b1 * m[e] + (1 - b1) * c[e] for e in range(n)]
                if mars_type == "lion":
                    p = [p[e] - lr * (wd * p[e] + _sign(m[e])) for e in range(n)]
                elif mars_type == "shampoo" and len(shape) == 2:
                    o = reference_ns5(torch.tensor(m, dtype=torch.float64).view(shape) / (1 - b1), eps)
                    o = [float(x) for x in o.flatten()]
                    s = math.sqrt(max(1.0, shape[0] / shape[1]))
                    p = [p[e] - lr * (o[e] * s + wd * p[e]) for e in range(n)]
                else:
                    v = [b2 * v[e] + (1 - b2) * c[e] * c[e] for e in range(n)]
                    bc1, bc2 = 1 - b1**t, 1 - b2**t
                    p = [p[e] - lr * wd * p[e] - lr * (m[e] / bc1) / (math.sqrt(v[e] / bc2) + eps) for e in range(n)]
                last = g
            else:
                c1, c2 = betas_1d
                lr1 = lr if lr_1d is None else lr_1d
                wd1 = weight_decay_1d if (weight_decay_1d_mode == "always" or wd != 0) else 0.0
                m = [c1 * m[e] + (1 - c1) * g[e] for e in range(n)]
                v = [c2 * v[e] + (1 - c2) * g[e] * g[e] for e in range(n)]
                bc1, bc2 = 1 - c1**t, 1 - c2**t
                p = [p[e] - lr1 * wd1 * p[e] - lr1 * (m[e] / bc1) / (math.sqrt(v[e] / bc2) + eps) for e in range(n)]
        out.append(torch.tensor(p, dtype=torch.float64).view(shape))
    return out, norms


# --------------------------------------------------------------------------------------------------
# §11 deterministic vectors
# --------------------------------------------------------------------------------------------------


def closed_form(amp: float):
    """W0[i,j] = 0.5 cos(0.9i - 0.4j + 0.3); G_t[i,j] = amp (sin(0.7(i+1)(j+1) + 1.1t) + 0.3 cos(1.3i - 0.6jt));
    W is 4x3 and the bias of 3 uses j = 0."""
    i = torch.arange(4, dtype=torch.float64)[:, None]
    j = torch.arange(3, dtype=torch.float64)[None, :]
    w0 = 0.5 * torch.cos(0.9 * i - 0.4 * j + 0.3)

    def grad(t):
        return amp * (torch.sin(0.7 * (i + 1) * (j + 1) + 1.1 * t) + 0.3 * torch.cos(1.3 * i - 0.6 * j * t))

    return w0, grad


SPEC_HPARAMS = dict(lr=3e-3, betas=(0.95, 0.99), weight_decay=0.01, gamma=0.025, lr_1d=1.5e-3, betas_1d=(0.9, 0.95),
                    weight_decay_1d=0.1)


def run_spec_case(amp: float, exact: bool, **extra):
    w0, grad = closed_form(amp)
    w = nn.Parameter(w0.clone())
    b = nn.Parameter(w0[:, 0][:3].clone())
    opt = MARS([w, b], is_approx=not exact, **SPEC_HPARAMS, **extra)
    for t in (1, 2, 3):
        w.grad, b.grad = grad(t), grad(t)[:3, 0].clone()
        if exact:  # official loop: at iteration t the "next batch at the current parameters" gives 0.9 G_{t+1}
            opt.set_prev_grads([0.9 * grad(t + 1), None])
        opt.step()
    return w.detach(), b.detach()


def spec_reference(amp: float, exact: bool):
    w0, grad = closed_form(amp)
    init = [w0, w0[:3, 0]]
    grads = [[grad(t), grad(t)[:3, 0]] for t in (1, 2, 3)]
    prev = [[None, None]] + [[0.9 * grad(t), None] for t in (2, 3)] if exact else None
    hp = {k: v for k, v in SPEC_HPARAMS.items() if k != "weight_decay"}
    return reference_mars(init, grads, prev=prev, weight_decays=[0.01, 0.01], **hp)


@pytest.mark.floor
@pytest.mark.parametrize(
    ("amp", "exact", "w00", "b0"),
    [
        (1.0, False, 0.471662042088, 0.473871141702),  # clip active
        (0.05, False, 0.471522605694, None),  # clip inactive
        # exact mode, g_prev = 0.9 G_t from step 2 (0 at step 1). The spec leaves this case's amplitude unstated:
        # amp 0.05 (clip inactive) reproduces its value; amp 1 gives 0.470418762909
        (0.05, True, 0.470425773924, None),
    ],
    ids=["clip-active", "clip-inactive", "exact"],
)
def test_spec_vectors(amp, exact, w00, b0, kernel_backend):
    (ref_w, ref_b), norms = spec_reference(amp, exact)
    # the reference reproduces the spec's published values (so it encodes the same formulas) ...
    assert ref_w[0, 0].item() == pytest.approx(w00, abs=1e-12)
    if b0 is not None:
        assert ref_b[0].item() == pytest.approx(b0, abs=1e-12)
    if amp == 1.0:
        assert [round(x, 2) for x in norms] == [3.66, 3.72, 3.21]  # ||c_t|| before the clip, as the spec logs
    # ... and MARS in float64 matches the reference to the spec's fp64 tolerance, on every element
    for mode in ("group", "always"):  # one group with weight_decay 0.01: both 1-D modes decay the bias by 0.1
        w, b = run_spec_case(amp, exact, weight_decay_1d_mode=mode)
        torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, ref_b, rtol=1e-10, atol=1e-12)
        assert w[0, 0].item() == pytest.approx(w00, abs=1e-12)


def test_spec_vector_in_float32_within_kernel_tolerance(kernel_backend):
    (ref_w, ref_b), _ = spec_reference(1.0, False)
    w0, grad = closed_form(1.0)
    w, b = nn.Parameter(w0.float()), nn.Parameter(w0[:3, 0].float())
    opt = MARS([w, b], **SPEC_HPARAMS)
    for t in (1, 2, 3):
        w.grad, b.grad = grad(t).float(), grad(t)[:3, 0].float()
        opt.step()
    torch.testing.assert_close(w.detach().double(), ref_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach().double(), ref_b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Random inputs, every variant, fp32 against the float64 reference
# --------------------------------------------------------------------------------------------------

SHAPES = [(5, 3), (3, 6), (3,), (2, 2, 3), ()]  # tall and wide matrices, a bias, a 3-D weight, a scalar


def random_problem(seed: int, steps: int = 4, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[scale * torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    prev = [[None if t == 0 and i % 2 else scale * torch.randn(s, generator=g) for i, s in enumerate(SHAPES)]
            for t in range(steps)]
    return init, grads, prev


@pytest.mark.parametrize("mars_type", ["adamw", "lion", "shampoo"])
@pytest.mark.parametrize("optimize_1d", [False, True], ids=["1d-adamw", "1d-mars"])
@pytest.mark.parametrize("exact", [False, True], ids=["approx", "exact"])
@pytest.mark.parametrize("mode", ["group", "always"])
def test_matches_reference_on_random_inputs(mars_type, optimize_1d, exact, mode, kernel_backend):
    seed = 8 * ["adamw", "lion", "shampoo"].index(mars_type) + 4 * optimize_1d + 2 * exact + (mode == "always")
    init, grads, prev = random_problem(seed=seed)
    hp = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-8, gamma=0.05, lr_1d=1.5e-3, betas_1d=(0.85, 0.95),
              weight_decay_1d=0.2, weight_decay_1d_mode=mode, mars_type=mars_type, optimize_1d=optimize_1d)
    # group 0 decays (0.01), group 1 (the bias) is a no-decay group as Trainer builds it
    weight_decays = [0.01, 0.01, 0.0, 0.01, 0.01]
    ref, _ = reference_mars(init, grads, prev=prev if exact else None, weight_decays=weight_decays, **hp)

    params = [nn.Parameter(p.clone()) for p in init]
    groups = [{"params": [params[i] for i in (0, 1, 3, 4)], "weight_decay": 0.01},
              {"params": [params[2]], "weight_decay": 0.0}]
    opt = MARS(groups, is_approx=not exact, ns_dtype="float32", **hp)
    for t in range(len(grads)):
        for p, g in zip(params, grads[t], strict=True):
            p.grad = g.clone()
        # a {param: grad} dict: the groups list the parameters in another order than SHAPES
        opt.step(prev_grads=dict(zip(params, prev[t], strict=True)) if exact else None)
    for i, (p, want) in enumerate(zip(params, ref, strict=True)):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, i=i: f"parameter {i} of shape {SHAPES[i]}: {m}")
        assert not torch.equal(p.detach(), init[i]), f"parameter {i} did not move"


def test_shampoo_default_bfloat16_newton_schulz_is_close_to_float64():
    init, grads, _ = random_problem(seed=3)
    ref, _ = reference_mars(init, grads, mars_type="shampoo", lr=1e-2)
    params = [nn.Parameter(p.clone()) for p in init]
    opt = MARS(params, mars_type="shampoo", lr=1e-2)  # ns_dtype bfloat16, as the official code
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for i in (0, 1):
        moved, want = params[i].detach().double() - init[i].double(), ref[i] - init[i].double()
        assert torch.linalg.vector_norm(moved - want) < 0.05 * torch.linalg.vector_norm(want)  # bf16: ~2%


def test_shampoo_update_is_orthogonalised_and_scaled():
    # one step from m = (1-beta1) c: the update direction is NS5(c) * sqrt(max(1, rows/cols)), singular values ~1
    g = torch.Generator().manual_seed(0)
    for shape in ((12, 4), (4, 12)):
        p = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        p.grad = 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)
        MARS([p], lr=1.0, mars_type="shampoo", ns_dtype="float64").step()
        sv = torch.linalg.svdvals(-p.detach()) / math.sqrt(max(1.0, shape[0] / shape[1]))
        assert sv.min() > 0.6 and sv.max() < 1.25, sv  # NS5's quintic maps singular values into about [0.7, 1.2]


# --------------------------------------------------------------------------------------------------
# Exact versus approximate MARS
# --------------------------------------------------------------------------------------------------


def run(params_init, grads, prev=None, use_set_prev=False, **kw):
    params = [nn.Parameter(p.clone()) for p in params_init]
    opt = MARS(params, **kw)
    for t, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        if use_set_prev:
            if t + 1 < len(prev):
                opt.set_prev_grads(prev[t + 1])  # recorded one step ahead, as in the official loop
            opt.step()
        else:
            opt.step(prev_grads=prev[t] if prev is not None else None)
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("mars_type", ["adamw", "lion", "shampoo"])
def test_exact_with_last_gradients_equals_approx(mars_type, kernel_backend):
    init, grads, _ = random_problem(seed=11)
    approx, _ = run(init, grads, mars_type=mars_type, optimize_1d=True)
    last = [[None] * len(SHAPES), *grads[:-1]]  # step 1: g_prev = 0; then the previous step's gradient
    exact, _ = run(init, grads, prev=last, mars_type=mars_type, optimize_1d=True, is_approx=False)
    for a, e in zip(approx, exact, strict=True):
        assert torch.equal(a, e)


def test_exact_differs_from_approx_only_through_g_prev(kernel_backend):
    init, grads, prev = random_problem(seed=12)
    approx, _ = run(init, grads)
    exact, _ = run(init, grads, prev=prev, is_approx=False)
    ref_exact, _ = reference_mars(init, grads, prev=prev)
    assert not torch.equal(approx[0], exact[0])  # another g_prev gives another c ...
    torch.testing.assert_close(exact[0].double(), ref_exact[0], rtol=1e-6, atol=1e-7)  # ... the formula's one
    torch.testing.assert_close(exact[2], approx[2], rtol=0, atol=0)  # the AdamW path never uses g_prev


def test_set_prev_grads_equals_passing_them_to_step():
    init, grads, prev = random_problem(seed=13)
    prev[0] = [None] * len(SHAPES)  # the official loop has nothing for step 1
    direct, _ = run(init, grads, prev=prev, is_approx=False, optimize_1d=True)
    recorded, _ = run(init, grads, prev=prev, use_set_prev=True, is_approx=False, optimize_1d=True)
    for d, r in zip(direct, recorded, strict=True):
        assert torch.equal(d, r)


def test_exact_mode_state_resumes_bit_identically():
    init, grads, prev = random_problem(seed=14, steps=5)
    prev[0] = [None] * len(SHAPES)
    full, _ = run(init, grads, prev=prev, use_set_prev=True, is_approx=False)

    params = [nn.Parameter(p.clone()) for p in init]
    opt = MARS(params, is_approx=False)
    for t in range(2):
        for p, g in zip(params, grads[t], strict=True):
            p.grad = g.clone()
        opt.set_prev_grads(prev[t + 1])
        opt.step()
    saved = check_weights_only_roundtrip({"params": [p.detach() for p in params], "opt": opt.state_dict()})
    assert "prev_grad" in saved["opt"]["state"][0]  # the recorded g_prev of step 3 travels with the checkpoint
    params = [nn.Parameter(p.clone()) for p in saved["params"]]
    opt = MARS(params, is_approx=False)
    opt.load_state_dict(saved["opt"])
    for t in range(2, 5):
        for p, g in zip(params, grads[t], strict=True):
            p.grad = g.clone()
        if t + 1 < 5:
            opt.set_prev_grads(prev[t + 1])
        opt.step()
    for a, b in zip(full, params, strict=True):
        assert torch.equal(a, b.detach())


def test_exact_mode_without_g_prev_fails_and_leaves_state_alone():
    p = nn.Parameter(torch.ones(3, 2))
    opt = MARS([p], is_approx=False)
    p.grad = torch.ones(3, 2)
    opt.step()  # step 1: g_prev = 0 by convention
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"step 2: no gradient at the previous parameters.*prev_grads=.*"
                                           r"set_prev_grads\(\).*is_approx=True"):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.state[p]["step"] == 1


# --------------------------------------------------------------------------------------------------
# gamma = 0: MARS-AdamW is AdamW (up to the Frobenius clip at 1)
# --------------------------------------------------------------------------------------------------


def adamw_vs_mars(scale: float, optimize_1d: bool, normalise_for_adamw: bool = False):
    init, grads, _ = random_problem(seed=21, steps=5, scale=scale)
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    a = [nn.Parameter(p.clone()) for p in init]
    m = [nn.Parameter(p.clone()) for p in init]
    adamw = torch.optim.AdamW(a, **hp)
    mars = MARS(m, gamma=0.0, optimize_1d=optimize_1d, betas_1d=hp["betas"], weight_decay_1d=hp["weight_decay"], **hp)
    for step_grads in grads:
        for pa, pm, g in zip(a, m, step_grads, strict=True):
            clipped = g / max(1.0, float(torch.linalg.vector_norm(g)))
            pa.grad = clipped if normalise_for_adamw and (optimize_1d or g.ndim == 2) else g.clone()
            pm.grad = g.clone()
        adamw.step()
        mars.step()
    return [p.detach() for p in a], [p.detach() for p in m]


@pytest.mark.parametrize("optimize_1d", [False, True], ids=["1d-adamw", "1d-mars"])
def test_gamma_zero_is_adamw(optimize_1d, kernel_backend):
    # small gradients: ||c|| = ||g|| < 1, no clip; MARS's decay form (p -= lr*wd*p before the update) and its
    # eps placement (after sqrt(v/bc2)) are torch.optim.AdamW's
    adamw, mars = adamw_vs_mars(scale=0.01, optimize_1d=optimize_1d)
    for a, m in zip(adamw, mars, strict=True):
        torch.testing.assert_close(m, a, rtol=1e-6, atol=1e-7)


def test_gamma_zero_with_large_gradients_is_adamw_on_clipped_gradients(kernel_backend):
    adamw, mars = adamw_vs_mars(scale=3.0, optimize_1d=True)
    assert not torch.allclose(mars[0], adamw[0], rtol=1e-4)  # the per-tensor clip makes MARS differ ...
    adamw, mars = adamw_vs_mars(scale=3.0, optimize_1d=True, normalise_for_adamw=True)
    for a, m in zip(adamw, mars, strict=True):  # ... exactly by feeding AdamW g / max(1, ||g||)
        torch.testing.assert_close(m, a, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# State, buffers, 1-D weight decay, lr_1d
# --------------------------------------------------------------------------------------------------


def test_previous_gradient_is_copied_not_aliased(kernel_backend):
    # gradient buckets reused in place (DDP gradient_as_bucket_view, zero_grad(set_to_none=False)) must give the
    # same result as fresh gradients: the optimizer keeps its own copy of g_prev
    init, grads, _ = random_problem(seed=31)
    fresh, _ = run(init, grads)
    params = [nn.Parameter(p.clone()) for p in init]
    opt = MARS(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad.copy_(g)  # same tensor every step
        opt.step()
        assert opt.state[params[0]]["prev_grad"].data_ptr() != params[0].grad.data_ptr()
    for f, p in zip(fresh, params, strict=True):
        assert torch.equal(f, p.detach())


@pytest.mark.parametrize(("mars_type", "keys_2d"), [
    ("adamw", {"step", "exp_avg", "exp_avg_sq", "prev_grad"}),
    ("lion", {"step", "exp_avg", "prev_grad"}),
    ("shampoo", {"step", "exp_avg", "prev_grad"}),
])
def test_state_buffers(mars_type, keys_2d):
    w, b = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(2))
    opt = MARS([w, b], mars_type=mars_type)
    w.grad, b.grad = torch.ones(3, 2), torch.ones(2)
    opt.step()
    assert set(opt.state[w]) == keys_2d
    assert set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW path: no g_prev kept
    assert opt.state[w]["step"] == 1 and isinstance(opt.state[w]["step"], int)


@pytest.mark.parametrize(("mode", "group_wd", "decays"), [
    ("group", 0.0, False),  # HF's no-decay group: biases and norms are left alone
    ("group", 0.05, True),
    ("always", 0.0, True),  # official: weight_decay_1d whatever the group says
])
def test_weight_decay_1d_mode(mode, group_wd, decays, kernel_backend):
    # a zero gradient leaves m = 0, so only the decay moves the parameter: p <- p * (1 - lr_1d * weight_decay_1d)
    b = nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
    opt = MARS([{"params": [b], "weight_decay": group_wd}], lr=0.1, lr_1d=0.05, weight_decay_1d=0.2,
               weight_decay_1d_mode=mode)
    b.grad = torch.zeros_like(b)
    opt.step()
    want = 2.0 * (1 - 0.05 * 0.2) if decays else 2.0
    torch.testing.assert_close(b.detach(), torch.full((4,), want, dtype=torch.float64), rtol=1e-15, atol=0)


def test_lr_1d_follows_the_scheduler(kernel_backend):
    b = nn.Parameter(torch.full((3,), 1.0, dtype=torch.float64))
    opt = MARS([b], lr=0.1, lr_1d=0.05, weight_decay=0.01, weight_decay_1d=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # lr -> 0.05, so lr_1d -> 0.025
    b.grad = torch.zeros_like(b)
    opt.step()
    sched.step()
    torch.testing.assert_close(b.detach(), torch.full((3,), 1 - 0.025 * 0.5, dtype=torch.float64), rtol=1e-15, atol=0)


def test_defaults_are_the_official_ones():
    opt = MARS([nn.Parameter(torch.ones(2, 2))])
    d = opt.param_groups[0]
    assert (d["lr"], d["betas"], d["eps"], d["weight_decay"], d["gamma"]) == (3e-3, (0.95, 0.99), 1e-8, 0.0, 0.025)
    assert (d["mars_type"], d["is_approx"], d["optimize_1d"]) == ("adamw", True, False)
    assert (d["betas_1d"], d["weight_decay_1d"], d["lr_1d_ratio"]) == ((0.9, 0.95), 0.1, 1.0)  # lr_1d = lr = 3e-3
    assert (d["ns_steps"], d["ns_dtype"], d["weight_decay_1d_mode"]) == (5, "bfloat16", "group")
    assert MARS([nn.Parameter(torch.ones(2))], mars_type="mars-lion").param_groups[0]["mars_type"] == "lion"


def test_bfloat16_parameters(kernel_backend):
    model = nn.Linear(8, 4).to(torch.bfloat16)
    for mars_type in ("adamw", "lion", "shampoo"):
        opt = MARS(model.parameters(), lr=1e-2, mars_type=mars_type)
        model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
        opt.step()
        assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
        assert opt.state[model.weight]["exp_avg"].dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# Conformance kit
# --------------------------------------------------------------------------------------------------


class _MARSConformance(OptimizerConformance):
    options: dict = {}

    def make_optimizer(self, model):
        return MARS(model.parameters(), lr=1e-2, **self.options)


class TestConformanceAdamW(_MARSConformance):
    options = {}


class TestConformanceLion(_MARSConformance):
    options = {"mars_type": "lion"}


class TestConformanceShampoo(_MARSConformance):
    options = {"mars_type": "shampoo"}


class TestConformanceAllMARSWithDecay(_MARSConformance):
    options = {"optimize_1d": True, "weight_decay": 0.01, "weight_decay_1d_mode": "always"}


# --------------------------------------------------------------------------------------------------
# Registry, facade, Trainer and TRL
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
def test_registered_and_resolved_through_the_facade(registered):
    registered("mars", MARS, ("MARS: Unleashing the Power of Variance Reduction for Training Large Models",
                              "2411.10438"))
    cls, kwargs = hfx.optimizer("mars", lr=1e-3, gamma=0.05)
    assert cls is MARS and kwargs == {"lr": 1e-3, "gamma": 0.05}


def test_plugins_toml_gives_mars_defaults(registry, tmp_path):
    import hfx.registry

    (tmp_path / "plugins.toml").write_text("[optim.mars]\ngamma = 0.05\nmars_type = \"lion\"\n")
    hfx.registry.reset()
    cls, kwargs = hfx.optimizer("mars", lr=1e-3, gamma=0.1)
    assert kwargs == {"lr": 1e-3, "gamma": 0.1, "mars_type": "lion"}  # explicit > plugins.toml
    assert cls(one_param(), **kwargs).param_groups[0]["mars_type"] == "lion"


@pytest.mark.floor
def test_sft_trainer_with_hfx_optimizer_mars(registry, sft_trainer, train_all, tmp_path):
    trainer = sft_trainer(tmp_path, hfx_optimizer="mars", learning_rate=1e-2, weight_decay=0.01,
                          hfx_optimizer_args='{"gamma": 0.05, "betas": [0.95, 0.99]}')
    opt = train_all(trainer)
    assert type(opt) is MARS
    assert trainer.state.global_step == 2
    decay, no_decay = opt.param_groups  # Trainer's split, kept
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert decay["gamma"] == 0.05 and decay["betas"] == (0.95, 0.99)
    assert decay["initial_lr"] == 1e-2  # lr comes from TrainingArguments
    norm = next(p for n, p in trainer.model.named_parameters() if "norm" in n)
    assert "prev_grad" not in opt.state[norm] and opt.state[norm]["step"] == 2  # 1-D: AdamW path


@pytest.mark.floor
def test_trainer_checkpoint_resume_and_optimizer_cls_and_kwargs(registry, sft_trainer, tmp_path):
    def make(max_steps):
        return sft_trainer(tmp_path, extend_config=False, extend_trainer=False, max_steps=max_steps,
                           save_strategy="steps", save_steps=2,
                           trainer_kwargs={"optimizer_cls_and_kwargs": hfx.optimizer("mars", lr=1e-2, mars_type="lion")})

    first = make(2)
    first.train()
    assert type(unwrap_optimizer(first.optimizer)) is MARS
    resumed = make(3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # torch.load(weights_only=True) inside
    opt = unwrap_optimizer(resumed.optimizer)
    weight = resumed.model.get_input_embeddings().weight
    assert opt.param_groups[0]["mars_type"] == "lion"
    assert opt.state[weight]["step"] == 3  # 2 restored + 1


# --------------------------------------------------------------------------------------------------
# Bad input names the fix
# --------------------------------------------------------------------------------------------------


def one_param():
    return [nn.Parameter(torch.ones(2, 2))]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mars_type": "muon"}, r"unknown mars_type 'muon': use one of 'adamw', 'lion', 'shampoo'"),
    ({"lr": -1e-3}, r"lr must be >= 0, got -0\.001; pass a positive learning rate"),
    ({"betas": (1.0, 0.99)}, r"betas\[0\] must be in \[0, 1\), got 1\.0; pass e\.g\. betas=\(0\.95, 0\.99\)"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\] must be in \[0, 1\)"),
    ({"betas": 0.9}, r"betas must be a pair of floats"),
    ({"betas_1d": (0.9, 1.5)}, r"betas_1d\[1\] must be in \[0, 1\)"),
    ({"eps": -1.0}, r"eps must be >= 0"),
    ({"weight_decay": float("nan")}, r"weight_decay must be >= 0"),
    ({"gamma": -0.1}, r"gamma must be >= 0.*gamma=0\.025"),
    ({"weight_decay_1d_mode": "hf"}, r"weight_decay_1d_mode must be 'group' .* or 'always'"),
    ({"lr": 0.0, "lr_1d": 1e-3}, r"lr_1d=0\.001 needs lr > 0 at construction.*lr_1d=None"),
    ({"ns_dtype": "int8"}, r"ns_dtype must be one of bfloat16"),
    ({"ns_steps": 0}, r"ns_steps must be a positive int"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MARS(one_param(), **kwargs)


def test_bad_param_group_is_rejected_and_not_added():
    opt = MARS(one_param())
    with pytest.raises(ValueError, match=r"unknown mars_type"):
        opt.add_param_group({"params": one_param(), "mars_type": "sgd"})
    assert len(opt.param_groups) == 1


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = MARS(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients.*nn\.Embedding\(\.\.\., sparse=False\)"):
        opt.step()
    assert not opt.state  # nothing was half-done


def test_prev_grads_misuse():
    params = one_param()
    with pytest.raises(ValueError, match=r"prev_grads is for exact MARS.*MARS\(\.\.\., is_approx=False\)"):
        MARS(params).step(prev_grads=[torch.zeros(2, 2)])
    with pytest.raises(ValueError, match=r"set_prev_grads is for exact MARS"):
        MARS(params).set_prev_grads()
    exact = MARS(params, is_approx=False)
    with pytest.raises(ValueError, match=r"has 2 entries but the optimizer has 1 parameters"):
        exact.step(prev_grads=[None, None])
    with pytest.raises(ValueError, match=r"shape \(2, 2\) has shape \(3,\)"):
        exact.step(prev_grads={params[0]: torch.zeros(3)})
    with pytest.raises(ValueError, match=r"not a parameter of this optimizer"):
        exact.step(prev_grads={nn.Parameter(torch.zeros(2, 2)): torch.zeros(2, 2)})


def test_step_returns_closure_loss_and_loss_decreases_on_quadratic():
    target = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    w = nn.Parameter(torch.zeros(6, 4))
    opt = MARS([w], lr=5e-2)

    def closure():
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(60)]
    assert losses[-1] < 0.1 * losses[0]


# --------------------------------------------------------------------------------------------------
# DTensor (FSDP2): adamw and lion step like unsharded tensors; shampoo refuses sharded matrices
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mars_type", ["adamw", "lion"])
def test_dtensor_parameters_step_like_plain_ones(cpu_mesh, mars_type):
    """One process, so the shard is the whole tensor: this pins that the DTensor path runs and computes the same step
    (the slow 2-process test in test_ddp.py checks that the norms are all-reduced across real shards)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    plain = [nn.Parameter(torch.linspace(-1, 1, 24).reshape(6, 4)), nn.Parameter(torch.linspace(0, 1, 5))]
    sharded = [nn.Parameter(distribute_tensor(p.detach().clone(), cpu_mesh, [Shard(0)])) for p in plain]
    runs = [MARS(ps, lr=0.1, mars_type=mars_type, weight_decay=0.1) for ps in (plain, sharded)]
    for t in range(3):
        for p, s in zip(plain, sharded):
            g = torch.cos(torch.arange(p.numel(), dtype=torch.float32) * (t + 1)).reshape(p.shape) * 3  # clip fires
            p.grad, s.grad = g, distribute_tensor(g, cpu_mesh, [Shard(0)])
        for opt in runs:
            opt.step()
    for p, s in zip(plain, sharded):
        torch.testing.assert_close(s.full_tensor(), p.detach(), rtol=1e-6, atol=1e-7)


def test_dtensor_shampoo_matrix_is_refused(cpu_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    w = nn.Parameter(distribute_tensor(torch.ones(6, 4), cpu_mesh, [Shard(0)]))
    opt = MARS([{"params": [w], "param_names": ["fc.weight"]}], mars_type="shampoo")
    w.grad = distribute_tensor(torch.ones(6, 4), cpu_mesh, [Shard(0)])
    with pytest.raises(ValueError, match=r"'fc\.weight'.*is a DTensor.*mars_type='adamw' or 'lion'"):
        opt.step()
    assert not opt.state


def test_fsdp1_flattened_parameter_is_refused():
    """FSDP1 marks its flat parameters (and, with use_orig_params=True, the 1-D views into them) ``_fsdp_flattened``:
    MARS would otherwise silently run AdamW on them (1-D) with per-slice norms."""
    w = nn.Parameter(torch.ones(12))
    w._fsdp_flattened = True  # what torch.distributed.fsdp's _set_fsdp_flattened sets
    opt = MARS([{"params": [w], "param_names": ["_fsdp_wrapped_module._flat_param"]}])
    w.grad = torch.ones(12)
    with pytest.raises(ValueError, match=r"'_fsdp_wrapped_module\._flat_param'.*flattened by FSDP1.*Use FSDP2"):
        opt.step()
    assert not opt.state
