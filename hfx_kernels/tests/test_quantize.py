"""ECO's requantize kernel, the plain quantize / dequantize pair and the Philox port: Triton (interpreter on CPU)
against the torch references bit for bit over odd shapes, formats, scale modes and both roundings; the Philox port
against Triton's own ``tl.rand``; stochastic rounding unbiased and reproducible; the error-feedback identity; INT4
packing; and the references against hfx_optim's quantizer (the semantics ECO documents)."""

import math

import pytest
import torch

from hfx_kernels import quantize as Q
from hfx_kernels._backend import compute_dtype, tl, triton
from hfx_kernels.testing import TritonKernelConformance, kernel_device, triton_runnable

EXACT = {dtype: (0.0, 0.0) for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
SHAPES = ((0, 5), (1, 1), (3, 7), (4, 37), (2, 70))  # empty, one element, rows not a multiple of the block (8)
ROUNDINGS = {"nearest": None, "stochastic": 1234}


def bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of ``t``, so that comparisons are bit for bit (the sign of zero included)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])


def theta_like(shape, dtype, device, generator=None):
    """Values of a weight update: random, with exact zeros, a negative zero and an all-zero block."""
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype) * 0.05
    if x.numel() > 8:
        flat = x.view(-1)
        flat[1] = 0.0
        flat[2] = -0.0
        x[-1, :8] = 0.0
    return x


def needs_triton():
    ok, why = triton_runnable()
    if not ok:
        pytest.skip(why)


# --------------------------------------------------------------------------------------------------
# Conformance: Triton == torch reference, bit for bit
# --------------------------------------------------------------------------------------------------


class _Cases(TritonKernelConformance):
    shapes = SHAPES
    tolerances = EXACT
    block_size = 8
    # (format, scale mode, rounding[, block size])
    cases: tuple = tuple((fmt, mode, r) for fmt in Q.FORMATS for mode in ("row", "block") for r in ROUNDINGS)

    @pytest.fixture(autouse=True)
    def _case(self, request):
        self.fmt, self.scale_mode, rounding, *block = request.param
        self.seed = ROUNDINGS[rounding]
        self.block_size = block[0] if block else type(self).block_size

    def pytest_generate_tests(self, metafunc):
        super().pytest_generate_tests(metafunc)
        if "_case" in metafunc.fixturenames:
            metafunc.parametrize("_case", self.cases, ids=["-".join(map(str, c)) for c in self.cases], indirect=True)

    @property
    def options(self):
        return dict(fmt=self.fmt, scale_mode=self.scale_mode, block_size=self.block_size, seed=self.seed)


class TestRequantize(_Cases):
    """θ̃ -> parameter (its dtype), scales, error; the parameter dtype is the grid's dtype."""

    modifies_inputs = True
    dtypes = (torch.float32, torch.bfloat16, torch.float64)

    def make_inputs(self, shape, dtype, device):
        cdt = compute_dtype(dtype)
        return (torch.zeros(shape, dtype=dtype, device=device), theta_like(shape, cdt, device),
                torch.zeros(Q.scale_shape(shape, self.scale_mode, self.block_size), dtype=cdt, device=device))

    def reference(self, p, theta, scale):
        Q.requantize_reference(p, theta, scale, **self.options)
        return bits(p), bits(theta), bits(scale)

    def kernel(self, p, theta, scale):
        Q.requantize_triton(p, theta, scale, **self.options)
        return bits(p), bits(theta), bits(scale)


class TestRequantizeFloat16TensorScale(TestRequantize):
    """One scale for the whole tensor (a single row of rows*cols for the kernel), and float16 parameters."""

    dtypes = (torch.float16,)
    cases = tuple((fmt, "tensor", r) for fmt in Q.FORMATS for r in ROUNDINGS)


class TestQuantize(_Cases):
    """x -> codes (int8, two int4 per byte, float8 bytes) and scales; block size 5 makes INT4 blocks straddle bytes."""

    dtypes = (torch.float32, torch.float64)  # a bfloat16/float16 x is quantized from float32 (as in hfx_optim)
    cases = (*_Cases.cases, ("int4", "tensor", "stochastic"), ("int4", "block", "nearest", 5),
             ("int4", "block", "stochastic", 5))

    def make_inputs(self, shape, dtype, device):
        return (theta_like(shape, torch.float32, device).to(dtype),)

    def reference(self, x):
        codes, scale = Q.quantize_reference(x, **self.options)
        return bits(codes), bits(scale)

    def kernel(self, x):
        codes, scale = Q.quantize_triton(x, **self.options)
        return bits(codes), bits(scale)


class TestDequantize(_Cases):
    """codes and float32 scales -> values in the dtype of the grid."""

    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    cases = tuple((fmt, mode, "nearest") for fmt in Q.FORMATS for mode in ("row", "block", "tensor"))

    def make_inputs(self, shape, dtype, device):
        self.out_dtype, self.n_cols = dtype, shape[1]
        codes, scale = Q.quantize_reference(theta_like(shape, torch.float32, device), **self.options)
        return codes, scale

    def reference(self, codes, scale):
        return bits(Q.dequantize_reference(codes, scale, self.fmt, cols=self.n_cols, scale_mode=self.scale_mode,
                                           block_size=self.block_size, dtype=self.out_dtype))

    def kernel(self, codes, scale):
        return bits(Q.dequantize_triton(codes, scale, self.fmt, cols=self.n_cols, scale_mode=self.scale_mode,
                                        block_size=self.block_size, dtype=self.out_dtype))


@pytest.mark.parametrize(("fmt", "scale_mode", "seed"), [("int8", "row", 7), ("int4", "row", None),
                                                         ("fp8_e4m3", "tensor", 7), ("int4", "block", 3)])
def test_long_rows_and_int64_indexing(fmt, scale_mode, seed, monkeypatch):
    """Rows wider than the tile are read twice (absmax, then quantize); tensors past 2^31 elements index with int64.
    Both paths, forced on small tensors, still equal the reference bit for bit."""
    needs_triton()
    monkeypatch.setattr(Q, "MAX_TILE", 8)
    monkeypatch.setattr(Q, "INT64_INDEX_AT", 0)
    dev = kernel_device()
    theta = theta_like((3, 37), torch.float32, dev, torch.Generator().manual_seed(0))
    shape = Q.scale_shape(theta.shape, scale_mode, 16)
    outs = []
    for impl in (Q.requantize_reference, Q.requantize_triton):
        p, th, s = torch.zeros(3, 37, dtype=torch.bfloat16, device=dev), theta.clone(), torch.zeros(shape, device=dev)
        impl(p, th, s, fmt=fmt, scale_mode=scale_mode, block_size=16, seed=seed)
        outs.append([bits(p), bits(th), bits(s)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    for impl in (Q.quantize_reference, Q.quantize_triton):
        outs.append([bits(t) for t in impl(theta, fmt, scale_mode=scale_mode, block_size=16, seed=seed)])
    for a, b in zip(*outs[2:]):
        assert torch.equal(a, b)
    codes, scale = Q.quantize_reference(theta, fmt, scale_mode=scale_mode, block_size=16, seed=seed)
    want = Q.dequantize_reference(codes, scale, fmt, cols=37, scale_mode=scale_mode, block_size=16)
    got = Q.dequantize_triton(codes, scale, fmt, cols=37, scale_mode=scale_mode, block_size=16)
    assert torch.equal(bits(got), bits(want))


# --------------------------------------------------------------------------------------------------
# Philox: the torch port is Triton's tl.rand
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _draw(out_u, out_i, seed, offsets, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        mask = i < n
        offs = tl.load(offsets + i, mask=mask, other=0)
        tl.store(out_u + i, tl.rand(seed, offs), mask=mask)
        tl.store(out_i + i, tl.randint(seed, offs).to(tl.int32, bitcast=True), mask=mask)


SEEDS = [0, 1, 12345, 2**31 - 1, 2**31 + 5, 2**32 - 1, 2**32, 2**40 + 7, 2**63 - 1, 2**63 + 99, 2**64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
def test_philox_port_equals_tl_rand_bit_for_bit(seed, offset_dtype):
    needs_triton()
    dev = kernel_device()
    offsets = torch.arange(200)
    if offset_dtype == torch.int64:  # counters past 2^32 use Philox's second counter word
        offsets = torch.cat([offsets, torch.tensor([2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62 + 1])])
    offsets = offsets.to(dev, offset_dtype)
    u = torch.empty(len(offsets), device=dev)
    words = torch.empty(len(offsets), dtype=torch.int32, device=dev)
    _draw[(1,)](u, words, seed, offsets, len(offsets), BLOCK=256)
    assert torch.equal(bits(Q.philox_uniform(seed, offsets)), bits(u))
    assert torch.equal(Q.philox_randint(seed, offsets).to(torch.int32), words.to(torch.int64).to(torch.int32))


def test_philox_known_answer_and_range():
    # Random123's known-answer test for Philox4x32-10: counter 0, key 0 -> first word 0x6627e8d5
    assert int(Q.philox_randint(0, torch.zeros(1, dtype=torch.int64))) == 0x6627E8D5
    u = Q.philox_uniform(99, torch.arange(1 << 14))
    assert u.dtype == torch.float32 and float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.double().mean()) - 0.5) < 0.01
    noise = Q.sr_noise(99, (4, 8), dtype=torch.float64)
    assert noise.shape == (4, 8) and torch.equal(noise.float().reshape(-1), u[:32])
    with pytest.raises(ValueError, match="offsets must be >= 0"):
        Q.philox_randint(0, torch.tensor([-1]))


# --------------------------------------------------------------------------------------------------
# Stochastic rounding and the error-feedback identity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_stochastic_rounding_is_unbiased_over_seeds(fmt):
    """The mean of q(x) over 400 seeds is x within 5 standard errors, where rounding to nearest is off by up to half a
    grid step; each draw lands on one of the two neighbouring grid points."""
    x = torch.tensor([[1.0, 0.3, -0.71, 0.05, 0.5, -0.999, 0.123, 0.0]]) * 0.1
    x[0, 0] = 0.1  # pins the row scale
    draws = []
    for seed in range(400):
        p, th, s = torch.zeros_like(x), x.clone(), torch.zeros(1, 1)
        Q.requantize_reference(p, th, s, fmt=fmt, scale_mode="row", seed=seed)
        draws.append(p)
    draws = torch.stack(draws)
    lo, hi = draws.min(dim=0).values, draws.max(dim=0).values
    step = hi - lo
    assert (lo <= x).all() and (x <= hi).all()
    std_err = (step / 2) / math.sqrt(len(draws))
    assert ((draws.mean(dim=0) - x).abs() <= 5 * std_err + 1e-7).all()
    nearest = torch.zeros_like(x)
    Q.requantize_reference(nearest, x.clone(), torch.zeros(1, 1), fmt=fmt, scale_mode="row")
    assert ((nearest - x).abs() > 10 * std_err).any()  # the test can tell a biased rounding


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_same_seed_bit_identical_other_seed_different(impl):
    if impl == "triton":
        needs_triton()
    fn = Q.requantize_triton if impl == "triton" else Q.requantize_reference
    dev = kernel_device()
    theta = theta_like((5, 33), torch.float32, dev, torch.Generator().manual_seed(3))

    def run(seed):
        p, th, s = torch.zeros(5, 33, dtype=torch.bfloat16, device=dev), theta.clone(), torch.zeros(5, 5, device=dev)
        fn(p, th, s, fmt="int4", scale_mode="block", block_size=8, seed=seed)
        return torch.cat([bits(p).reshape(-1).to(torch.int64), bits(th).reshape(-1).to(torch.int64)])

    assert torch.equal(run(2**40 + 1), run(2**40 + 1))
    assert not torch.equal(run(2**40 + 1), run(2**40 + 2))


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_error_feedback_identity(impl, dtype, fmt):
    """e is the correctly rounded θ̃ - held, in the compute dtype; with rounding to nearest the difference is exact
    (Sterbenz), so held + e == θ̃ exactly."""
    if impl == "triton":
        needs_triton()
    fn = Q.requantize_triton if impl == "triton" else Q.requantize_reference
    dev, cdt = kernel_device(), compute_dtype(dtype)
    theta = theta_like((4, 37), cdt, dev, torch.Generator().manual_seed(5))
    for seed in (None, 11):
        p, e, s = torch.zeros(4, 37, dtype=dtype, device=dev), theta.clone(), torch.zeros(4, 5, dtype=cdt, device=dev)
        fn(p, e, s, fmt=fmt, scale_mode="block", block_size=8, seed=seed)
        held = p.to(cdt)
        assert torch.equal(bits(e), bits(theta - held))
        if seed is None:
            assert torch.equal(held + e, theta)
        else:  # exact unless a value below a third of a grid step was rounded up to the step
            assert (held + e == theta).float().mean() > 0.9


# --------------------------------------------------------------------------------------------------
# INT4 packing, the references against hfx_optim, dispatch and bad input
# --------------------------------------------------------------------------------------------------


def test_int4_pack_unpack_round_trip():
    assert Q.pack_int4(torch.tensor([[-8, 7, 0]])).tolist() == [[0xF0, 0x88]]  # low nibble first, offset 8, padded
    for n in (1, 2, 7, 8, 33):
        codes = torch.randint(-8, 8, (3, n), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
        packed = Q.pack_int4(codes)
        assert packed.dtype == torch.uint8 and packed.shape == (3, math.ceil(n / 2))
        assert torch.equal(Q.unpack_int4(packed, n), codes)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("scale_mode", ["row", "block", "tensor"])
def test_int4_quantize_dequantize_round_trip(impl, scale_mode):
    """quantize -> dequantize gives exactly the weight requantize holds; unpack -> pack gives the bytes back."""
    if impl == "triton":
        needs_triton()
    quantize, dequantize = ((Q.quantize_triton, Q.dequantize_triton) if impl == "triton" else
                            (Q.quantize_reference, Q.dequantize_reference))
    dev = kernel_device()
    x = theta_like((3, 21), torch.float32, dev, torch.Generator().manual_seed(2))
    codes, scale = quantize(x, "int4", scale_mode=scale_mode, block_size=6, seed=5)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 11)
    assert torch.equal(Q.pack_int4(Q.unpack_int4(codes, 21)), codes)
    held = torch.zeros_like(x)
    Q.requantize_reference(held, x.clone(), torch.zeros_like(scale), fmt="int4", scale_mode=scale_mode, block_size=6,
                           seed=5)
    assert torch.equal(dequantize(codes, scale, "int4", cols=21, scale_mode=scale_mode, block_size=6), held)


@pytest.mark.parametrize("scale_mode", ["tensor", "row", "block"])
@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_references_equal_hfx_optim_quantizer(fmt, scale_mode):
    """The kernels implement hfx_optim.quantize's semantics (compute_scale, fake_quantize, quantize): the same grid
    values, scales and codes for the same noise."""
    hq = pytest.importorskip("hfx_optim.quantize")
    x = theta_like((5, 37), torch.float32, "cpu", torch.Generator().manual_seed(1))
    for seed in (None, 77):
        noise = None if seed is None else Q.sr_noise(seed, x.shape)
        want, want_scale = hq.fake_quantize(x, fmt, scale_mode=scale_mode, block_size=8, noise=noise)
        p, s = torch.zeros_like(x), torch.zeros_like(want_scale)
        Q.requantize_reference(p, x.clone(), s, fmt=fmt, scale_mode=scale_mode, block_size=8, seed=seed)
        assert torch.equal(p, want) and torch.equal(s, want_scale)
        codes, scale = Q.quantize_reference(x, fmt, scale_mode=scale_mode, block_size=8, seed=seed)
        qt = hq.quantize(x, fmt, scale_mode=scale_mode, block_size=8, noise=noise)
        assert torch.equal(bits(codes), bits(qt.data)) and torch.equal(scale, qt.scale)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dispatch(backend, monkeypatch):
    if backend == "triton":
        needs_triton()
    monkeypatch.setenv("HFX_KERNELS", backend)
    dev = kernel_device()
    theta = theta_like((3, 10), torch.float32, dev, torch.Generator().manual_seed(4))
    p, th, s = torch.zeros(3, 10, device=dev), theta.clone(), torch.zeros(3, 1, device=dev)
    assert Q.requantize(p, th, s, fmt="fp8", scale_mode="row", seed=9) is th
    p2, th2, s2 = torch.zeros_like(p), theta.clone(), torch.zeros_like(s)
    Q.requantize_reference(p2, th2, s2, fmt="fp8_e4m3", scale_mode="row", seed=9)
    assert torch.equal(p, p2) and torch.equal(th, th2) and torch.equal(s, s2)
    codes, scale = Q.quantize(theta, "fp8_e4m3", scale_mode="row", seed=9)
    assert codes.dtype == torch.float8_e4m3fn
    assert torch.equal(Q.dequantize(codes, scale, "fp8_e4m3", scale_mode="row"), p)


def test_bad_input():
    p, th, s = torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="unknown format 'int2'"):
        Q.requantize_reference(p, th, s, fmt="int2", scale_mode="row")
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 1\)"):
        Q.requantize_reference(p, th, torch.zeros(1, 1), scale_mode="row")
    with pytest.raises(ValueError, match=r"theta must be torch\.float32 for a torch\.bfloat16 parameter"):
        Q.requantize_reference(p.bfloat16(), th.double(), s, scale_mode="row")
    with pytest.raises(ValueError, match=r"seed .* or noise .*, not both"):
        Q.requantize_reference(p, th, s, scale_mode="row", seed=1, noise=torch.rand(2, 4))
    with pytest.raises(ValueError, match="must be 2-D"):
        Q.quantize_reference(torch.zeros(8))
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        Q.quantize_reference(torch.zeros(2, 2), scale_mode="block", block_size=0)
    with pytest.raises(ValueError, match="do not hold 9 int4 columns"):
        Q.dequantize_reference(torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1), "int4", cols=9, scale_mode="row")
    ok, _ = triton_runnable()
    if ok:
        with pytest.raises(ValueError, match="not contiguous"):
            Q.requantize_triton(p, torch.zeros(4, 2).t(), s, scale_mode="row")
