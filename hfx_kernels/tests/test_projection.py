"""The projection-epilogue kernel (GEMM A @ B with W's update in its epilogue): Triton (interpreter on CPU) against its
torch reference over odd m, n, r and W dtypes, both decay modes, with and without the extra term (and its per-row or
per-column scale); both backends
against an independent float64 derivation of the formula; mixed operand dtypes; input errors."""

import math

import pytest
import torch

from hfx_kernels import projection as K
from hfx_kernels.testing import TritonKernelConformance, kernel_device

# (m, n, r): r below, at and above the 16-wide K tile (padded with masked loads); m, n not multiples of the 64-wide
# tiles; several tiles in both directions; empty matrices and r = 0
SHAPES = ((1, 1, 1), (7, 5, 3), (33, 65, 16), (65, 33, 17), (130, 67, 5), (0, 5, 2), (6, 4, 0))


class _ProjectionCase(TritonKernelConformance):
    shapes = SHAPES
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    modifies_inputs = True
    tolerances = {torch.float64: (1e-12, 1e-12)}
    decay_mode = "before"
    with_extra = False
    scale = None  # "row" (m×1) or "column" (1×n): the extra term's scale
    hyper = dict(alpha=0.3, beta=-0.7, decay=0.9)

    def make_inputs(self, shape, dtype, device):
        m, n, r = shape
        operand = torch.float64 if dtype == torch.float64 else torch.float32
        w = torch.randn(m, n, device=device).to(dtype)
        a = torch.randn(m, r, device=device, dtype=operand)
        b = torch.randn(r, n, device=device, dtype=operand)
        e = torch.randn(m, n, device=device, dtype=operand) if self.with_extra else None
        s = None if self.scale is None else torch.rand((m, 1) if self.scale == "row" else (1, n), device=device,
                                                        dtype=operand) * 3
        return w, a, b, e, s

    def reference(self, w, a, b, e, s):
        K.projection_update_reference(w, a, b, extra=e, extra_scale=s, decay_mode=self.decay_mode, **self.hyper)
        return w

    def kernel(self, w, a, b, e, s):
        K.projection_update_triton(w, a, b, extra=e, extra_scale=s, decay_mode=self.decay_mode, **self.hyper)
        return w


class TestDecayBefore(_ProjectionCase):
    pass


class TestDecayAfter(_ProjectionCase):
    decay_mode = "after"


class TestDecayBeforeWithExtra(_ProjectionCase):
    with_extra = True


class TestDecayAfterWithExtra(_ProjectionCase):
    """Fira's form: the scaled residual as the extra term, decay after the update."""

    decay_mode = "after"
    with_extra = True


class TestDecayAfterWithColumnScaledExtra(_ProjectionCase):
    """Fira's left projection: ``phi * G`` with one phi per column, G passed unscaled."""

    decay_mode = "after"
    with_extra = True
    scale = "column"


class TestDecayBeforeWithRowScaledExtra(_ProjectionCase):
    with_extra = True
    scale = "row"


def float64_formula(w, a, b, e, *, alpha, beta, decay, decay_mode, s=None):
    """The update element by element with exactly rounded sums (math.fsum), independent of torch's matmul."""
    m, n = w.shape
    r = a.shape[1]
    out = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            u = alpha * math.fsum(float(a[i, k]) * float(b[k, j]) for k in range(r))
            if e is not None:
                u += beta * float(e[i, j]) * (1.0 if s is None else float(s[i if s.shape[0] > 1 else 0,
                                                                              j if s.shape[1] > 1 else 0]))
            x = float(w[i, j])
            out[i, j] = x * decay - u if decay_mode == "before" else (x - u) * decay
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("decay_mode", ["before", "after"])
@pytest.mark.parametrize(("with_extra", "scale"), [(False, None), (True, None), (True, "row"), (True, "column")])
def test_matches_float64_formula(backend, decay_mode, with_extra, scale, monkeypatch):
    monkeypatch.setenv("HFX_KERNELS", backend)
    if backend == "triton":
        from hfx_kernels.testing import triton_runnable

        ok, why = triton_runnable()
        if not ok:
            pytest.skip(why)
    torch.manual_seed(0)
    m, n, r = 9, 70, 19  # two column tiles, two K tiles (the second one padded)
    dev = kernel_device()
    w = torch.randn(m, n, dtype=torch.float64, device=dev)
    a = torch.randn(m, r, dtype=torch.float64, device=dev)
    b = torch.randn(r, n, dtype=torch.float64, device=dev)
    e = torch.randn(m, n, dtype=torch.float64, device=dev) if with_extra else None
    s = None if scale is None else torch.randn((m, 1) if scale == "row" else (1, n), dtype=torch.float64, device=dev)
    hyper = dict(alpha=0.0123, beta=0.4, decay=1 - 1e-2 * 0.1, decay_mode=decay_mode)
    want = float64_formula(w.cpu(), a.cpu(), b.cpu(), None if e is None else e.cpu(), s=None if s is None else s.cpu(),
                           **hyper)
    K.projection_update(w, a, b, extra=e, extra_scale=s, **hyper)
    torch.testing.assert_close(w.cpu(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_operand_dtypes(backend, monkeypatch):
    """bf16 bases (GaLore's bases take the parameter's dtype) with an fp32 direction update a bf16 W in fp32;
    a float64 operand makes the arithmetic float64, also for a float32 W."""
    monkeypatch.setenv("HFX_KERNELS", backend)
    if backend == "triton":
        from hfx_kernels.testing import triton_runnable

        ok, why = triton_runnable()
        if not ok:
            pytest.skip(why)
    torch.manual_seed(0)
    dev = kernel_device()
    w = torch.randn(20, 18, device=dev).to(torch.bfloat16)
    p = torch.randn(20, 3, device=dev).to(torch.bfloat16)
    n = torch.randn(3, 18, device=dev)
    want = (w.float() * 0.99 - 0.5 * (p.float() @ n)).to(torch.bfloat16)
    K.projection_update(w, p, n, alpha=0.5, decay=0.99)
    torch.testing.assert_close(w, want, rtol=1.6e-2, atol=1e-2)

    # (1e8 + 1) - 1e8 is 1 in float64 and 0 once the operands are rounded to float32
    w32 = torch.zeros(3, 20, device=dev)
    a64 = torch.tensor([[1e8 + 1, -1e8]] * 3, dtype=torch.float64, device=dev)
    K.projection_update(w32, a64, torch.ones(2, 20, dtype=torch.float64, device=dev))
    assert w32.dtype == torch.float32 and torch.equal(w32, torch.full_like(w32, -1.0))


def test_transposed_operands_need_no_copy(monkeypatch):
    """Strided operands are read through their strides: a transposed view gives the product of the transpose."""
    from hfx_kernels.testing import triton_runnable

    ok, why = triton_runnable()
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv("HFX_KERNELS", "triton")
    torch.manual_seed(0)
    dev = kernel_device()
    w, at, bt = torch.randn(70, 9, device=dev), torch.randn(4, 70, device=dev), torch.randn(9, 4, device=dev)
    want = w - at.T @ bt.T
    column_major = w.T.contiguous().T
    K.projection_update(column_major, at.T, bt.T)
    K.projection_update(w, at.T, bt.T)
    torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(column_major, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    (((4, 5), (4, 2), (3, 5)), {}, r"a is 4×2 and b is 3×5"),
    (((4, 5), (3, 2), (2, 5)), {}, r"a @ b is 3×5 but w is 4×5"),
    (((4, 5), (4, 2), (2, 5)), {"extra": (5, 4)}, r"extra has shape \(5, 4\)"),
    (((4, 5), (4, 2), (2, 5)), {"extra": (4, 5), "extra_scale": (2, 5)}, r"must be \(4, 1\) .*\(1, 5\)"),
    (((4, 5), (4, 2), (2, 5)), {"extra_scale": (1, 5)}, r"pass extra too"),
    (((20,), (4, 2), (2, 5)), {}, r"w must be 2-D"),
    (((4, 5), (4, 2), (2, 5)), {"decay_mode": "sideways"}, r"decay_mode 'sideways'"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(args, kwargs, message, backend, monkeypatch):
    monkeypatch.setenv("HFX_KERNELS", backend)
    tensors = [torch.zeros(s) for s in args]
    kwargs = {k: torch.zeros(v) if k.startswith("extra") else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        K.projection_update(*tensors, **kwargs)


def test_bad_dtype_and_overlapping_w():
    with pytest.raises(ValueError, match="floating-point"):
        K.projection_update(torch.zeros(4, 5, dtype=torch.int32), torch.zeros(4, 2), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="overlapping"):
        K.projection_update(torch.zeros(1, 5).expand(4, 5), torch.zeros(4, 2), torch.zeros(2, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay_mode", ["before", "after"])
@pytest.mark.parametrize(("with_extra", "scale"), [(False, None), (True, None), (True, "row"), (True, "column")])
def test_torch_path_addmm_form_equals_the_reference(dtype, decay_mode, with_extra, scale, monkeypatch):
    """The torch path's addmm (+ add_/addcmul_) form (W's dtype throughout) equals the plain reference."""
    monkeypatch.setenv("HFX_KERNELS", "torch")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(9, 13, generator=gen, dtype=dtype)
    a, b = torch.randn(9, 4, generator=gen, dtype=dtype), torch.randn(4, 13, generator=gen, dtype=dtype)
    extra = torch.randn(9, 13, generator=gen, dtype=dtype) if with_extra else None
    s = None if scale is None else torch.randn((9, 1) if scale == "row" else (1, 13), generator=gen, dtype=dtype)
    kw = dict(alpha=0.3, extra=extra, beta=0.7, decay=0.9, decay_mode=decay_mode, extra_scale=s)
    want = w.clone()
    K.projection_update_reference(want, a, b, **kw)
    K.projection_update(w, a, b, **kw)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(w, want, rtol=tol, atol=tol)
