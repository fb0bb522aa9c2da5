"""The multi-tensor MARS kernel (two passes: per-chunk partial sums of ||c||², then the update): Triton (interpreter on
CPU) against its torch reference, and both against an independent float64 derivation of MARS-AdamW/Lion over steps,
the Frobenius clip firing and not, a tensor spanning several chunks, determinism and input errors."""

import math

import pytest
import torch

from hfx_kernels import mars as K
from hfx_kernels._backend import CHUNK
from hfx_kernels.adamw import adam_scalars
from hfx_kernels.testing import TritonKernelConformance, kernel_device

pytestmark = pytest.mark.usefixtures("on_kernel_device")


def make_lists(shape, dtype, device, *, others=((5,), (1, 3)), scales=(1.0, 0.05, 3.0)):
    """One parameter of ``shape`` and two of other odd shapes, with gradients, previous gradients and (non-negative
    v) moments. The gradient scales make the clip fire on some tensors and not on others."""
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [shape, *others]
    p = [torch.randn(s, device=device).to(dtype) for s in shapes]
    g = [(torch.randn(s, device=device) * a).to(dtype) for s, a in zip(shapes, scales)]
    gp = [(torch.randn(s, device=device) * a).to(dtype) for s, a in zip(shapes, scales)]
    m = [torch.randn(s, device=device).to(state_dtype) * 0.1 for s in shapes]
    v = [torch.rand(s, device=device).to(state_dtype) * 0.01 for s in shapes]
    return p, g, gp, m, v


class _MARSCase(TritonKernelConformance):
    modifies_inputs = True
    shapes = (*TritonKernelConformance.shapes, (CHUNK + 5,))  # several chunks: the norm sums chunk partials
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    tolerances = {torch.float64: (1e-12, 1e-12)}
    hyper = dict(k=0.475, betas=(0.9, 0.999), step_sizes=[1e-2, 3e-3, 2e-2], eps=[1e-8, 1e-6, 1e-8],
                 decay=1 - 1e-2 * 0.1)

    def make_inputs(self, shape, dtype, device):
        return make_lists(shape, dtype, device)


class TestMARSAdamW(_MARSCase):
    def reference(self, p, g, gp, m, v):
        K.mars_step_reference(p, g, gp, m, v, **self.hyper)
        return p, m, v, gp

    def kernel(self, p, g, gp, m, v):
        K.mars_step_triton(p, g, gp, m, v, **self.hyper)
        return p, m, v, gp


class TestMARSLionNoStore(_MARSCase):
    """Lion (no second moment) and ``store_grads=False`` (exact MARS: g_prev is left as it is)."""

    dtypes = (torch.float32, torch.bfloat16, torch.float64)

    def reference(self, p, g, gp, m, v):
        K.mars_step_reference(p, g, gp, m, None, update="lion", store_grads=False, **self.hyper)
        return p, m, gp

    def kernel(self, p, g, gp, m, v):
        K.mars_step_triton(p, g, gp, m, None, update="lion", store_grads=False, **self.hyper)
        return p, m, gp


# --------------------------------------------------------------------------------------------------
# An independent float64 derivation (official MARS form), both backends
# --------------------------------------------------------------------------------------------------


def float64_mars(p, g, g_prev, m, v, t, *, lr, betas, gamma, eps, wd, lion=False):
    """One MARS step written from the spec (§2.1): returns the new (p, m, v) and ||c|| before the clip."""
    b1, b2 = betas
    c = g + gamma * b1 / (1 - b1) * (g - g_prev)
    norm = math.sqrt(float((c * c).sum()))
    if norm > 1:
        c = c / norm
    m = b1 * m + (1 - b1) * c
    if lion:
        return p - lr * (wd * p + torch.sign(m)), m, v, norm
    v = b2 * v + (1 - b2) * c * c
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    return p - lr * wd * p - lr * (m / bc1) / ((v / bc2).sqrt() + eps), m, v, norm


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lion", [False, True], ids=["adamw", "lion"])
def test_mars_matches_float64_formula_over_steps(backend, lion, monkeypatch):
    monkeypatch.setenv("HFX_KERNELS", backend)
    torch.manual_seed(0)
    shapes, scales = [(4, 7), (13,), (CHUNK + 5,)], [0.01, 1.0, 1.0]  # clip off, on, on across chunks
    p = [torch.randn(s, dtype=torch.float64) for s in shapes]
    gp = [torch.zeros_like(x) for x in p]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    ref = [(x.clone(), torch.zeros_like(x), torch.zeros_like(x)) for x in p]
    last = [torch.zeros_like(x) for x in p]
    kw = dict(lr=3e-2, betas=(0.9, 0.99), gamma=0.05)
    norms = []
    for t in (1, 2, 3):
        g = [torch.randn(s, dtype=torch.float64) * a for s, a in zip(shapes, scales)]
        if lion:
            K.mars_lion_step(p, g, gp, m, weight_decay=0.1, **kw)
        else:
            K.mars_adamw_step(p, g, gp, m, v, steps=t, eps=1e-8, weight_decay=0.1, **kw)
        out = [float64_mars(r[0], gi, li, r[1], r[2], t, eps=1e-8, wd=0.1, lion=lion, **kw)
               for r, gi, li in zip(ref, g, last)]
        ref = [o[:3] for o in out]
        norms.append([o[3] for o in out])
        last = g
        for got, want in zip(gp, g):  # store_grads: g_prev is now this step's gradient
            assert torch.equal(got, want)
    assert all(n[0] < 1 for n in norms) and all(n[1] > 1 and n[2] > 1 for n in norms)
    for got, (want, want_m, want_v), mm, vv in zip(p, ref, m, v):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mm, want_m, rtol=1e-10, atol=1e-12)
        if not lion:
            torch.testing.assert_close(vv, want_v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_clip_fires_only_above_one(backend, monkeypatch):
    """From m = v = 0 and g_prev = 0, m = (1 - beta1) * c / max(1, ||c||) with c = (1 + k) g: the clip divides a
    tensor with ||c|| > 1 by its norm and leaves one with ||c|| <= 1 alone."""
    monkeypatch.setenv("HFX_KERNELS", backend)
    small = torch.full((3, 2), 0.1, dtype=torch.float64)  # ||c|| = 1.475 * 0.1 * sqrt(6) ~ 0.36
    large = torch.full((CHUNK + 5,), 0.1, dtype=torch.float64)  # ||c|| > 5, summed over two chunks
    g = [small, large]
    p = [torch.zeros_like(x) for x in g]
    gp, m, v = ([torch.zeros_like(x) for x in g] for _ in range(3))
    K.mars_adamw_step(p, g, gp, m, v, steps=1, lr=1e-3, betas=(0.95, 0.99), gamma=0.025, eps=1e-8)
    k = 0.025 * 0.95 / 0.05
    c = [(1 + k) * x for x in g]
    norm = math.sqrt(float((c[1] ** 2).sum()))
    assert norm > 5
    torch.testing.assert_close(m[0], 0.05 * c[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(m[1], 0.05 * c[1] / norm, rtol=1e-12, atol=0)
    torch.testing.assert_close(v[1], 0.01 * (c[1] / norm) ** 2, rtol=1e-12, atol=0)


def test_triton_is_deterministic_and_independent_of_batching(monkeypatch):
    """Pass 1 writes one partial per chunk and pass 2 sums them in a fixed order: two runs are bit-identical, and a
    tensor gets the same result alone or batched with others (its partials are its own)."""
    monkeypatch.setenv("HFX_KERNELS", "triton")
    from hfx_kernels.testing import triton_runnable

    ok, why = triton_runnable()
    if not ok:
        pytest.skip(why)
    inputs = make_lists((2 * CHUNK + 3,), torch.float32, kernel_device(), others=((7,),), scales=(1.0, 1.0))
    runs = []
    for tensors in (inputs, inputs, [x[:1] for x in inputs]):
        p, g, gp, m, v = ([x.clone() for x in lst] for lst in tensors)
        K.mars_adamw_step(p, g, gp, m, v, steps=[2] * len(p), lr=1e-2, betas=(0.9, 0.99), gamma=0.025, eps=1e-8,
                          weight_decay=0.1)
        runs.append((p[0], m[0], v[0]))
    for again in runs[1:]:
        for a, b in zip(runs[0], again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_dtypes_and_empty_tensors(backend, monkeypatch):
    """One call over fp32 and bf16 parameters (one launch each), a bf16 g_prev for an fp32 gradient and an empty
    tensor: each tensor as if stepped alone by the reference."""
    monkeypatch.setenv("HFX_KERNELS", backend)
    torch.manual_seed(1)
    p = [torch.randn(9), torch.randn(4, 3).bfloat16(), torch.randn(0)]
    g = [torch.randn(9), torch.randn(4, 3).bfloat16(), torch.randn(0)]
    gp = [torch.randn(9).bfloat16(), torch.randn(4, 3).bfloat16(), torch.randn(0)]
    m = [torch.zeros(9), torch.zeros(4, 3).bfloat16(), torch.zeros(0)]
    v = [torch.zeros(9), torch.zeros(4, 3).bfloat16(), torch.zeros(0)]
    want = [[x.clone() for x in lst] for lst in (p, g, gp, m, v)]
    K.mars_adamw_step(p, g, gp, m, v, steps=1, lr=1e-2, betas=(0.9, 0.99), gamma=0.025, eps=1e-8)
    step_size, eps = adam_scalars(1, lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for i in range(3):  # the reference, one tensor at a time
        K.mars_step_reference(*[[lst[i]] for lst in want], k=K.mars_k(0.025, 0.9), betas=(0.9, 0.99),
                              step_sizes=[step_size], eps=[eps])
    for got, exp in zip((p, m, v, gp), (want[0], want[3], want[4], want[2])):
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b)  # dtype-dependent tolerances: bf16 may differ by one rounding
    # g stored in g_prev's dtype (Triton's CPU interpreter truncates fp32 -> bf16 where torch and CUDA round)
    torch.testing.assert_close(gp[0], g[0].bfloat16(), rtol=0 if backend == "torch" else 8e-3, atol=0)


def test_bad_input():
    p = [torch.zeros(3), torch.zeros(3)]
    g = [torch.ones(3), torch.ones(3)]
    gp = [torch.zeros(3), torch.zeros(3)]
    m = [torch.zeros(3), torch.zeros(3)]
    v = [torch.zeros(3), torch.zeros(3)]
    kw = dict(lr=1.0, betas=(0.9, 0.999), gamma=0.025)
    with pytest.raises(ValueError, match="steps has 1 entries for 2"):
        K.mars_adamw_step(p, g, gp, m, v, steps=[1], eps=1e-8, **kw)
    with pytest.raises(ValueError, match=r"mars_step: prev_grads\[1\] has shape \(4,\)"):
        K.mars_adamw_step(p, g, [gp[0], torch.zeros(4)], m, v, steps=1, eps=1e-8, **kw)
    with pytest.raises(ValueError, match="mars_step: exp_avgs has 1 tensors for 2 params"):
        K.mars_lion_step(p, g, gp, m[:1], **kw)


def test_bad_input_triton(monkeypatch):
    monkeypatch.setenv("HFX_KERNELS", "triton")
    from hfx_kernels.testing import triton_runnable

    ok, why = triton_runnable()
    if not ok:
        pytest.skip(why)
    p, g, gp, m = [torch.zeros(3)], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)]
    with pytest.raises(ValueError, match="exp_avgs and exp_avg_sqs must share a dtype"):
        K.mars_adamw_step(p, g, gp, m, [torch.zeros(3, dtype=torch.float64)], steps=1, lr=1.0, betas=(0.9, 0.999),
                          gamma=0.025, eps=1e-8)
    with pytest.raises(ValueError, match=r"prev_grads\[0\] .* is not contiguous"):
        K.mars_lion_step(p, g, [torch.zeros(3, 2)[:, 0]], m, lr=1.0, betas=(0.9, 0.999), gamma=0.025)


@pytest.mark.parametrize("store_grads", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_path_multi_tensor_form_equals_the_reference(dtype, store_grads, monkeypatch):
    """The torch path's foreach + fused-AdamW form (float32: the clip as the kernel's gradient divisor) equals the
    plain per-tensor reference, clip firing or not, keeping the last gradient or not."""
    monkeypatch.setenv("HFX_KERNELS", "torch")
    torch.manual_seed(0)
    shapes = [(17, 5), (3,), (40,)]
    scales = [10.0, 0.01, 1.0]  # the first tensor's c is clipped, the second's is not

    def lists():
        torch.manual_seed(1)
        p = [torch.randn(s, dtype=dtype) for s in shapes]
        g = [torch.randn(s, dtype=dtype) * k for s, k in zip(shapes, scales)]
        gp = [torch.randn(s, dtype=dtype) * k for s, k in zip(shapes, scales)]
        m = [torch.randn(s, dtype=dtype) * 0.1 for s in shapes]
        return p, g, gp, m, [torch.rand(s, dtype=dtype) for s in shapes]

    a, b = lists(), lists()
    kw = dict(lr=1e-2, betas=(0.95, 0.99), gamma=0.025, eps=1e-8, weight_decay=0.1)
    K.mars_adamw_step(*a, steps=[3, 1, 5], store_grads=store_grads, **kw)
    pairs = [adam_scalars(t, lr=kw["lr"], betas=kw["betas"], eps=kw["eps"]) for t in (3, 1, 5)]
    K.mars_step_reference(*b, k=K.mars_k(0.025, 0.95), betas=kw["betas"], step_sizes=[x for x, _ in pairs],
                          eps=[e for _, e in pairs], decay=1 - kw["lr"] * 0.1, store_grads=store_grads)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for x, y in zip(a, b):
        for xi, yi in zip(x, y):
            torch.testing.assert_close(xi, yi, rtol=tol, atol=tol)
