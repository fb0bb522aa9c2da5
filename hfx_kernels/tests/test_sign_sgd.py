"""The multi-tensor state-free step (FRUGAL's signSGD / SGD part): Triton (interpreter on CPU) against its torch
reference, both against an independent float64 derivation over steps, the decay placement (unscaled lr) and input
errors."""

import pytest
import torch

from hfx_kernels import sign_sgd as K
from hfx_kernels._backend import CHUNK
from hfx_kernels.testing import TritonKernelConformance

pytestmark = pytest.mark.usefixtures("on_kernel_device")


def make_lists(shape, dtype, device, *, others=((5,), (1, 3))):
    """One parameter of ``shape`` and two of other odd shapes, with gradients that have exact zeros (sign(0) = 0)."""
    shapes = [shape, *others]
    p = [torch.randn(s, device=device).to(dtype) for s in shapes]
    g = [torch.randn(s, device=device).to(dtype) for s in shapes]
    for x in g:
        x.view(-1)[::3] = 0
    return p, g


class _SignSGDCase(TritonKernelConformance):
    modifies_inputs = True
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    tolerances = {torch.float64: (1e-12, 1e-12)}
    hyper = dict(step=1e-2 * 0.8 * 0.5, decay=1 - 1e-2 * 0.1)

    def make_inputs(self, shape, dtype, device):
        return make_lists(shape, dtype, device)


class TestSignSGD(_SignSGDCase):
    def reference(self, p, g):
        K.sign_sgd_reference(p, g, **self.hyper)
        return p

    def kernel(self, p, g):
        K.sign_sgd_triton(p, g, **self.hyper)
        return p


class TestSGD(_SignSGDCase):
    dtypes = (torch.float32, torch.bfloat16, torch.float64)

    def reference(self, p, g):
        K.sign_sgd_reference(p, g, sign=False, **self.hyper)
        return p

    def kernel(self, p, g):
        K.sign_sgd_triton(p, g, sign=False, **self.hyper)
        return p


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rule", ["sign_sgd", "sgd"])
def test_matches_float64_formula_over_steps(backend, rule, monkeypatch):
    """FRUGAL's state-free rule: W = W * (1 - lr * wd) - lr * s * f(G), the decay with the unscaled lr."""
    monkeypatch.setenv("HFX_KERNELS", backend)
    torch.manual_seed(0)
    shapes = [(4, 7), (13,), (CHUNK + 5,)]
    p = [torch.randn(s, dtype=torch.float64) for s in shapes]
    want = [x.clone() for x in p]
    lr, wd, scale = 3e-2, 0.1, 0.4
    for _ in range(3):
        g = [torch.randn(s, dtype=torch.float64) for s in shapes]
        g[0][1] = 0.0  # a row of zeros: sign(0) = 0, so only the decay moves it
        K.sign_sgd_step(p, g, lr=lr, weight_decay=wd, lr_scale=scale, rule=rule)
        f = [torch.sign(x) if rule == "sign_sgd" else x for x in g]
        want = [w - lr * wd * w - lr * scale * fx for w, fx in zip(want, f)]
    for got, exp in zip(p, want):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_gradient_only_decays_and_lr_scale_leaves_the_decay_alone(backend, monkeypatch):
    monkeypatch.setenv("HFX_KERNELS", backend)
    p = [torch.full((5,), 2.0, dtype=torch.float64), torch.full((2, 3), -1.0)]
    g = [torch.zeros(5, dtype=torch.float64), torch.zeros(2, 3)]
    K.sign_sgd_step(p, g, lr=0.1, weight_decay=0.5, lr_scale=0.01)
    assert torch.equal(p[0], torch.full((5,), 2.0 * (1 - 0.1 * 0.5), dtype=torch.float64))
    assert torch.equal(p[1], torch.full((2, 3), -1.0 * (1 - 0.1 * 0.5)))
    K.sign_sgd_step(p, [torch.ones(5, dtype=torch.float64), -torch.ones(2, 3)], lr=0.1, lr_scale=0.01)
    torch.testing.assert_close(p[0], torch.full((5,), 1.9 - 0.001, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(p[1], torch.full((2, 3), -0.95 + 0.001), rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_dtypes_and_empty_tensors(backend, monkeypatch):
    monkeypatch.setenv("HFX_KERNELS", backend)
    torch.manual_seed(1)
    p = [torch.randn(9), torch.randn(4, 3).bfloat16(), torch.randn(0), torch.randn(6, dtype=torch.float64)]
    g = [torch.randn(9).bfloat16(), torch.randn(4, 3).bfloat16(), torch.randn(0), torch.randn(6, dtype=torch.float64)]
    want = [x.clone() for x in p]
    K.sign_sgd_step(p, g, lr=1e-2, weight_decay=0.1)
    for w, gi in zip(want, g):
        K.sign_sgd_reference([w], [gi], step=1e-2, decay=1 - 1e-3)
    for a, b in zip(p, want):
        torch.testing.assert_close(a, b)


def test_bad_input():
    p, g = [torch.zeros(3), torch.zeros(3)], [torch.ones(3), torch.ones(3)]
    with pytest.raises(ValueError, match="unknown rule 'adam'"):
        K.sign_sgd_step(p, g, lr=1.0, rule="adam")
    with pytest.raises(ValueError, match=r"sign_sgd_step: grads\[1\] has shape \(4,\)"):
        K.sign_sgd_step(p, [g[0], torch.ones(4)], lr=1.0)
    with pytest.raises(ValueError, match="sign_sgd_step: grads has 1 tensors for 2 params"):
        K.sign_sgd_step(p, g[:1], lr=1.0)
