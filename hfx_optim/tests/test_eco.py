"""ECO: an independent float64 re-derivation of ECO-Adam and ECO-SGDM from the spec's update rules (§6.1) for 4 steps
(every format and scale mode, nearest and stochastic rounding, with the first step at lr = 0 as under HF's linear
warm-up), the exact error-feedback invariant (quantized weight + carried error = the master-weight SGDM trajectory),
the behaviours the spec reports (§6.2: slow start, ECO closer to master weights than naive rounding), the conformance
kit, checkpoints, the memory report, the factory and facade, an SFTTrainer run, and input errors.

The reference (`reference_run`) shares no code with hfx_optim or hfx_kernels: its quantizer cuts the scale groups by
hand and takes the FP8 grid from torch's float8 dtype, and it rebuilds the stochastic-rounding noise from the
documented seeding (SplitMix64 over (seed, parameter index), then (that, step)) and Triton's ``tl.rand`` (Philox4x32-10
on the element's flat index), in plain Python integers. The tests of the update rules run on both kernel paths
(``kernel_backend``: torch, and Triton's interpreter on a CPU-only machine), which must give the same results.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hfx
from hfx.testing import (
    OptimizerConformance,
    check_weights_only_roundtrip,
    params_changed,
    snapshot_params,
    tiny_model,
)
from hfx_optim.eco import ECO, ECOFactory, eco_memory_report
from hfx_optim.quantize import dequantize

QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0}
MASK = (1 << 64) - 1

# --------------------------------------------------------------------------------------------------
# Independent reference (spec §6.1), float64
# --------------------------------------------------------------------------------------------------


def w0(rows: int, cols: int) -> torch.Tensor:
    """Spec §11: W0[i,j] = 0.5 cos(0.9i - 0.4j + 0.3); a 1-D parameter uses j = 0."""
    i = torch.arange(rows, dtype=torch.float64)[:, None]
    j = torch.arange(cols, dtype=torch.float64)[None, :]
    return 0.5 * torch.cos(0.9 * i - 0.4 * j + 0.3)


def grad(rows: int, cols: int, t: int, amp: float = 1.0) -> torch.Tensor:
    """Spec §11: G_t[i,j] = amp (sin(0.7(i+1)(j+1) + 1.1t) + 0.3 cos(1.3i - 0.6jt))."""
    i = torch.arange(rows, dtype=torch.float64)[:, None]
    j = torch.arange(cols, dtype=torch.float64)[None, :]
    return amp * (torch.sin(0.7 * (i + 1) * (j + 1) + 1.1 * t) + 0.3 * torch.cos(1.3 * i - 0.6 * j * t))


def splitmix_fold(*values: int) -> int:
    h = 0
    for value in values:
        z = (h + 0x9E3779B97F4A7C15 + (value & MASK)) & MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        h = z ^ (z >> 31)
    return h


def tl_rand_word(key: int, counter: int) -> int:
    """The Philox4x32-10 word behind Triton's ``tl.rand(key, counter)`` (triton/language/random.py): counter
    (lo, hi, 0, 0), key (lo, hi) of the 64-bit seed; the first word of the result."""
    c0, c1, c2, c3 = counter & 0xFFFFFFFF, counter >> 32, 0, 0
    k0, k1 = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
    for _ in range(10):
        prod_b, prod_a = 0xCD9E8D57 * c2, 0xD2511F53 * c0
        c0, c1, c2, c3 = (prod_b >> 32) ^ c1 ^ k0, prod_b & 0xFFFFFFFF, (prod_a >> 32) ^ c3 ^ k1, prod_a & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0


def documented_noise(seed: int, index: int, step: int, shape) -> torch.Tensor:
    """u[i] = tl.rand(SplitMix64(SplitMix64(seed, index), step), i): the word read as an int32 x, folded to
    (x if x >= 0 else ~x), times 4.6566127342e-10 in float32."""
    key = splitmix_fold(splitmix_fold(seed, index), step)
    words = [tl_rand_word(key, i) for i in range(math.prod(shape))]
    folded = torch.tensor([w if w < 2**31 else 2**32 - 1 - w for w in words], dtype=torch.int64)
    u = folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    return u.to(torch.float64).reshape(shape)


def fp8_grid() -> torch.Tensor:
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return torch.unique(values[torch.isfinite(values)])


def ref_quantize(x: torch.Tensor, fmt: str, scale_mode: str, block_size: int, u: torch.Tensor | None) -> torch.Tensor:
    """Dequantized q(x): absmax scale per group, nearest (ties to even) or floor(code + u) stochastic rounding."""
    rows, cols = x.shape
    if scale_mode == "tensor":
        cuts = [(slice(None), slice(None))]
    elif scale_mode == "row":
        cuts = [(slice(r, r + 1), slice(None)) for r in range(rows)]
    else:
        cuts = [(slice(r, r + 1), slice(c, c + block_size)) for r in range(rows) for c in range(0, cols, block_size)]
    out = torch.empty_like(x)
    for rs, cs in cuts:
        xs = x[rs, cs]
        absmax = float(xs.abs().max())
        s = absmax / QMAX[fmt] if absmax > 0 else 1.0
        y = xs / s
        if fmt == "fp8_e4m3":
            grid = fp8_grid()
            if u is None:
                code = y.clamp(-448, 448).float().to(torch.float8_e4m3fn).double()
            else:
                hi_idx = torch.searchsorted(grid, y.contiguous()).clamp(max=len(grid) - 1)
                hi = grid[hi_idx]
                lo = torch.where(hi == y, hi, grid[(hi_idx - 1).clamp(min=0)])
                frac = torch.where(hi > lo, (y - lo) / (hi - lo), torch.zeros_like(y))
                code = torch.where(frac + u[rs, cs] >= 1, hi, lo)
        elif u is None:
            code = torch.round(y)
        else:
            code = torch.where(y - torch.floor(y) + u[rs, cs] >= 1, torch.floor(y) + 1, torch.floor(y))
        out[rs, cs] = code.clamp(-QMAX[fmt], QMAX[fmt]) * s
    return out


def reference_run(lrs, *, variant, fmt, scale_mode, block_size, sr, seed=0, betas=(0.9, 0.999), eps=1e-8, wd=0.0,
                  feedback="memory_free", shape=(4, 6)):
    """ECO on W (quantized, parameter index 0) and AdamW/SGDM on a bias b (index 1), with the spec's gradients.
    Returns one dict per step: W, its m (and v), and b."""
    b1, b2 = betas
    rows, cols = shape
    w = w0(rows, cols)
    b = w0(rows, 1)[:, 0]
    mw, vw = torch.zeros_like(w), torch.zeros_like(w)
    mb, vb = torch.zeros_like(b), torch.zeros_like(b)
    out = []
    for t, lr in enumerate(lrs, start=1):
        gw = grad(rows, cols, t)
        gb = grad(rows, 1, t)[:, 0]
        u = documented_noise(seed, 0, t, shape) if sr else None
        d = 1 - lr * wd
        if variant == "adam":
            m_tilde = b1 * mw + (1 - b1) * gw
            vw = b2 * vw + (1 - b2) * gw**2
            denom = torch.sqrt(vw / (1 - b2**t)) + eps
            th_tilde = d * w - lr * (m_tilde / (1 - b1**t)) / denom
            w = ref_quantize(th_tilde, fmt, scale_mode, block_size, u)
            e = th_tilde - w
            mw = m_tilde + d * ((1 - b1**t) / lr) * (1 - 1 / b1) * denom * e if feedback != "none" and lr > 0 else m_tilde
            mb = b1 * mb + (1 - b1) * gb
            vb = b2 * vb + (1 - b2) * gb**2
            b = b * d - lr * (mb / (1 - b1**t)) / (torch.sqrt(vb / (1 - b2**t)) + eps)
        else:
            m_tilde = b1 * mw + (1 - b1) * gw
            th_tilde = d * w - lr * m_tilde
            w = ref_quantize(th_tilde, fmt, scale_mode, block_size, u)
            e = th_tilde - w
            mw = m_tilde + d * (1 / lr) * (1 - 1 / b1) * e if feedback != "none" and lr > 0 else m_tilde
            mb = b1 * mb + (1 - b1) * gb
            b = d * b - lr * mb
        out.append({"w": w.clone(), "m": mw.clone(), "v": vw.clone(), "b": b.clone()})
    return out


def eco_pair(**options):
    """A 4x6 weight and a bias of 4 in two named groups, the bias on the non-quantized path."""
    w = nn.Parameter(w0(4, 6).clone())
    b = nn.Parameter(w0(4, 1)[:, 0].clone())
    opt = ECO([{"params": [("w", w)]}, {"params": [("b", b)], "quantize": False}], **options)
    return w, b, opt


def step_with(opt, params_grads, lr):
    for group in opt.param_groups:
        group["lr"] = lr
    for p, g in params_grads:
        p.grad = g.clone()
    opt.step()


def assert_close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


CASES = [(fmt, mode, bs) for fmt in ("int8", "int4", "fp8_e4m3") for mode, bs in (("tensor", 128), ("row", 128),
                                                                                   ("block", 4))]


@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize(("fmt", "scale_mode", "block_size"), CASES)
@pytest.mark.parametrize("variant", ["adam", "sgdm"])
def test_matches_float64_reference(variant, fmt, scale_mode, block_size, sr, kernel_backend):
    # step 1 at lr = 0 (linear warm-up), then a varying schedule; weight decay on, so Cesista's factor is exercised
    lrs = [0.0, 0.01, 0.02, 0.005] if variant == "adam" else [0.0, 0.2, 0.1, 0.3]
    options = dict(variant=variant, weight_format=fmt, scale_mode=scale_mode, block_size=block_size,
                   stochastic_rounding=sr, seed=5, weight_decay=0.1)
    ref = reference_run(lrs, variant=variant, fmt=fmt, scale_mode=scale_mode, block_size=block_size, sr=sr, seed=5,
                        wd=0.1)
    w, b, opt = eco_pair(**options)
    for t, lr in enumerate(lrs, start=1):
        step_with(opt, [(w, grad(4, 6, t)), (b, grad(4, 1, t)[:, 0])], lr)
        want = ref[t - 1]
        assert_close(w.detach(), want["w"], f"W after step {t}")
        assert_close(opt.state[w]["exp_avg"], want["m"], f"m after step {t}")
        assert_close(b.detach(), want["b"], f"b after step {t}")
        if variant == "adam":
            assert_close(opt.state[w]["exp_avg_sq"], want["v"], f"v after step {t}")
    assert opt.state[w]["step"] == 4 and "scale" not in opt.state[b]


@pytest.mark.parametrize("variant", ["adam", "sgdm"])
def test_naive_requantization_matches_reference(variant, kernel_backend):
    lrs = [0.01, 0.01, 0.01] if variant == "adam" else [0.2, 0.2, 0.2]
    ref = reference_run(lrs, variant=variant, fmt="int4", scale_mode="row", block_size=128, sr=False, feedback="none")
    w, b, opt = eco_pair(variant=variant, weight_format="int4", scale_mode="row", stochastic_rounding=False,
                         error_feedback="none")
    for t, lr in enumerate(lrs, start=1):
        step_with(opt, [(w, grad(4, 6, t)), (b, grad(4, 1, t)[:, 0])], lr)
    assert_close(w.detach(), ref[-1]["w"], "W")
    assert_close(opt.state[w]["exp_avg"], ref[-1]["m"], "m")


def test_float32_parameters_within_kernel_tolerance(kernel_backend):
    ref = reference_run([0.01, 0.01, 0.01], variant="adam", fmt="int8", scale_mode="row", block_size=128, sr=False)
    w = nn.Parameter(w0(4, 6).float())
    opt = ECO([w], lr=0.01, scale_mode="row", stochastic_rounding=False)
    for t in range(1, 4):
        w.grad = grad(4, 6, t).float()
        opt.step()
    # a grid step is 1/127 of the row absmax; float32 may flip a rounding only at an exact tie, which these inputs avoid
    torch.testing.assert_close(w.detach().double(), ref[-1]["w"], rtol=1e-6, atol=1e-7)
    assert opt.state[w]["exp_avg"].dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Error feedback: the exact invariant, and the behaviours the spec reports
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "sr", "wd"), [("int4", False, 0.0), ("int8", True, 0.1), ("fp8_e4m3", True, 0.05)])
def test_exact_error_feedback_reproduces_master_weight_sgdm(fmt, sr, wd, kernel_backend):
    """Spec §6.1: with the previous error kept, th + e equals the master-weight SGDM weight after every step (and
    m = M - (1 - lr*wd) e / (lr*beta)), whatever the quantizer."""
    lr, beta = 0.2, 0.9
    w = nn.Parameter(w0(4, 6).clone())
    opt = ECO([w], lr=lr, betas=(beta, 0.999), weight_decay=wd, variant="sgdm", weight_format=fmt, scale_mode="row",
              stochastic_rounding=sr, error_feedback="exact")
    master, momentum = w0(4, 6), torch.zeros(4, 6, dtype=torch.float64)
    for t in range(1, 7):
        g = grad(4, 6, t)
        momentum = beta * momentum + (1 - beta) * g
        master = (1 - lr * wd) * master - lr * momentum
        w.grad = g
        opt.step()
        e = opt.state[w]["error"]
        torch.testing.assert_close(w.detach() + e, master, rtol=0, atol=1e-13)
        torch.testing.assert_close(opt.state[w]["exp_avg"], momentum - (1 - lr * wd) * e / (lr * beta), rtol=1e-12,
                                   atol=1e-12)
        assert e.abs().max() > 0  # the weights really are quantized


def slow_start(feedback, steps=400):
    """SGDM on a constant gradient far below the grid (spec §6.2): one element pins the row scale at 2^-7."""
    w = nn.Parameter(torch.tensor([[127 / 128, 0.0]], dtype=torch.float64))
    opt = ECO([w], lr=2e-4, betas=(0.9, 0.999), variant="sgdm", scale_mode="row", stochastic_rounding=False,
              error_feedback=feedback)
    first = None
    for t in range(1, steps + 1):
        w.grad = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
        opt.step()
        if first is None and w[0, 1] != 0:
            first = t
    return first, float(w.detach()[0, 1])


def test_slow_start_exact_moves_with_master_memory_free_later_naive_never():
    # master weights: theta_t = lr * sum_k (1 - 0.9^k) crosses half a grid step (2^-8) at the first t below
    theta, momentum, master_first = 0.0, 0.0, None
    for t in range(1, 400):
        momentum = 0.9 * momentum + 0.1
        theta += 2e-4 * momentum
        if theta >= 2.0**-8:
            master_first = t
            break
    exact, memory_free, naive = slow_start("exact"), slow_start("memory_free"), slow_start("none")
    assert exact[0] == master_first
    assert exact[0] < memory_free[0] < 400
    assert naive == (None, 0.0)
    assert abs(exact[1] - 2e-4 * (400 - 9 * (1 - 0.9**400))) <= 2.0**-8  # exact tracks master within half a step


def test_eco_adam_stays_closer_to_master_weights_than_naive_rounding(kernel_backend):
    """Spec §6.2: over 100 steps ECO-Adam tracks the master-weight trajectory much better than re-quantizing."""
    lr, b1, b2, eps = 0.003, 0.9, 0.999, 1e-8
    master, m, v = w0(4, 6), torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64)
    runs = {}
    for feedback in ("memory_free", "none"):
        w = nn.Parameter(w0(4, 6).clone())
        runs[feedback] = (w, ECO([w], lr=lr, scale_mode="row", stochastic_rounding=False, error_feedback=feedback))
    for t in range(1, 101):
        g = grad(4, 6, t)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        master = master - lr * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        for w, opt in runs.values():
            w.grad = g.clone()
            opt.step()
    eco_err = float((runs["memory_free"][0].detach() - master).abs().max())
    naive_err = float((runs["none"][0].detach() - master).abs().max())
    assert eco_err < 0.3 * naive_err, (eco_err, naive_err)


# --------------------------------------------------------------------------------------------------
# lr = 0 (HF's linear warm-up starts there)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "feedback"), [("adam", "memory_free"), ("sgdm", "memory_free"),
                                                   ("sgdm", "exact")])
def test_lr_zero_step_is_guarded(variant, feedback, kernel_backend):
    w, b, opt = eco_pair(variant=variant, error_feedback=feedback, stochastic_rounding=False, scale_mode="row",
                         weight_decay=0.1)
    g1 = grad(4, 6, 1)
    step_with(opt, [(w, g1), (b, grad(4, 1, 1)[:, 0])], 0.0)
    state = opt.state[w]
    assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor))
    assert state["step"] == 1
    torch.testing.assert_close(state["exp_avg"], 0.1 * g1, rtol=1e-15, atol=0)  # m~ only: nothing injected
    torch.testing.assert_close(w.detach(), ref_quantize(w0(4, 6), "int8", "row", 128, None), rtol=1e-15, atol=0)
    torch.testing.assert_close(b.detach(), w0(4, 1)[:, 0], rtol=0, atol=0)  # the non-quantized path does not move
    if feedback == "exact":
        assert not state["error"].any()  # its pair term was not applied, so it is not carried either
    # a later lr = 0 step (a schedule decayed to 0): on-grid weights stay put, m just decays
    step_with(opt, [(w, grad(4, 6, 2)), (b, grad(4, 1, 2)[:, 0])], 0.01)
    before, m_before = w.detach().clone(), state["exp_avg"].clone()
    g3 = grad(4, 6, 3)
    step_with(opt, [(w, g3), (b, grad(4, 1, 3)[:, 0])], 0.0)
    assert torch.equal(w.detach(), before)
    torch.testing.assert_close(state["exp_avg"], 0.9 * m_before + 0.1 * g3, rtol=1e-14, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# Weights on the grid, dtypes, checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3"])
def test_parameters_hold_the_quantized_weights_exactly(dtype, fmt, kernel_backend):
    model = nn.Sequential(nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 4)).to(dtype)
    opt = ECO(model.parameters(), lr=1e-2, weight_format=fmt, block_size=16)
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    for _ in range(3):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    weights = opt.quantized_weights()
    assert set(weights) == {"param0", "param2"}  # the 2-D weights; the biases run AdamW
    for key, p in (("param0", model[0].weight), ("param2", model[2].weight)):
        qt = weights[key]
        assert torch.equal(dequantize(qt, dtype), p.detach())
        assert qt.data.dtype == {"int8": torch.int8, "int4": torch.uint8, "fp8_e4m3": torch.float8_e4m3fn}[fmt]
        state = opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == state["scale"].dtype == torch.float32
        assert tuple(state["scale"].shape) == (p.shape[0], math.ceil(p.shape[1] / 16))


def test_bfloat16_error_is_taken_against_the_weight_the_model_holds(kernel_backend):
    # the grid value codes*scale is rounded once more to bfloat16; the injected error must include that rounding
    lr, beta = 0.2, 0.9
    w = nn.Parameter(w0(4, 6).to(torch.bfloat16))
    start = w.detach().double().clone()
    opt = ECO([w], lr=lr, betas=(beta, 0.999), variant="sgdm", scale_mode="row", stochastic_rounding=False)
    g = grad(4, 6, 1)
    w.grad = g.to(torch.bfloat16)
    opt.step()
    m_tilde = (1 - beta) * w.grad.double()
    th_tilde = start - lr * m_tilde
    want = m_tilde + (1 / lr) * (1 - 1 / beta) * (th_tilde - w.detach().double())
    torch.testing.assert_close(opt.state[w]["exp_avg"].double(), want, rtol=1e-5, atol=1e-5)
    grid_value = ref_quantize(th_tilde, "int8", "row", 128, None)
    assert (grid_value - w.detach().double()).abs().max() > 1e-4  # bfloat16 really does round the grid value


def test_bfloat16_resume_keeps_float32_state_and_is_bit_identical():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2)).to(torch.bfloat16)

    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def run(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()

    model = make()
    opt = ECO(model.parameters(), lr=1e-2)
    run(model, opt, 3)
    saved = check_weights_only_roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = make()
    resumed.load_state_dict(saved["model"])
    resumed_opt = ECO(resumed.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(saved["opt"])
    state = resumed_opt.state[resumed[0].weight]
    assert state["exp_avg"].dtype == state["scale"].dtype == torch.float32  # torch would cast them to bfloat16
    assert state["sr_seed"] == opt.state[model[0].weight]["sr_seed"]
    run(model, opt, 2)
    run(resumed, resumed_opt, 2)
    assert not params_changed(snapshot_params(model), resumed)


def test_stochastic_rounding_depends_on_the_seed_only(kernel_backend):
    def final(seed):
        w, b, opt = eco_pair(seed=seed, weight_format="int4")
        for t in range(1, 4):
            step_with(opt, [(w, grad(4, 6, t)), (b, grad(4, 1, t)[:, 0])], 0.01)
        return w.detach().clone()

    torch.manual_seed(123)
    a = final(1)
    torch.manual_seed(456)  # the global RNG plays no part
    assert torch.equal(a, final(1))
    assert not torch.equal(a, final(2))


@pytest.mark.parametrize(("variant", "fmt", "scale_mode"), [("adam", "int4", "block"), ("sgdm", "fp8_e4m3", "row"),
                                                          ("adam", "int8", "tensor")])
def test_torch_and_triton_paths_give_the_same_runs(variant, fmt, scale_mode, monkeypatch):
    """HFX_KERNELS=torch and =triton on a bfloat16 model with stochastic rounding (the Philox noise is drawn in the
    kernel on one path, by its torch port on the other): weights, moments and scales are bit-identical. (No biases:
    their AdamW runs through hfx_kernels.adamw, whose paths agree to rounding only, and a bias off by one bfloat16 ulp
    changes the next gradients; test_matches_float64_reference covers that path on both backends.)"""
    from hfx_kernels.testing import triton_runnable_on_cpu

    ok, why = triton_runnable_on_cpu()
    if not ok:
        pytest.skip(why)
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def run(backend):
        monkeypatch.setenv("HFX_KERNELS", backend)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 12, bias=False), nn.Tanh(), nn.Linear(12, 3, bias=False)).to(torch.bfloat16)
        opt = ECO(model.parameters(), lr=1e-2, variant=variant, weight_format=fmt, scale_mode=scale_mode,
                  block_size=8, weight_decay=0.01, seed=3)
        for _ in range(3):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()
        return model, opt

    (m_torch, o_torch), (m_triton, o_triton) = run("torch"), run("triton")
    for p, q in zip(m_torch.parameters(), m_triton.parameters()):
        assert torch.equal(p, q)
        for key, value in o_torch.state[p].items():
            other = o_triton.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


# --------------------------------------------------------------------------------------------------
# Conformance kit
# --------------------------------------------------------------------------------------------------


class _ECOConformance(OptimizerConformance):
    options: dict = {}

    def make_optimizer(self, model):
        return ECOFactory()(model, **self.options)


class TestConformanceECOAdam(_ECOConformance):
    options = {"lr": 1e-2}


class TestConformanceECOSGDM(_ECOConformance):
    options = {"lr": 0.1, "variant": "sgdm"}


class TestConformanceECOAdamInt4RowNearest(_ECOConformance):
    options = {"lr": 1e-2, "weight_format": "int4", "scale_mode": "row", "stochastic_rounding": False,
               "weight_decay": 0.01}


class TestConformanceECOSGDMExactFP8(_ECOConformance):
    options = {"lr": 0.1, "variant": "sgdm", "weight_format": "fp8_e4m3", "error_feedback": "exact"}


# --------------------------------------------------------------------------------------------------
# Memory report
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "options"), [
    (torch.float32, {}),
    (torch.bfloat16, {"weight_format": "int4", "scale_mode": "row"}),
    (torch.bfloat16, {"variant": "sgdm", "block_size": 16}),
])
def test_memory_report_counts_the_real_tensors(dtype, options):
    model = tiny_model("qwen2").to(dtype)
    opt = ECOFactory()(model, lr=1e-3, **options)
    before = eco_memory_report(model, opt)
    assert before.projected
    model(torch.randint(0, 50, (2, 8))).logits.float().mean().backward()
    opt.step()
    report = eco_memory_report(model, opt)
    assert not report.projected and report.state_bytes == before.state_bytes  # projection = what was allocated

    # recount from the model's shapes
    n = sum(p.numel() for p in model.parameters())
    width = 2 if dtype == torch.bfloat16 else 4
    linears = [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and m is not model.get_output_embeddings()]
    n_q = sum(w.numel() for w in linears)
    mode, block = options.get("scale_mode", "block"), options.get("block_size", 128)
    n_scales = sum({"row": w.shape[0], "block": w.shape[0] * math.ceil(w.shape[1] / block)}[mode] for w in linears)
    moments = 1 if options.get("variant") == "sgdm" else 2
    code_bytes = 0.5 if options.get("weight_format") == "int4" else 1
    assert report.params == n and report.quantized_params == n_q
    assert report.weight_bytes == width * n
    assert report.state_bytes == 4 * moments * n + 4 * n_scales
    assert report.packed_weight_bytes == width * (n - n_q) + int(code_bytes * n_q)
    assert report.adamw_bytes == width * n + (4 * n if width == 2 else 0) + 8 * n
    assert report.eco_bytes < report.adamw_bytes or dtype == torch.float32  # an fp32 model has no master copy to save
    assert "AdamW + fp32 master" in str(report) and report.as_dict()["ratio"] == report.ratio


# --------------------------------------------------------------------------------------------------
# Factory, registry, facade, Trainer and TRL
# --------------------------------------------------------------------------------------------------


def test_factory_quantizes_targeted_linears_only():
    model = tiny_model("qwen2")
    opt = ECOFactory()(model, lr=1e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, bits=4)
    quantized = {n for g in opt.param_groups if g["hfx_target"] for n in g["param_names"]}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert quantized == linears
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_format"] == "int4"
        decays = {n: group["weight_decay"] for n in group["param_names"]}
        assert all((w == 0.0) == ("norm" in n or "bias" in n) for n, w in decays.items())


@pytest.mark.floor
def test_registered_and_resolved_through_the_facade(registered):
    from transformers import TrainingArguments

    registered("eco", ECO, ("ECO: Quantized Training without Full-Precision Master Weights", "2601.22101"),
               factory=ECOFactory)
    cls, kwargs = hfx.optimizer("eco", bits=8, variant="sgdm")
    assert cls is ECOFactory and kwargs == {"bits": 8, "variant": "sgdm"}
    args = TrainingArguments(output_dir="unused", learning_rate=3e-3, adam_beta1=0.8, adam_epsilon=1e-7,
                             weight_decay=0.05, report_to="none", use_cpu=True)
    _, kwargs = hfx.optimizer("eco", args=args)  # Trainer's betas/eps/weight decay are forwarded, not dropped
    assert kwargs == {"lr": 3e-3, "betas": (0.8, 0.999), "eps": 1e-7, "weight_decay": 0.05}
    import hfx_optim

    assert hfx_optim.eco_memory_report is eco_memory_report


@pytest.mark.floor
def test_sft_trainer_with_hfx_optimizer_eco_and_linear_warmup(registry, sft_trainer, train_all, tmp_path):
    from transformers import TrainerCallback

    lrs = []

    class RecordLR(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            lrs.append(optimizer.param_groups[0]["lr"])  # the lr the step just used (the scheduler steps after)

    trainer = sft_trainer(tmp_path, learning_rate=1e-2, weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=1,
                          hfx_optimizer="eco", hfx_optimizer_args='{"bits": 8}', trainer_kwargs={"callbacks": [RecordLR()]})
    opt = train_all(trainer)
    assert type(opt) is ECO and trainer.state.global_step == 2
    assert lrs == [0.0, 1e-2]  # step 1 ran at lr = 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    params = dict(trainer.model.named_parameters())
    weights = opt.quantized_weights()
    assert weights and all(torch.equal(dequantize(qt, params[n].dtype), params[n].detach()) for n, qt in weights.items())
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01, 0.0}


# --------------------------------------------------------------------------------------------------
# Bad input names the parameter and the fix
# --------------------------------------------------------------------------------------------------


def one_matrix():
    return [nn.Parameter(torch.ones(2, 2))]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": -1e-3}, r"lr must be a finite number >= 0, got -0\.001"),
    ({"betas": (0.0, 0.999)}, r"betas\[0\] must be in \(0, 1\) for ECO.*divides by beta1"),
    ({"betas": (0.9, 1.0)}, r"betas\[1\] must be in \[0, 1\)"),
    ({"betas": 0.9}, r"betas must be a pair of floats"),
    ({"weight_decay": float("nan")}, r"weight_decay must be a finite number >= 0"),
    ({"variant": "lion"}, r"unknown ECO variant 'lion': use 'adam' .* or 'sgdm'"),
    ({"weight_format": "int2"}, r"unknown weight format 'int2'"),
    ({"bits": 3}, r"bits must be 8 or 4"),
    ({"bits": 4, "weight_format": "fp8_e4m3"}, r"bits=4 contradicts weight_format='fp8_e4m3' \(8 bits\)"),
    ({"scale_mode": "column"}, r"unknown scale_mode 'column': use 'block'"),
    ({"block_size": 0}, r"block_size must be a positive int"),
    ({"stochastic_rounding": 1}, r"stochastic_rounding must be True or False"),
    ({"seed": -1}, r"seed must be an int in \[0, 2\*\*63\)"),
    ({"error_feedback": "full"}, r"unknown error_feedback 'full'"),
    ({"error_feedback": "exact"}, r"'exact' is defined for ECO-SGDM only.*variant='sgdm'"),
    ({"quantize": "yes"}, r"quantize must be None \(auto\), True or False"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ECO(one_matrix(), **kwargs)


def test_bits_and_weight_format_resolve_per_group():
    a, b, c = (nn.Parameter(torch.ones(2, 2)) for _ in range(3))
    opt = ECO([{"params": [a]}, {"params": [b], "bits": 4}, {"params": [c], "weight_format": "fp8"}], bits=8)
    assert [g["weight_format"] for g in opt.param_groups] == ["int8", "int4", "fp8_e4m3"]
    assert [g["bits"] for g in opt.param_groups] == [8, 4, 8]


def test_unquantizable_parameters_are_named_with_the_fix():
    model = nn.Sequential(nn.Linear(3, 2))
    named = [(f"0.{n}", p) for n, p in model[0].named_parameters()]
    with pytest.raises(ValueError, match=r"ECO cannot quantize parameter '0\.bias' \(shape \(2,\).*only 2-D weights"
                                         r".*quantize=False"):
        ECO([{"params": named, "quantize": True}])
    fp8 = nn.Parameter(torch.zeros(2, 2).to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match=r"parameter 'w8' .*dtype torch\.float8_e4m3fn.*load the model in bfloat16"):
        ECO([{"params": [("w8", fp8)]}])
    ECO([{"params": named}])  # auto: the 2-D weight is quantized, the bias runs AdamW
    opt = ECO(one_matrix())
    bad = nn.Parameter(torch.ones(2, 2, dtype=torch.int32), requires_grad=False)
    with pytest.raises(ValueError, match=r"ECO cannot quantize parameter #0 of its param group \(shape \(2, 2\), dtype torch\.int32\)"):
        opt.add_param_group({"params": [bad], "quantize": True})
    assert len(opt.param_groups) == 1  # the bad group was not added


def test_sparse_gradients_are_refused_before_any_state_changes():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = ECO(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients.*sparse=False"):
        opt.step()
    assert not opt.state


@pytest.mark.parametrize("variant", ["adam", "sgdm"])
def test_dtensor_row_shards_step_like_plain_tensors(cpu_mesh, variant):
    """FSDP2 (DTensor) parameters: quantized weights (row shards: local row/block scales, the whole tensor's SR
    noise on the local rows) and an unquantized group step bit for bit like plain tensors; the state is sharded
    like the parameter. One process here; the slow 2-process test in test_ddp.py splits the rows for real."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    def params():
        gen = torch.Generator().manual_seed(0)
        return [nn.Parameter(torch.randn(7, 300, generator=gen)), nn.Parameter(torch.randn(6, generator=gen))]

    plain, sharded = params(), [nn.Parameter(distribute_tensor(p.detach(), cpu_mesh, [Shard(0)])) for p in params()]
    runs = [ECO([{"params": [ps[0]]}, {"params": [ps[1]], "quantize": False}], lr=0.1, variant=variant,
                weight_format="int8", scale_mode="block", block_size=128) for ps in (plain, sharded)]
    for t in range(3):
        for p, s in zip(plain, sharded):
            g = torch.cos(torch.arange(p.numel(), dtype=torch.float32) * (t + 1)).reshape(p.shape)
            p.grad, s.grad = g, distribute_tensor(g, cpu_mesh, [Shard(0)])
        for opt in runs:
            opt.step()
    for p, s in zip(plain, sharded):
        torch.testing.assert_close(s.full_tensor(), p.detach(), rtol=0, atol=0)
    state = runs[1].state[sharded[0]]
    assert isinstance(state["scale"], DTensor) and state["scale"].placements == (Shard(0),)
    assert tuple(state["scale"].shape) == (7, 3) and isinstance(runs[1].state[sharded[1]]["exp_avg"], DTensor)


def test_dtensor_layouts_ecos_scales_cannot_take_are_refused(cpu_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    def sharded(dim):
        return nn.Parameter(distribute_tensor(torch.ones(4, 3), cpu_mesh, [Shard(dim)]))

    with pytest.raises(ValueError, match=r"fc\.weight.*row-sharded \(FSDP2\) and scale_mode='tensor'.*"
                                         r"scale_mode='row' or 'block'"):
        ECO([{"params": [("fc.weight", sharded(0))]}], lr=0.1, scale_mode="tensor")
    opt = ECO([{"params": [("fc.weight", nn.Parameter(torch.ones(4, 3)))]}], lr=0.1)
    w = sharded(1)
    opt.param_groups[0]["params"][0] = w  # FSDP2 swaps DTensors in after construction
    w.grad = distribute_tensor(torch.ones(4, 3), cpu_mesh, [Shard(1)])
    with pytest.raises(RuntimeError, match=r"fc\.weight.*placements \(Shard\(dim=1\),\).*takes row shards"):
        opt.step()
    assert not opt.state
