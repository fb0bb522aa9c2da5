"""The multi-tensor AdamW kernel: Triton (interpreter on CPU) against its torch reference, and the reference against
torch.optim.AdamW and an independent float64 derivation of the formula."""

import math

import pytest
import torch

from hfx_kernels import adamw as K
from hfx_kernels._backend import CHUNK
from hfx_kernels.testing import TritonKernelConformance, triton_runnable_on_cpu


def force(backend, monkeypatch):
    """Run on ``backend`` with CPU tensors: Triton only where its interpreter is on."""
    if backend == "triton":
        ok, why = triton_runnable_on_cpu()
        if not ok:
            pytest.skip(why)
    monkeypatch.setenv("HFX_KERNELS", backend)


def make_lists(shape, dtype, device, *, state_dtype=None, others=((5,), (1, 3))):
    """One parameter of ``shape`` and two of other odd shapes, with gradients and (non-negative v) moments."""
    state_dtype = state_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    shapes = [shape, *others]
    p = [torch.randn(s, device=device).to(dtype) for s in shapes]
    g = [torch.randn(s, device=device).to(dtype) for s in shapes]
    m = [torch.randn(s, device=device).to(state_dtype) * 0.1 for s in shapes]
    v = [torch.rand(s, device=device).to(state_dtype) * 0.01 for s in shapes]
    return p, g, m, v


class _AdamWCase(TritonKernelConformance):
    modifies_inputs = True
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    tolerances = {torch.float64: (1e-12, 1e-12)}
    hyper = dict(step_sizes=[1e-2, 3e-3, 2e-2], eps=[1e-8, 1e-6, 1e-8], betas=(0.9, 0.999), decay=1 - 1e-2 * 0.1)

    def make_inputs(self, shape, dtype, device):
        return make_lists(shape, dtype, device)


class TestAdamWDecayBefore(_AdamWCase):
    def reference(self, p, g, m, v):
        K.adamw_step_reference(p, g, m, v, **self.hyper)
        return p, m, v

    def kernel(self, p, g, m, v):
        K.adamw_step_triton(p, g, m, v, **self.hyper)
        return p, m, v


class TestAdamWDecayAfterScaled(_AdamWCase):
    """Decay after the update, and a clip coefficient folded in as a device scalar."""

    def make_inputs(self, shape, dtype, device):
        return (*make_lists(shape, dtype, device), torch.tensor(0.37, device=device))

    def reference(self, p, g, m, v, s):
        K.adamw_step_reference(p, g, m, v, decay_mode="after", grad_scale=s, **self.hyper)
        return p, m, v

    def kernel(self, p, g, m, v, s):
        K.adamw_step_triton(p, g, m, v, decay_mode="after", grad_scale=s, **self.hyper)
        return p, m, v


class TestAdamDirection(_AdamWCase):
    """Without parameters the kernel writes the direction m / (sqrt(v) + eps)."""

    dtypes = (torch.float32, torch.float64)

    def reference(self, p, g, m, v):
        out = [torch.empty_like(x) for x in m]
        K.adamw_step_reference(None, g, m, v, out=out, **self.hyper)
        return out, m, v

    def kernel(self, p, g, m, v):
        out = [torch.empty_like(x) for x in m]
        K.adamw_step_triton(None, g, m, v, out=out, **self.hyper)
        return out, m, v


def float64_adamw(p, g, m, v, t, *, lr, betas, eps, wd, decay_mode="before", eps_mode="torch"):
    """The AdamW formula step by step in float64 (independent of the kernel's step_size/eps' rewriting)."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    upd = (m / bc1) / ((v / bc2).sqrt() + eps) if eps_mode == "torch" else (m / (v.sqrt() + eps)) * math.sqrt(bc2) / bc1
    decay = 1 - lr * wd
    p = p * decay - lr * upd if decay_mode == "before" else (p - lr * upd) * decay
    return p, m, v


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("decay_mode", ["before", "after"])
@pytest.mark.parametrize("eps_mode", ["torch", "hf"])
def test_adamw_step_matches_float64_formula_over_steps(backend, decay_mode, eps_mode, monkeypatch):
    force(backend, monkeypatch)
    torch.manual_seed(0)
    shapes = [(4, 7), (13,)]
    p = [torch.randn(s, dtype=torch.float64) for s in shapes]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    ref = [(x.clone(), torch.zeros_like(x), torch.zeros_like(x)) for x in p]
    kw = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8)
    for t in (1, 2, 3):
        g = [torch.randn(s, dtype=torch.float64) for s in shapes]
        K.adamw_step(p, g, m, v, steps=t, weight_decay=0.1, decay_mode=decay_mode, eps_mode=eps_mode, **kw)
        ref = [float64_adamw(r[0], gi, r[1], r[2], t, wd=0.1, decay_mode=decay_mode, eps_mode=eps_mode, **kw)
               for r, gi in zip(ref, g)]
    for got, (want, want_m, want_v), mm, vv in zip(p, ref, m, v):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mm, want_m, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(vv, want_v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adamw_step_equals_torch_adamw(backend, monkeypatch):
    """Three steps of torch.optim.AdamW (the anchor) and of the kernel, per-tensor steps included."""
    force(backend, monkeypatch)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(9, 5), (3,), (CHUNK + 5,)]]
    mine = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in mine]
    v = [torch.zeros_like(p) for p in mine]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    for t in (1, 2, 3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        K.adamw_step(mine, grads, m, v, steps=[t] * 3, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    for p, q in zip(params, mine):
        torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adam_direction_and_factor_give_the_adam_step(backend, monkeypatch):
    force(backend, monkeypatch)
    g = [torch.randn(6, 3, dtype=torch.float64)]
    m, v = [torch.zeros(6, 3, dtype=torch.float64)], [torch.zeros(6, 3, dtype=torch.float64)]
    (n,), (c,) = K.adam_direction(g, m, v, steps=1, betas=(0.9, 0.999), eps=1e-8, eps_mode="hf")
    want, _, _ = float64_adamw(torch.zeros(6, 3, dtype=torch.float64), g[0], torch.zeros(6, 3, dtype=torch.float64),
                               torch.zeros(6, 3, dtype=torch.float64), 1, lr=1.0, betas=(0.9, 0.999), eps=1e-8, wd=0,
                               eps_mode="hf")
    torch.testing.assert_close(-c * n, want, rtol=1e-12, atol=1e-14)


def test_per_tensor_steps_and_bad_input():
    p = [torch.zeros(3), torch.zeros(3)]
    g = [torch.ones(3), torch.ones(3)]
    m = [torch.zeros(3), torch.zeros(3)]
    v = [torch.zeros(3), torch.zeros(3)]
    with pytest.raises(ValueError, match="steps has 1 entries for 2"):
        K.adamw_step(p, g, m, v, steps=[1], lr=1.0, betas=(0.9, 0.999), eps=1e-8)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(4,\)"):
        K.adamw_step(p, [g[0], torch.ones(4)], m, v, steps=1, lr=1.0, betas=(0.9, 0.999), eps=1e-8)
    with pytest.raises(ValueError, match="decay_mode"):
        K.adamw_step(p, g, m, v, steps=1, lr=1.0, betas=(0.9, 0.999), eps=1e-8, decay_mode="sideways")
    with pytest.raises(ValueError, match="eps_mode"):
        K.adamw_step(p, g, m, v, steps=1, lr=1.0, betas=(0.9, 0.999), eps=1e-8, eps_mode="keras")
    # a tensor at step 1 moves by lr*sign(g) (bias-corrected), one at step 10 by less
    K.adamw_step(p, g, m, v, steps=[1, 10], lr=1.0, betas=(0.9, 0.999), eps=1e-12)
    torch.testing.assert_close(p[0], -torch.ones(3))
    assert (p[1].abs() < 1).all()


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("decay_mode", ["before", "after"])
@pytest.mark.parametrize("eps_mode", ["torch", "hf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_torch_path_fast_form_equals_the_reference(dtype, eps_mode, decay_mode, correct_bias, monkeypatch):
    """The torch path rewrites every step as torch.optim.AdamW's form (other lr, eps, weight decay) for torch's fused
    kernel, per group of equal steps; it must equal the plain reference in each eps/decay/bias convention."""
    monkeypatch.setenv("HFX_KERNELS", "torch")
    torch.manual_seed(0)
    a = make_lists((37, 3), dtype, "cpu", state_dtype=dtype)
    b = [[x.clone() for x in lst] for lst in a]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    conv = dict(eps_mode=eps_mode, correct_bias=correct_bias)
    K.adamw_step(*a, steps=[4, 1, 4], weight_decay=0.1, decay_mode=decay_mode, **conv, **kw)
    sizes, eps = K.step_scalars([4, 1, 4], lr=kw["lr"], betas=kw["betas"], eps=kw["eps"], **conv)
    K.adamw_step_reference(*b, step_sizes=sizes, eps=eps, betas=kw["betas"], decay=1 - kw["lr"] * 0.1,
                           decay_mode=decay_mode)
    rtol, atol = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12), torch.bfloat16: (1.6e-2, 1e-2)}[dtype]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def test_fused_forms_refuse_a_decay_they_cannot_express():
    """Decay after the update with lr * wd = 1 zeroes the parameter: no torch form; adamw_step then takes the
    reference and still zeroes it."""
    assert K.torch_fused_forms([1], [0.5], [1e-8], (0.9, 0.99), 0.0, "after") is None
    forms = K.torch_fused_forms([3, 1, 3], [0.1, 0.2, 0.1], [1e-8, 1e-8, 1e-8], (0.9, 0.99), 0.99, "before")
    assert [idx for idx, _ in forms] == [[0, 2], [1]]
    p, g, m, v = ([torch.ones(4)] for _ in range(4))
    K.adamw_step(p, g, m, v, steps=1, lr=1.0, betas=(0.9, 0.99), eps=1e-8, weight_decay=1.0, decay_mode="after")
    assert torch.equal(p[0], torch.zeros(4))


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("eps_mode", ["torch", "hf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_direction_torch_path_fused_form_equals_the_reference(dtype, eps_mode, correct_bias, monkeypatch):
    """The direction N from torch's fused kernel (a zeroed parameter, step size -1) equals the reference's."""
    monkeypatch.setenv("HFX_KERNELS", "torch")
    torch.manual_seed(0)
    _, g, m, v = make_lists((6, 5), dtype, "cpu", state_dtype=dtype)
    g2, m2, v2 = ([x.clone() for x in lst] for lst in (g, m, v))
    conv = dict(eps_mode=eps_mode, correct_bias=correct_bias)
    out, factors = K.adam_direction(g, m, v, steps=[2, 1, 9], betas=(0.9, 0.99), eps=1e-8, **conv)
    sizes, eps = K.step_scalars([2, 1, 9], lr=1.0, betas=(0.9, 0.99), eps=1e-8, **conv)
    want = [torch.empty_like(x) for x in m2]
    K.adamw_step_reference(None, g2, m2, v2, step_sizes=sizes, eps=eps, betas=(0.9, 0.99), out=want)
    assert factors == sizes
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for x, y in zip([*out, *m, *v], [*want, *m2, *v2]):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
