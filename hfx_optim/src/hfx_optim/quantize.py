"""Weight quantizers for ECO: pure functions, symmetric absmax scaling, round-to-nearest or stochastic rounding.

Formats (``fmt``):

- ``"int8"``: integers in [-127, 127], stored as ``torch.int8``;
- ``"int4"``: integers in [-7, 7], stored two per byte (``torch.uint8``, low nibble first, offset by 8) along the last
  dimension (:func:`pack_int4`);
- ``"fp8_e4m3"``: the values of ``torch.float8_e4m3fn`` (|x| <= 448, 3 mantissa bits, subnormals down to 2^-9),
  stored in that dtype; only where torch has it (:func:`fp8_available`).

Scales (``scale_mode``), one fp32 (fp64 for fp64 input) number per group of elements of a 2-D tensor
``(rows, cols)``: ``"tensor"`` (shape ``(1, 1)``), ``"row"`` (``(rows, 1)``) or ``"block"`` (``(rows, ceil(cols /
block_size))``: 1 x ``block_size`` tiles along a row; the last tile of a row may be shorter). The scale is
``absmax / qmax`` of its group (1 for an all-zero group), so the largest element maps to the largest code. A
per-block scale needs no pass over the whole row before quantizing, which is what a single-pass fused kernel wants.

Rounding of ``y = x / scale`` onto the grid of the format (spacing ``ulp(y)``: 1 for the integer formats; for FP8
``2^(max(floor(log2|y|), -6) - 3)``):

- nearest: ``round_half_even(y / ulp) * ulp``, which for FP8 equals the IEEE cast ``y.to(torch.float8_e4m3fn)``;
- stochastic: ``floor(y / ulp + u) * ulp`` with ``u ~ U[0, 1)``, so that ``E[q(y)] = y`` (unbiased). The noise comes
  from a seeded ``torch.Generator`` (see :func:`sr_generator` for the counter-based seeding ECO uses) or is passed in
  as a tensor (``noise=``), e.g. to test a kernel with injected noise.

Example::

    from hfx_optim.quantize import quantize, dequantize, fake_quantize, sr_generator

    qt = quantize(w, "int4", scale_mode="block", block_size=64)        # packed uint8 + fp32 scales
    w_hat = dequantize(qt)                                              # float32, on the int4 grid
    w_sr, scale = fake_quantize(w, "int8", stochastic=True, generator=sr_generator(0, 1, device=w.device))

:func:`quantize_with_error_feedback` is the classic error-feedback compressor (quantize ``x + error``, carry the new
error). These functions are the plain-torch definition of the formats; ECO's step itself (:mod:`hfx_optim.eco`) runs
the fused requantize of :mod:`hfx_kernels.quantize` (same grid and scales, Philox noise drawn identically by its
Triton kernel and its torch path), whose tests check it against this module.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FORMATS",
    "SCALE_MODES",
    "Quantized",
    "compute_scale",
    "dequantize",
    "fake_quantize",
    "format_bits",
    "format_max",
    "fp8_available",
    "mix_seed",
    "normalize_format",
    "pack_int4",
    "quantize",
    "quantize_with_error_feedback",
    "quantized_nbytes",
    "round_to_grid",
    "sr_generator",
    "unpack_int4",
]

FORMATS = ("int8", "int4", "fp8_e4m3")
SCALE_MODES = ("tensor", "row", "block")
_FORMAT_ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3", "fp8_e4m3fn": "fp8_e4m3"}
_QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0}
_BITS = {"int8": 8, "int4": 4, "fp8_e4m3": 8}
_FP8_MIN_EXP = -6  # e4m3fn: smallest normal exponent; subnormals share its spacing 2^-9
_FP8_MANTISSA = 3
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def fp8_available() -> bool:
    """Whether this torch has ``torch.float8_e4m3fn`` (torch >= 2.1)."""
    return hasattr(torch, "float8_e4m3fn")


def normalize_format(fmt: str) -> str:
    """The canonical format name (``"int8"``, ``"int4"`` or ``"fp8_e4m3"``; ``"fp8"`` is accepted). Raises
    ``ValueError`` for an unknown name, or for FP8 where torch lacks ``float8_e4m3fn``."""
    name = _FORMAT_ALIASES.get(str(fmt).lower().removeprefix("torch."), str(fmt).lower())
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}: use one of {', '.join(repr(f) for f in FORMATS)}")
    if name == "fp8_e4m3" and not fp8_available():
        raise ValueError(
            f"weight format 'fp8_e4m3' needs torch.float8_e4m3fn (torch >= 2.1; this is {torch.__version__}); "
            "use 'int8' instead"
        )
    return name


def format_max(fmt: str) -> float:
    """The largest magnitude of the format's grid (127, 7 or 448)."""
    return _QMAX[normalize_format(fmt)]


def format_bits(fmt: str) -> int:
    """Bits per stored element (8, 4 or 8)."""
    return _BITS[normalize_format(fmt)]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_2d(x: Tensor, what: str = "x") -> None:
    if x.ndim != 2:
        raise ValueError(
            f"{what} must be a 2-D tensor (rows, cols) to quantize, got shape {tuple(x.shape)}; reshape it first, "
            "e.g. x.reshape(x.shape[0], -1)"
        )
    if not (x.is_floating_point() and x.dtype.itemsize >= 2):
        raise ValueError(f"{what} must be a float16/bfloat16/float32/float64 tensor to quantize, got {x.dtype}")


def _check_scale_mode(scale_mode: str, block_size: int) -> None:
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}: use one of {', '.join(repr(s) for s in SCALE_MODES)}")
    if scale_mode == "block" and (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1):
        raise ValueError(f"block_size must be a positive int (e.g. 128), got {block_size!r}")


# --------------------------------------------------------------------------------------------------
# Scales and rounding
# --------------------------------------------------------------------------------------------------


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """``x`` (rows, cols) as (rows, n_blocks, block_size), zero-padded at the end of each row when needed."""
    rows, cols = x.shape
    pad = -cols % block_size
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(rows, -1, block_size)


def compute_scale(x: Tensor, fmt: str = "int8", scale_mode: str = "block", block_size: int = 128) -> Tensor:
    """The absmax scales of ``x`` (2-D) for ``fmt``: ``absmax / qmax`` per tensor (1, 1), row (rows, 1) or block
    (rows, n_blocks), in float32 (float64 for float64 ``x``); 1 for an all-zero group."""
    _check_2d(x)
    _check_scale_mode(scale_mode, block_size)
    qmax = format_max(fmt)
    a = x.to(_compute_dtype(x)).abs()
    if scale_mode == "tensor":
        absmax = a.amax().reshape(1, 1)
    elif scale_mode == "row":
        absmax = a.amax(dim=1, keepdim=True)
    else:
        absmax = _blocks(a, block_size).amax(dim=2)
    # an all-zero group quantizes to zeros with any scale; 1 keeps x / scale finite
    return torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))


def _fp8_ulp(y: Tensor) -> Tensor:
    """Spacing of the e4m3fn grid at ``y``: 2^(max(floor(log2|y|), -6) - 3) (2^-9 for subnormals and 0)."""
    _, exponent = torch.frexp(y)  # y = mantissa * 2^exponent, 0.5 <= |mantissa| < 1, so floor(log2|y|) = exponent - 1
    return torch.ldexp(torch.ones_like(y), (exponent - 1).clamp_(min=_FP8_MIN_EXP) - _FP8_MANTISSA)


def round_to_grid(y: Tensor, fmt: str = "int8", noise: Tensor | None = None) -> Tensor:
    """Round ``y`` (already divided by its scale) onto the grid of ``fmt``, clamped to ``[-qmax, qmax]``: to the
    nearest point (ties to even) when ``noise`` is None, else ``floor(y / ulp + noise) * ulp`` with ``noise`` in
    [0, 1) of ``y``'s shape (stochastic rounding; unbiased when ``noise`` is uniform). Returns ``y``'s dtype."""
    fmt = normalize_format(fmt)
    qmax = _QMAX[fmt]
    if fmt == "fp8_e4m3":
        ulp = _fp8_ulp(y)
        z = y / ulp  # exact: ulp is a power of two
        z = torch.round(z) if noise is None else torch.floor(z.add_(noise))
        return z.mul_(ulp).clamp_(-qmax, qmax)
    z = torch.round(y) if noise is None else torch.floor(y + noise)
    return z.clamp_(-qmax, qmax)


def _draw_noise(x: Tensor, dtype: torch.dtype, stochastic: bool, generator, noise: Tensor | None) -> Tensor | None:
    if noise is not None:
        if noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of x, {tuple(x.shape)}; got {tuple(noise.shape)}")
        return noise.to(dtype)
    if stochastic:
        return torch.rand(x.shape, generator=generator, device=x.device, dtype=dtype)
    return None


def _scaled_round(x: Tensor, fmt: str, scale_mode: str, block_size: int, noise: Tensor | None,
                  scale: Tensor | None = None):
    """(codes on the grid in the compute dtype, shaped like x; scale)."""
    cdt = _compute_dtype(x)
    if scale is None:
        scale = compute_scale(x, fmt, scale_mode, block_size)
    else:
        _check_scale_mode(scale_mode, block_size)
        want = {"tensor": (1, 1), "row": (x.shape[0], 1),
                "block": (x.shape[0], math.ceil(x.shape[1] / block_size))}[scale_mode]
        if tuple(scale.shape) != want:
            raise ValueError(f"scale must have shape {want} for scale_mode={scale_mode!r}, got {tuple(scale.shape)}")
        scale = scale.to(cdt)
    xc = x.to(cdt)
    if scale_mode == "block":
        rows, cols = x.shape
        y = _blocks(xc, block_size) / scale.unsqueeze(-1)
        u = None if noise is None else _blocks(noise, block_size)
        codes = round_to_grid(y, fmt, u).reshape(rows, -1)[:, :cols]
    else:
        codes = round_to_grid(xc / scale, fmt, noise)
    return codes, scale


def _apply_scale(codes: Tensor, scale: Tensor, scale_mode: str, block_size: int) -> Tensor:
    if scale_mode != "block":
        return codes * scale
    rows, cols = codes.shape
    return (_blocks(codes, block_size) * scale.unsqueeze(-1)).reshape(rows, -1)[:, :cols]


# --------------------------------------------------------------------------------------------------
# Public quantize / dequantize
# --------------------------------------------------------------------------------------------------


class Quantized(NamedTuple):
    """A quantized 2-D tensor: ``data`` (int8; uint8 with two int4 codes per byte; or float8_e4m3fn), ``scale``
    (float32/64, see the module docstring) and what :func:`dequantize` needs to undo it."""

    data: Tensor
    scale: Tensor
    shape: tuple[int, int]
    fmt: str
    scale_mode: str
    block_size: int


def fake_quantize(
    x: Tensor,
    fmt: str = "int8",
    *,
    scale_mode: str = "block",
    block_size: int = 128,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``dequantize(quantize(x))`` without building the packed codes: returns ``(x_hat, scale)``, ``x_hat`` in
    float32 (float64 for float64 ``x``) exactly on the grid ``codes * scale``.

    ``stochastic=True`` draws ``u ~ U[0, 1)`` from ``generator`` (torch's default generator when None); ``noise``
    (same shape as ``x``, values in [0, 1)) supplies ``u`` directly and implies stochastic rounding."""
    _check_2d(x)
    codes, scale = _scaled_round(x, fmt, scale_mode, block_size, _draw_noise(x, _compute_dtype(x), stochastic,
                                                                             generator, noise))
    return _apply_scale(codes, scale, scale_mode, block_size), scale


def quantize(
    x: Tensor,
    fmt: str = "int8",
    *,
    scale_mode: str = "block",
    block_size: int = 128,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    scale: Tensor | None = None,
) -> Quantized:
    """Quantize a 2-D ``x`` to ``fmt`` with absmax scales (see the module docstring); rounding as in
    :func:`fake_quantize`. ``scale`` imposes given scales (of the shape ``scale_mode`` implies) instead of the absmax
    ones, e.g. to recover the exact codes of a tensor already on a grid. Returns a :class:`Quantized` (``data`` is
    int8, packed uint8 for int4, or float8)."""
    fmt = normalize_format(fmt)
    _check_2d(x)
    codes, scale = _scaled_round(x, fmt, scale_mode, block_size, _draw_noise(x, _compute_dtype(x), stochastic,
                                                                             generator, noise), scale)
    if fmt == "int8":
        data = codes.to(torch.int8)
    elif fmt == "int4":
        data = pack_int4(codes.to(torch.int8))
    else:
        data = codes.to(torch.float8_e4m3fn)  # exact: the codes are on the e4m3 grid
    return Quantized(data, scale, (int(x.shape[0]), int(x.shape[1])), fmt, scale_mode, block_size)


def dequantize(qt: Quantized, dtype: torch.dtype | None = None) -> Tensor:
    """The values ``codes * scale`` of a :class:`Quantized`, in ``dtype`` (default: the scale's dtype)."""
    cdt = qt.scale.dtype
    codes = unpack_int4(qt.data, qt.shape[1]).to(cdt) if qt.fmt == "int4" else qt.data.to(cdt)
    out = _apply_scale(codes, qt.scale, qt.scale_mode, qt.block_size)
    return out if dtype is None else out.to(dtype)


def quantize_with_error_feedback(
    x: Tensor,
    error: Tensor | None = None,
    fmt: str = "int8",
    *,
    scale_mode: str = "block",
    block_size: int = 128,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Quantized, Tensor]:
    """Error feedback: quantize ``y = x + error`` (``error`` = the residual carried from the previous call, None
    for none) and return ``(quantized, new_error)`` with ``new_error = y - dequantize(quantized)``, so that the sum
    of the dequantized outputs over calls tracks the sum of the inputs up to the last residual."""
    y = x.to(_compute_dtype(x))
    if error is not None:
        y = y + error.to(y.dtype)
    qt = quantize(y, fmt, scale_mode=scale_mode, block_size=block_size, stochastic=stochastic, generator=generator,
                  noise=noise)
    return qt, y - dequantize(qt)


# --------------------------------------------------------------------------------------------------
# INT4 packing
# --------------------------------------------------------------------------------------------------


def pack_int4(codes: Tensor) -> Tensor:
    """Pack int4 codes (an integer tensor with values in [-8, 7]) two per byte along the last dimension: byte =
    (c[2k] + 8) | (c[2k+1] + 8) << 4. An odd last dimension is padded with a zero code. Returns uint8 of shape
    ``(..., ceil(n / 2))``."""
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"pack_int4 takes integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("pack_int4: codes must be in [-8, 7]")
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = F.pad(u, (0, 1), value=8)  # a zero code
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor, n: int) -> Tensor:
    """Undo :func:`pack_int4`: int8 codes of shape ``(..., n)``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 takes the uint8 output of pack_int4, got {packed.dtype}")
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :n]


# --------------------------------------------------------------------------------------------------
# Sizes and seeding
# --------------------------------------------------------------------------------------------------


def quantized_nbytes(shape: tuple[int, int], fmt: str, scale_mode: str = "block", block_size: int = 128,
                     scale_bytes: int = 4) -> tuple[int, int]:
    """``(data_bytes, scale_bytes)`` of a quantized ``(rows, cols)`` tensor (int4: ceil(cols/2) bytes per row)."""
    fmt = normalize_format(fmt)
    _check_scale_mode(scale_mode, block_size)
    rows, cols = shape
    data = rows * math.ceil(cols / 2) if fmt == "int4" else rows * cols
    n_scales = {"tensor": 1, "row": rows, "block": rows * math.ceil(cols / block_size)}[scale_mode]
    return data, n_scales * scale_bytes


def mix_seed(*values: int) -> int:
    """A 64-bit seed from integers, counter-based (the seed for (base seed, parameter, step) needs no stored
    generator state): ``h = 0``, then for each value ``h = fmix(h + 0x9E3779B97F4A7C15 + value)`` modulo 2^64, where
    ``fmix`` is SplitMix64's finaliser (``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
    z *= 0x94D049BB133111EB; z ^= z >> 31``)."""
    h = 0
    for value in values:
        z = (h + 0x9E3779B97F4A7C15 + (int(value) & _MASK64)) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h


def sr_generator(*counters: int, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``mix_seed(*counters)``, e.g. ``sr_generator(seed, step)``."""
    generator = torch.Generator(device=device if device is not None else "cpu")
    generator.manual_seed(mix_seed(*counters))
    return generator
