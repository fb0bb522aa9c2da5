"""Quantizers for ECO: round-trip error bounds per format and scale mode, INT4 packing, nearest rounding against
independent oracles (torch.round, torch's own float8 cast), stochastic rounding unbiased in the mean and reproducible
from a seed, error feedback, sizes and input errors.

The oracles here recompute the scales themselves (absmax of each group / qmax, groups cut by hand) and never call
the functions under test to produce expected values.
"""

from __future__ import annotations

import math

import pytest
import torch

from hfx_optim import quantize as qz
from hfx_optim.quantize import (
    compute_scale,
    dequantize,
    fake_quantize,
    mix_seed,
    pack_int4,
    quantize,
    quantize_with_error_feedback,
    quantized_nbytes,
    round_to_grid,
    sr_generator,
    unpack_int4,
)

QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0}
FORMATS = ["int8", "int4", "fp8_e4m3"]
MODES = [("tensor", 128), ("row", 128), ("block", 8), ("block", 5)]  # 5 leaves a short last block on 13 columns


def sample(rows=6, cols=13, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x[1] *= 1e-3  # a row of small values: per-row/per-block scales must adapt
    x[2, :4] = 0.0
    return x.to(dtype)


def groups(x: torch.Tensor, scale_mode: str, block_size: int):
    """(row, column slice) of each scale group, cut by hand."""
    rows, cols = x.shape
    if scale_mode == "tensor":
        return [(slice(None), slice(None))]
    if scale_mode == "row":
        return [(slice(r, r + 1), slice(None)) for r in range(rows)]
    return [(slice(r, r + 1), slice(c, min(c + block_size, cols))) for r in range(rows) for c in range(0, cols, block_size)]


def oracle_scale_map(x: torch.Tensor, fmt: str, scale_mode: str, block_size: int) -> torch.Tensor:
    """Per-element scale: absmax of the element's group / qmax (1 for an all-zero group)."""
    out = torch.empty_like(x, dtype=torch.float64)
    for rs, cs in groups(x, scale_mode, block_size):
        absmax = float(x[rs, cs].double().abs().max())
        out[rs, cs] = absmax / QMAX[fmt] if absmax > 0 else 1.0
    return out


def fp8_grid() -> torch.Tensor:
    """Every finite value of float8_e4m3fn, sorted (from the 256 bit patterns)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return torch.unique(values[torch.isfinite(values)])


def oracle_nearest(y: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "fp8_e4m3":
        return y.clamp(-448, 448).float().to(torch.float8_e4m3fn).double()  # torch's own cast: round to nearest even
    return torch.round(y).clamp(-QMAX[fmt], QMAX[fmt])


def neighbours(y: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid points just below and above ``y`` (equal when ``y`` is on the grid)."""
    if fmt == "fp8_e4m3":
        grid = fp8_grid()
        hi_idx = torch.searchsorted(grid, y.contiguous(), right=False).clamp(max=len(grid) - 1)
        hi = grid[hi_idx]
        lo = torch.where(hi == y, hi, grid[(hi_idx - 1).clamp(min=0)])
        return lo, hi
    return torch.floor(y), torch.ceil(y)


# --------------------------------------------------------------------------------------------------
# Scales
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("scale_mode", "block_size"), MODES)
def test_scales_are_group_absmax_over_qmax(fmt, scale_mode, block_size):
    x = sample()
    scale = compute_scale(x, fmt, scale_mode, block_size)
    want_shape = {"tensor": (1, 1), "row": (6, 1), "block": (6, math.ceil(13 / block_size))}[scale_mode]
    assert tuple(scale.shape) == want_shape and scale.dtype == torch.float64
    expected = oracle_scale_map(x, fmt, scale_mode, block_size)
    for rs, cs in groups(x, scale_mode, block_size):
        r = 0 if scale_mode == "tensor" else rs.start
        b = 0 if scale_mode != "block" else cs.start // block_size
        assert float(scale[r, b]) == pytest.approx(float(expected[rs, cs].flatten()[0]), rel=1e-15)


def test_all_zero_group_quantizes_to_zero():
    x = torch.zeros(2, 4)
    x[1] = torch.tensor([0.5, -1.0, 0.25, 0.0])
    for fmt in FORMATS:
        x_hat, scale = fake_quantize(x, fmt, scale_mode="row")
        assert torch.isfinite(scale).all() and torch.isfinite(x_hat).all()
        assert torch.equal(x_hat[0], torch.zeros(4))
        assert float(x_hat[1].abs().max()) == pytest.approx(1.0, rel=1e-6)  # the absmax maps to qmax exactly


# --------------------------------------------------------------------------------------------------
# Round trip: nearest rounding matches independent oracles, error bounds
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("scale_mode", "block_size"), MODES)
def test_nearest_rounding_matches_oracle_and_error_bound(fmt, scale_mode, block_size):
    x = sample()
    scale = oracle_scale_map(x, fmt, scale_mode, block_size)
    expected = oracle_nearest(x / scale, fmt) * scale
    x_hat, _ = fake_quantize(x, fmt, scale_mode=scale_mode, block_size=block_size)
    torch.testing.assert_close(x_hat, expected, rtol=1e-14, atol=0)
    err = (x - x_hat).abs()
    if fmt == "fp8_e4m3":
        # half a grid step: 2^-4 relative for normal values, 2^-10 absolute below the smallest normal 2^-6
        bound = torch.maximum((x / scale).abs() * 2.0**-4, torch.full_like(x, 2.0**-10)) * scale
    else:
        bound = 0.5 * scale
    assert (err <= bound * (1 + 1e-12)).all()
    # the packed form gives the same values
    qt = quantize(x, fmt, scale_mode=scale_mode, block_size=block_size)
    torch.testing.assert_close(dequantize(qt), x_hat, rtol=0, atol=0)
    assert qt.data.dtype == {"int8": torch.int8, "int4": torch.uint8, "fp8_e4m3": torch.float8_e4m3fn}[fmt]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_integer_nearest_rounds_ties_to_even(fmt):
    # the row absmax qmax * 0.25 fixes the scale at 0.25 exactly, so x / scale lands on exact halves
    qmax = QMAX[fmt]
    y = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, qmax]], dtype=torch.float64)
    x_hat, scale = fake_quantize(y * 0.25, fmt, scale_mode="row")
    assert scale.item() == 0.25
    assert (x_hat / 0.25).tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0, qmax]]


def test_fp8_nearest_equals_torch_cast_on_every_binade_and_subnormals():
    g = torch.Generator().manual_seed(3)
    exps = torch.randint(-12, 9, (4000,), generator=g).double()
    y = (torch.rand(4000, generator=g, dtype=torch.float64) + 0.5) * 2.0**exps
    y = torch.where(torch.rand(4000, generator=g) < 0.5, -y, y).clamp(-448, 448)
    grid = fp8_grid()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    y = torch.cat([y, mids[(mids.abs() < 448)], grid]).reshape(1, -1)
    got = round_to_grid(y, "fp8_e4m3")
    assert torch.equal(got, oracle_nearest(y, "fp8_e4m3"))


def test_low_precision_inputs_are_quantized_in_float32():
    x = sample(dtype=torch.bfloat16)
    x_hat, scale = fake_quantize(x, "int8", scale_mode="row")
    assert x_hat.dtype == torch.float32 and scale.dtype == torch.float32
    expected = oracle_nearest(x.double() / oracle_scale_map(x, "int8", "row", 128), "int8")
    torch.testing.assert_close(x_hat.double() / scale.double(), expected, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# INT4 packing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cols", [1, 2, 7, 16])
def test_int4_pack_roundtrip(cols):
    g = torch.Generator().manual_seed(cols)
    codes = torch.randint(-8, 8, (5, cols), generator=g, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (5, math.ceil(cols / 2))
    assert torch.equal(unpack_int4(packed, cols), codes)


def test_int4_nibble_layout():
    packed = pack_int4(torch.tensor([[1, -2, 7]], dtype=torch.int8))
    # low nibble first, codes offset by 8; an odd tail is padded with a zero code (8)
    assert packed.tolist() == [[(1 + 8) | ((-2 + 8) << 4), (7 + 8) | (8 << 4)]]


def test_int4_quantize_packs_the_codes():
    x = sample()
    qt = quantize(x, "int4", scale_mode="row")
    codes = unpack_int4(qt.data, 13)
    expected = oracle_nearest(x / oracle_scale_map(x, "int4", "row", 128), "int4")
    assert torch.equal(codes.double(), expected)


def test_pack_int4_rejects_out_of_range_and_float():
    with pytest.raises(ValueError, match=r"codes must be in \[-8, 7\]"):
        pack_int4(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"integer codes"):
        pack_int4(torch.tensor([1.0]))


# --------------------------------------------------------------------------------------------------
# Stochastic rounding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_lands_on_a_neighbour(fmt):
    x = sample(cols=40)
    scale = oracle_scale_map(x, fmt, "row", 128)
    x_hat, _ = fake_quantize(x, fmt, scale_mode="row", stochastic=True, generator=sr_generator(5, 1))
    lo, hi = neighbours(x / scale, fmt)
    codes = x_hat / scale
    ok = ((codes - lo).abs() < 1e-9 * (1 + lo.abs())) | ((codes - hi).abs() < 1e-9 * (1 + hi.abs()))
    assert ok.all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_is_unbiased_in_the_mean(fmt):
    # N identical rows share one row scale; each row is an independent draw of the same values
    n_draws, cols = 4000, 64
    g = torch.Generator().manual_seed(11)
    row = torch.rand(cols, generator=g, dtype=torch.float64) * 2 - 1
    row[0] = 1.0  # pins the row scale at 1/qmax
    x = row.expand(n_draws, cols).contiguous()
    x_hat, _ = fake_quantize(x, fmt, scale_mode="row", stochastic=True, generator=sr_generator(fmt == "int4", 7))
    scale = 1.0 / QMAX[fmt]
    lo, hi = neighbours(row / scale, fmt)
    step = (hi - lo) * scale  # the gap the value falls in; a draw's deviation is within it
    mean = x_hat.mean(dim=0)
    sigma = step / 2 / math.sqrt(n_draws)  # std of a Bernoulli draw over a gap is at most gap/2
    assert ((mean - row).abs() <= 6 * sigma + 1e-12).all()
    # rounding to nearest is biased on the same values (a sanity check that the test can tell them apart)
    nearest, _ = fake_quantize(row.reshape(1, -1), fmt, scale_mode="row")
    assert (nearest[0] - row).abs().max() > 20 * float(sigma.max())


def test_stochastic_rounding_is_bit_identical_for_the_same_seed():
    x = sample(cols=64)
    for fmt in FORMATS:
        a, _ = fake_quantize(x, fmt, stochastic=True, generator=sr_generator(42, 3))
        b, _ = fake_quantize(x, fmt, stochastic=True, generator=sr_generator(42, 3))
        c, _ = fake_quantize(x, fmt, stochastic=True, generator=sr_generator(42, 4))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        qa = quantize(x, fmt, stochastic=True, generator=sr_generator(42, 3))
        assert torch.equal(dequantize(qa), a)


def test_injected_noise_is_floor_of_y_plus_u():
    x = sample()
    scale = oracle_scale_map(x, "int8", "block", 5)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_hat, _ = fake_quantize(x, "int8", scale_mode="block", block_size=5, noise=u)
    lo = torch.floor(x / scale)
    frac = x / scale - lo
    expected = torch.where(frac + u >= 1, lo + 1, lo).clamp(-127, 127) * scale
    torch.testing.assert_close(x_hat, expected, rtol=1e-14, atol=0)


def test_sr_generator_is_seeded_by_mix_seed():
    # the documented contract: a torch.Generator seeded with mix_seed(*counters)
    a = torch.rand(8, generator=sr_generator(3, 9))
    b = torch.rand(8, generator=torch.Generator().manual_seed(mix_seed(3, 9)))
    assert torch.equal(a, b)
    assert mix_seed(3, 9) != mix_seed(9, 3) and 0 <= mix_seed(2**70, -1) < 2**64


# --------------------------------------------------------------------------------------------------
# Error feedback
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_error_feedback_telescopes(fmt):
    # sum of K dequantized outputs = K * x - final error: nothing is lost across calls
    x = sample() * 0.01
    error, total = None, torch.zeros_like(x)
    for k in range(1, 6):
        y = x if error is None else x + error  # what this call quantizes
        qt, error = quantize_with_error_feedback(x, error, fmt, scale_mode="row")
        total += dequantize(qt)
        torch.testing.assert_close(total + error, k * x, rtol=1e-12, atol=1e-15)
        scale = oracle_scale_map(y, fmt, "row", 128)  # the residual is at most half a grid step of y
        half_step = (y / scale).abs() * 2.0**-4 + 2.0**-10 if fmt == "fp8_e4m3" else torch.full_like(y, 0.5)
        assert (error.abs() <= half_step * scale * (1 + 1e-12)).all()


# --------------------------------------------------------------------------------------------------
# Sizes and errors
# --------------------------------------------------------------------------------------------------


def test_quantized_nbytes():
    assert quantized_nbytes((4, 300), "int8", "block", 128) == (1200, 4 * 4 * 3)
    assert quantized_nbytes((4, 301), "int4", "row") == (4 * 151, 16)
    assert quantized_nbytes((4, 300), "fp8", "tensor") == (1200, 4)


def test_explicit_scale_recovers_exact_codes():
    x = sample()
    x_hat, scale = fake_quantize(x, "int4", scale_mode="block", block_size=5)
    qt = quantize(x_hat, "int4", scale_mode="block", block_size=5, scale=scale)
    assert torch.equal(dequantize(qt), x_hat)
    with pytest.raises(ValueError, match=r"scale must have shape \(6, 3\)"):
        quantize(x_hat, "int4", scale_mode="block", block_size=5, scale=scale[:, :2])


def test_bad_inputs_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown weight format 'int2'"):
        fake_quantize(torch.ones(2, 2), "int2")
    with pytest.raises(ValueError, match=r"unknown scale_mode 'col'"):
        fake_quantize(torch.ones(2, 2), "int8", scale_mode="col")
    with pytest.raises(ValueError, match=r"block_size must be a positive int"):
        fake_quantize(torch.ones(2, 2), "int8", scale_mode="block", block_size=0)
    with pytest.raises(ValueError, match=r"must be a 2-D tensor .* x\.reshape\(x\.shape\[0\], -1\)"):
        fake_quantize(torch.ones(3), "int8")
    with pytest.raises(ValueError, match=r"float16/bfloat16/float32/float64"):
        fake_quantize(torch.ones(2, 2, dtype=torch.int32), "int8")
    with pytest.raises(ValueError, match=r"noise must have the shape of x"):
        fake_quantize(torch.ones(2, 2), "int8", noise=torch.zeros(3))
    assert qz.normalize_format("FP8") == "fp8_e4m3"
    monkeypatch.setattr(qz, "fp8_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs torch\.float8_e4m3fn .* use 'int8' instead"):
        qz.normalize_format("fp8_e4m3")
