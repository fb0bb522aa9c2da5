"""ECO's requantize step in one pass (scales, rounding onto the grid, the held weight and the error-feedback term), a
plain quantize / dequantize pair, and a torch port of Triton's Philox ``tl.rand`` so both paths draw the same noise.

:func:`requantize` takes ``th~`` (a 2-D float32 tensor, float64 for a float64 parameter; *theta* below), and per
scale group (one row for ``scale_mode="row"``; ``block_size`` contiguous elements of a row for ``"block"``, the last
block of a row possibly shorter; the whole tensor for ``"tensor"``)::

    scale = absmax(theta[group]) / qmax            (1 for an all-zero group; qmax = 127, 7 or 448)
    y     = theta / scale
    code  = round(y)                               round to nearest, ties to even
          = floor(y + u)                           stochastic rounding, u = tl.rand(seed, flat index) in [0, 1)
                                                   (FP8: the same on y / ulp(y), times ulp(y); ulp(y) =
                                                   2^(max(floor(log2|y|), -6) - 3)); clamped to [-qmax, qmax]
    held  = (code * scale).to(param.dtype)  -> param
    scale                                   -> scale
    e     = theta - held                    -> theta   (the error-feedback term, in theta's dtype)

These are exactly the semantics of ``hfx_optim.quantize.compute_scale`` / ``fake_quantize``: the torch reference and
the Triton kernel do the same IEEE operations in the same order (divisions rounded to nearest, no fused multiply-add)
and draw the same noise, so their results are bit-identical. ``e`` is the correctly rounded ``theta - held``, hence
``held + e == theta`` exactly whenever that difference is representable, which is always the case with
round-to-nearest (Sterbenz) and almost always with stochastic rounding (not when a value below a third of a grid step
is rounded up to the step).

Formats: ``"int8"`` (codes in [-127, 127]), ``"int4"`` ([-7, 7], stored two per byte, low nibble first, offset by 8;
an odd row is padded with a zero code) and ``"fp8_e4m3"`` (the values of ``torch.float8_e4m3fn``; the kernels encode
and decode its bytes themselves, so :func:`requantize` does not need the torch dtype and any GPU can run it).

Stochastic rounding draws ``u = tl.rand(seed, i)`` for the element at flat (row-major) index ``i``: Philox4x32-10 with
the 64-bit ``seed`` as key and ``i`` as counter, exactly as Triton implements it. :func:`philox_uniform` reproduces
``tl.rand`` bit for bit in torch, so the reference and the kernel agree on CPU and CUDA alike, and the noise does not
depend on the device, the block size or the launch grid.

Memory floor (one pass, bytes per element): read theta (4), write the parameter (2 for bfloat16, 1 with FP8 storage)
and e (4), plus one scale per group: 10 B for a bfloat16 parameter. ``"block"`` scales are computed in registers (one
program quantizes several whole blocks); ``"row"`` scales too when a row fits one tile (<= :data:`MAX_TILE` elements),
otherwise a program reads its row twice (absmax, then quantize; the second read is mostly served by the cache);
``"tensor"`` runs as a single row of ``rows * cols`` elements, i.e. on one program: correct, but slow for large
tensors on a GPU (prefer ``"row"`` or ``"block"``). Measured on an H100 (8192 x 8192 float32 theta, bfloat16
parameter, FP8 grid): 0.30 ms (2.3 TB/s at 10 B/element) with 1 x 128 blocks and round-to-nearest, 0.38 ms (1.8 TB/s)
with stochastic rounding, 0.38-0.42 ms with row scales; the torch path takes 3.6 ms, and about 0.8 s with stochastic
rounding (its Philox port runs as some 260 elementwise int64 ops).

Example::

    from hfx_kernels.quantize import requantize, quantize, dequantize

    theta = w.float() - lr * update                       # th~ of a bfloat16 weight w (rows, cols)
    scale = torch.empty(w.shape[0], math.ceil(w.shape[1] / 128))
    e = requantize(w, theta, scale, fmt="int8", scale_mode="block", block_size=128, seed=1234)
    # w now holds q(th~) in bfloat16, scale its scales, e (= theta's buffer) th~ - w

    codes, scale = quantize(x, "int4", scale_mode="row")  # uint8, two codes per byte; float32 scales
    x_hat = dequantize(codes, scale, "int4", cols=x.shape[1], scale_mode="row")
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hfx_kernels._backend import check_contiguous, compute_dtype, tl, triton, use_triton

__all__ = [
    "FORMATS",
    "MAX_TILE",
    "SCALE_MODES",
    "dequantize",
    "dequantize_reference",
    "dequantize_triton",
    "pack_int4",
    "philox_randint",
    "philox_uniform",
    "quantize",
    "quantize_reference",
    "quantize_triton",
    "requantize",
    "requantize_reference",
    "requantize_triton",
    "scale_shape",
    "sr_noise",
    "unpack_int4",
]

FORMATS = ("int8", "int4", "fp8_e4m3")
SCALE_MODES = ("tensor", "row", "block")
_QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0}
_ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3", "fp8_e4m3fn": "fp8_e4m3"}

# Widest scale group quantized from registers in one pass; a longer row is read twice (absmax, then quantize).
MAX_TILE = 4096
# Elements one program of the one-pass kernel covers (several small blocks per program).
TILE = 1024
# Elements one program of the dequantize kernel covers.
DEQUANT_BLOCK = 1024
# Tensors of at least this many elements are indexed with int64 in the kernels.
INT64_INDEX_AT = 2**31 - 1


# --------------------------------------------------------------------------------------------------
# Philox: a torch port of Triton's tl.randint / tl.rand
# --------------------------------------------------------------------------------------------------

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's: the largest float32 with (2^31 - 1) * scale < 1
_PHILOX_CHUNK = 1 << 18


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(a * b) >> 32`` and ``(a * b) mod 2^32`` for a 32-bit constant ``a`` and int64 ``b`` in [0, 2^32). The
    product needs 64 unsigned bits: int64 multiplication wraps modulo 2^64 (two's complement), which keeps exactly
    those bits, so one multiply and two masks recover both halves."""
    product = b * a
    return (product >> 32).bitwise_and_(_M32), product.bitwise_and_(_M32)


def _philox_chunk(seed: int, offsets: Tensor, n_rounds: int) -> Tensor:
    c0 = offsets & _M32
    c1 = offsets >> 32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = hi_a.bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = lo_b, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0


def philox_randint(seed: int, offsets: Tensor, n_rounds: int = PHILOX_ROUNDS) -> Tensor:
    """Triton's ``tl.randint(seed, offsets)`` in torch, bit for bit: Philox4x32 (``n_rounds`` rounds) with key
    ``(seed mod 2^32, seed >> 32 mod 2^32)`` and counter ``(offset mod 2^32, offset >> 32, 0, 0)``; returns the first
    output word as int64 in [0, 2^32) (Triton returns it as uint32). ``offsets`` are non-negative integers."""
    seed = int(seed) & _M64
    flat = offsets.reshape(-1).to(torch.int64)
    if flat.numel() and int(flat.min()) < 0:
        raise ValueError("philox_randint: offsets must be >= 0")
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), _PHILOX_CHUNK):  # chunks keep the int64 temporaries in cache
        out[start:start + _PHILOX_CHUNK] = _philox_chunk(seed, flat[start:start + _PHILOX_CHUNK], n_rounds)
    return out.reshape(offsets.shape)


def philox_uniform(seed: int, offsets: Tensor, n_rounds: int = PHILOX_ROUNDS) -> Tensor:
    """Triton's ``tl.rand(seed, offsets)`` in torch, bit for bit: float32 in [0, 1). The Philox word ``x`` read as an
    int32 is folded to ``x if x >= 0 else ~x`` and multiplied (in float32) by 4.6566127342e-10."""
    x = philox_randint(seed, offsets, n_rounds)
    x = torch.where(x >= 1 << 31, _M32 - x, x)  # ~x of the int32 reading
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def sr_noise(seed: int, shape: tuple[int, ...] | torch.Size, *, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32, offset: int = 0) -> Tensor:
    """The stochastic-rounding noise the kernels draw for a tensor of ``shape``: ``tl.rand(seed, i)`` for the element
    at row-major index ``i``, as ``dtype`` (exact: the values are float32). ``offset`` shifts the indices: the noise
    of rows ``r0..`` of a larger row-major tensor (a row shard) is ``sr_noise(seed, shard_shape, offset=r0 * cols)``,
    the same numbers the whole tensor gets there."""
    numel = math.prod(shape)
    return philox_uniform(seed, torch.arange(offset, offset + numel, device=device)).reshape(shape).to(dtype)


# --------------------------------------------------------------------------------------------------
# Shapes and checks
# --------------------------------------------------------------------------------------------------


def _normalize_format(fmt: str) -> str:
    name = _ALIASES.get(str(fmt).lower().removeprefix("torch."), str(fmt).lower())
    if name not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(repr(f) for f in FORMATS)}")
    return name


def _check_mode(scale_mode: str, block_size: int) -> None:
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}: use one of {', '.join(repr(s) for s in SCALE_MODES)}")
    if scale_mode == "block" and (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1):
        raise ValueError(f"block_size must be a positive int (e.g. 128), got {block_size!r}")


def scale_shape(shape: tuple[int, int] | torch.Size, scale_mode: str = "block", block_size: int = 128) -> tuple[int, int]:
    """The shape of the scales of a ``(rows, cols)`` tensor: (1, 1), (rows, 1) or (rows, ceil(cols / block_size))."""
    _check_mode(scale_mode, block_size)
    rows, cols = shape
    return {"tensor": (1, 1), "row": (rows, 1), "block": (rows, math.ceil(cols / block_size))}[scale_mode]


def _layout(shape: tuple[int, int], scale_mode: str, block_size: int) -> tuple[tuple[int, int], int]:
    """``((rows, cols) as the kernel sees it, group width)``: "tensor" is one row of rows*cols elements."""
    rows, cols = shape
    if scale_mode == "tensor":
        rows, cols = 1, rows * cols
    width = block_size if scale_mode == "block" else max(cols, 1)
    return (rows, cols), width


def _check_2d(x: Tensor, what: str, kernel: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{kernel}: {what} must be 2-D (rows, cols), got shape {tuple(x.shape)}; reshape it first, "
                         "e.g. x.reshape(x.shape[0], -1)")


def _check_noise(x: Tensor, seed: int | None, noise: Tensor | None, kernel: str) -> None:
    if seed is not None and noise is not None:
        raise ValueError(f"{kernel}: pass seed (Philox noise drawn in the kernel) or noise (a tensor), not both")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64):
        raise ValueError(f"{kernel}: seed must be an int in [0, 2**64), got {seed!r}")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"{kernel}: noise must have the shape of theta, {tuple(x.shape)}; got {tuple(noise.shape)}")


def _check_requantize(param, theta, scale, fmt, scale_mode, block_size, seed, noise) -> str:
    fmt = _normalize_format(fmt)
    _check_mode(scale_mode, block_size)
    _check_2d(theta, "theta", "requantize")
    if theta.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"requantize: theta must be float32 or float64 (the compute dtype), got {theta.dtype}")
    if param.shape != theta.shape:
        raise ValueError(f"requantize: param has shape {tuple(param.shape)}, theta {tuple(theta.shape)}")
    if theta.dtype != compute_dtype(param.dtype):
        raise ValueError(f"requantize: theta must be {compute_dtype(param.dtype)} for a {param.dtype} parameter, got "
                         f"{theta.dtype}")
    want = scale_shape(theta.shape, scale_mode, block_size)
    if tuple(scale.shape) != want:
        raise ValueError(f"requantize: scale must have shape {want} for scale_mode={scale_mode!r}, got "
                         f"{tuple(scale.shape)}")
    _check_noise(theta, seed, noise, "requantize")
    return fmt


# --------------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------------


def _groups(x: Tensor, width: int) -> Tensor:
    """``x`` (rows, cols) as (rows, n_groups, width), zero-padded at the end of each row."""
    rows, cols = x.shape
    n_groups = max(math.ceil(cols / width), 1)
    pad = n_groups * width - cols
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(rows, n_groups, width)


def _ungroup(x: Tensor, cols: int) -> Tensor:
    return x.reshape(x.shape[0], -1)[:, :cols]


def _fp8_ulp(y: Tensor) -> Tensor:
    _, exponent = torch.frexp(y)  # floor(log2|y|) = exponent - 1
    return torch.ldexp(torch.ones_like(y), (exponent - 1).clamp_(min=-6) - 3)


def _round_reference(y: Tensor, fmt: str, u: Tensor | None) -> Tensor:
    """``y`` (already divided by its scale) rounded onto the grid of ``fmt`` and clamped: the grid values."""
    qmax = _QMAX[fmt]
    if fmt == "fp8_e4m3":
        ulp = _fp8_ulp(y)
        z = y / ulp
        z = torch.round(z) if u is None else torch.floor(z + u)
        return (z * ulp).clamp_(-qmax, qmax)
    z = torch.round(y) if u is None else torch.floor(y + u)
    return z.clamp_(-qmax, qmax)


def _noise_reference(x: Tensor, seed: int | None, noise: Tensor | None) -> Tensor | None:
    if noise is not None:
        return noise.to(x.dtype)
    if seed is not None:
        return sr_noise(seed, x.shape, device=x.device, dtype=x.dtype)
    return None


def _grid_reference(x: Tensor, fmt: str, scale_mode: str, block_size: int, seed, noise):
    """(grid values (rows, n_groups, width), scales (rows, n_groups), group width) of a 2-D compute-dtype ``x``."""
    (rows, cols), width = _layout(tuple(x.shape), scale_mode, block_size)
    x = x.reshape(rows, cols)
    u = _noise_reference(x, seed, None if noise is None else noise.reshape(rows, cols))
    absmax = _groups(x.abs(), width).amax(dim=2)
    scale = torch.where(absmax > 0, absmax / _QMAX[fmt], torch.ones_like(absmax))
    y = _groups(x, width) / scale.unsqueeze(-1)
    return _round_reference(y, fmt, None if u is None else _groups(u, width)), scale, width


def requantize_reference(param: Tensor, theta: Tensor, scale: Tensor, *, fmt: str = "int8", scale_mode: str = "block",
                         block_size: int = 128, seed: int | None = None, noise: Tensor | None = None) -> Tensor:
    """The requantize step in plain torch (see the module docstring): writes ``q(theta)`` into ``param`` (its dtype),
    the scales into ``scale`` and ``e = theta - param`` into ``theta``; returns ``theta``."""
    fmt = _check_requantize(param, theta, scale, fmt, scale_mode, block_size, seed, noise)
    if not theta.numel():
        scale.fill_(1.0)
        return theta
    q, s, _ = _grid_reference(theta, fmt, scale_mode, block_size, seed, noise)
    held = _ungroup(q * s.unsqueeze(-1), theta.numel() // s.shape[0]).reshape(theta.shape).to(param.dtype)
    param.copy_(held)
    scale.copy_(s.reshape(scale.shape))
    return theta.sub_(held.to(theta.dtype))


def pack_int4(codes: Tensor) -> Tensor:
    """Int4 codes (integers in [-8, 7]) two per byte along the last dimension: byte = (c[2k] + 8) | (c[2k+1] + 8) << 4;
    an odd last dimension is padded with a zero code. Returns uint8 of shape ``(..., ceil(n / 2))``."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor, n: int) -> Tensor:
    """Undo :func:`pack_int4`: int8 codes of shape ``(..., n)``."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :n]


def _check_quantize(x, fmt, scale_mode, block_size, seed, noise, kernel) -> str:
    fmt = _normalize_format(fmt)
    _check_mode(scale_mode, block_size)
    _check_2d(x, "x", kernel)
    if not (x.is_floating_point() and x.dtype.itemsize >= 2):
        raise ValueError(f"{kernel}: x must be float16/bfloat16/float32/float64, got {x.dtype}")
    if fmt == "fp8_e4m3" and not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(f"{kernel}: fp8_e4m3 codes need torch.float8_e4m3fn (torch >= 2.1); use 'int8'")
    _check_noise(x, seed, noise, kernel)
    return fmt


def quantize_reference(x: Tensor, fmt: str = "int8", *, scale_mode: str = "block", block_size: int = 128,
                       seed: int | None = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(codes, scale)`` of a 2-D ``x`` in plain torch: int8 codes, uint8 (two int4 codes per byte) or float8_e4m3fn;
    scales of :func:`scale_shape` in float32 (float64 for float64 ``x``). Rounding as in :func:`requantize`."""
    fmt = _check_quantize(x, fmt, scale_mode, block_size, seed, noise, "quantize")
    rows, cols = x.shape
    xc = x.to(compute_dtype(x.dtype))
    if not x.numel():
        q = torch.zeros(rows, cols, dtype=xc.dtype, device=x.device)
        s = torch.ones(scale_shape(x.shape, scale_mode, block_size), dtype=xc.dtype, device=x.device)
    else:
        q, s, _ = _grid_reference(xc, fmt, scale_mode, block_size, seed, noise)
        q = _ungroup(q, xc.numel() // q.shape[0]).reshape(rows, cols)
        s = s.reshape(scale_shape(x.shape, scale_mode, block_size))
    if fmt == "int8":
        return q.to(torch.int8), s
    if fmt == "int4":
        return pack_int4(q.to(torch.int8)), s
    return q.to(torch.float8_e4m3fn), s


def _check_dequantize(codes, scale, fmt, cols, scale_mode, block_size) -> tuple[str, int]:
    fmt = _normalize_format(fmt)
    _check_mode(scale_mode, block_size)
    _check_2d(codes, "codes", "dequantize")
    want_dtype = {"int8": torch.int8, "int4": torch.uint8, "fp8_e4m3": getattr(torch, "float8_e4m3fn", None)}[fmt]
    if codes.dtype != want_dtype:
        raise ValueError(f"dequantize: {fmt} codes must be {want_dtype}, got {codes.dtype}")
    if cols is None:
        cols = codes.shape[1] * (2 if fmt == "int4" else 1)
    if codes.shape[1] != (math.ceil(cols / 2) if fmt == "int4" else cols):
        raise ValueError(f"dequantize: codes of shape {tuple(codes.shape)} do not hold {cols} {fmt} columns")
    want = scale_shape((codes.shape[0], cols), scale_mode, block_size)
    if tuple(scale.shape) != want:
        raise ValueError(f"dequantize: scale must have shape {want} for scale_mode={scale_mode!r}, got "
                         f"{tuple(scale.shape)}")
    return fmt, cols


def dequantize_reference(codes: Tensor, scale: Tensor, fmt: str = "int8", *, cols: int | None = None,
                         scale_mode: str = "block", block_size: int = 128, dtype: torch.dtype | None = None) -> Tensor:
    """``codes * scale`` in plain torch, in ``dtype`` (default: the scale's dtype). ``cols``: the number of columns
    (needed for int4 codes of an odd row; default: all that ``codes`` holds)."""
    fmt, cols = _check_dequantize(codes, scale, fmt, cols, scale_mode, block_size)
    rows = codes.shape[0]
    values = unpack_int4(codes, cols) if fmt == "int4" else codes
    values = values.to(scale.dtype)
    (r, c), width = _layout((rows, cols), scale_mode, block_size)
    if not values.numel():
        return torch.empty((rows, cols), dtype=dtype or scale.dtype, device=codes.device)
    out = _ungroup(_groups(values.reshape(r, c), width) * scale.reshape(r, -1, 1), c).reshape(rows, cols)
    return out if dtype is None else out.to(dtype)


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _div(a, b, F64: tl.constexpr):
        """IEEE division rounded to nearest (plain ``/`` on float32 is approximate on NVIDIA GPUs)."""
        if F64:
            return a / b
        else:
            return tl.math.div_rn(a, b)

    @triton.jit
    def _round_half_even(z, F64: tl.constexpr):
        """``torch.round`` for |z| < 2^22 (float32) / 2^51 (float64): adding and removing 1.5 * 2^mantissa bits
        rounds to an integer, ties to even; a zero result keeps z's sign, as torch.round does."""
        if F64:  # noqa: SIM108 - a compile-time branch
            r = (z + 6755399441055744.0) - 6755399441055744.0
        else:
            r = (z + 12582912.0) - 12582912.0
        return tl.where(r == 0.0, z * 0.0, r)

    @triton.jit
    def _exponent(y, F64: tl.constexpr):
        """``floor(log2|y|)`` from the exponent bits (the bias for zero and subnormals, which callers clamp)."""
        if F64:
            return ((y.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
        else:
            return ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127

    @triton.jit
    def _pow2(e, F64: tl.constexpr):
        """``2^e`` for an integer tensor ``e`` in the normal range."""
        if F64:
            return ((e.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
        else:
            return ((e.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _grid_values(x, scale, offs, mask, seed, noise_ptr, QMAX: tl.constexpr, IS_FP8: tl.constexpr,
                     NOISE: tl.constexpr, F64: tl.constexpr):
        """The grid values of ``x / scale`` (nearest or stochastic rounding, clamped), in x's dtype."""
        y = _div(x, scale, F64)
        if NOISE == 1:
            u = tl.rand(seed, offs).to(x.dtype)
        elif NOISE == 2:
            u = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(x.dtype)
        if IS_FP8:
            e = tl.maximum(_exponent(y, F64), -6)
            z = y * _pow2(3 - e, F64)  # y / ulp(y), exact
            if NOISE == 0:  # noqa: SIM108 - a compile-time branch
                z = _round_half_even(z, F64)
            else:
                z = tl.floor(z + u)
            q = z * _pow2(e - 3, F64)
        else:
            if NOISE == 0:  # noqa: SIM108 - a compile-time branch
                q = _round_half_even(y, F64)
            else:
                q = tl.floor(y + u)
        return tl.minimum(tl.maximum(q, -QMAX), QMAX)

    @triton.jit
    def _to_dtype(v, dtype: tl.constexpr):
        """``v.to(dtype)``, rounding to nearest even. A cast to bfloat16 is rounded by hand first (bit arithmetic, for
        normal values), after which it is exact: Triton's interpreter truncates it (and cannot cast float64 to
        bfloat16), a GPU rounds it to nearest even."""
        if dtype == tl.bfloat16:
            if v.dtype == tl.float64:
                bits = v.to(tl.int64, bitcast=True)
                bits = (bits + (0xFFFFFFFFFFF + ((bits >> 45) & 1))) & -35184372088832
                v = bits.to(tl.float64, bitcast=True).to(tl.float32)
            else:
                bits = v.to(tl.int32, bitcast=True)
                bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
                v = bits.to(tl.float32, bitcast=True)
        return v.to(dtype)

    @triton.jit
    def _fp8_bits(q, F64: tl.constexpr):
        """The float8_e4m3fn byte of a value on its grid (|q| <= 448), sign of zero included."""
        if F64:
            bits = q.to(tl.int64, bitcast=True)
            sign = (bits >> 63) & 1
            normal = ((((bits >> 52) & 0x7FF) - 1016) << 3) | ((bits >> 49) & 7)
        else:
            bits = q.to(tl.int32, bitcast=True)
            sign = (bits >> 31) & 1
            normal = ((((bits >> 23) & 0xFF) - 120) << 3) | ((bits >> 20) & 7)
        a = tl.abs(q)
        subnormal = (a * 512.0).to(tl.int32)  # a = m * 2^-9, m in 0..7
        byte = tl.where(a >= 0.015625, normal, subnormal) | (sign << 7)
        return byte.to(tl.uint8)

    @triton.jit
    def _finish_tile(x, scale, row, col0, c, j, gmask, mask, offs, x_ptr, p_ptr, c_ptr, noise_ptr, seed, width, n_cols,
                     c_row_stride, QMAX: tl.constexpr, IS_FP8: tl.constexpr, NOISE: tl.constexpr,
                     WRITE_P: tl.constexpr, WRITE_ERR: tl.constexpr, CODES: tl.constexpr, G: tl.constexpr,
                     WP: tl.constexpr, F64: tl.constexpr):
        """Round a [G, WP] tile whose scales are known and write what was asked for."""
        q = _grid_values(x, scale, offs, mask, seed, noise_ptr, QMAX, IS_FP8, NOISE, F64)
        if WRITE_P:
            held = _to_dtype(q * scale, p_ptr.dtype.element_ty)
            tl.store(p_ptr + offs, held, mask=mask)
            if WRITE_ERR:
                tl.store(x_ptr + offs, x - held.to(x.dtype), mask=mask)
        if CODES == 1:  # int8 codes
            tl.store(c_ptr + row * c_row_stride + col0 + c + j, q.to(tl.int8), mask=mask)
        elif CODES == 2:  # int4, two per byte (the tile starts at an even column)
            lo, hi = tl.split((q.to(tl.int32) + 8).reshape(G, WP // 2, 2))
            pair = c + 2 * tl.arange(0, WP // 2)[None, :]
            bmask = gmask & (pair < width) & (col0 + pair < n_cols)
            tl.store(c_ptr + row * c_row_stride + (col0 + pair) // 2, (lo | (hi << 4)).to(tl.uint8), mask=bmask)
        elif CODES == 3:  # float8_e4m3fn bytes
            tl.store(c_ptr + row * c_row_stride + col0 + c + j, _fp8_bits(q, F64), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _requantize_kernel(x_ptr, p_ptr, s_ptr, c_ptr, noise_ptr, n_cols, groups_per_row, n_groups, width,
                           c_row_stride, seed, QMAX: tl.constexpr, IS_FP8: tl.constexpr, NOISE: tl.constexpr,
                           WRITE_P: tl.constexpr, WRITE_ERR: tl.constexpr, CODES: tl.constexpr, G: tl.constexpr,
                           WP: tl.constexpr, ONE_PASS: tl.constexpr, BIG: tl.constexpr):
        F64: tl.constexpr = x_ptr.dtype.element_ty == tl.float64
        g = tl.program_id(0) * G + tl.arange(0, G)
        if BIG:
            g = g.to(tl.int64)
        gmask = (g < n_groups)[:, None]
        row = (g // groups_per_row)[:, None]
        col0 = ((g % groups_per_row) * width)[:, None]
        j = tl.arange(0, WP)[None, :]
        if ONE_PASS:  # each group fits the tile: its scale from registers
            mask = gmask & (j < width) & (col0 + j < n_cols)
            offs = row * n_cols + col0 + j
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            absmax = tl.max(tl.abs(x), axis=1, keep_dims=True)
            scale = tl.where(absmax > 0, _div(absmax, tl.full(absmax.shape, QMAX, absmax.dtype), F64), 1.0)
            tl.store(s_ptr + g[:, None], scale.to(s_ptr.dtype.element_ty), mask=gmask)
            _finish_tile(x, scale, row, col0, 0, j, gmask, mask, offs, x_ptr, p_ptr, c_ptr, noise_ptr, seed, width, n_cols,
                         c_row_stride, QMAX, IS_FP8, NOISE, WRITE_P, WRITE_ERR, CODES, G, WP, F64)
        else:  # G == 1, a long group: absmax over the chunks, then quantize them
            amax = tl.zeros((G, WP), dtype=x_ptr.dtype.element_ty)
            for c in range(0, width, WP):
                mask = gmask & (c + j < width) & (col0 + c + j < n_cols)
                x = tl.load(x_ptr + row * n_cols + col0 + c + j, mask=mask, other=0.0)
                amax = tl.maximum(amax, tl.abs(x))
            absmax = tl.max(amax, axis=1, keep_dims=True)
            scale = tl.where(absmax > 0, _div(absmax, tl.full(absmax.shape, QMAX, absmax.dtype), F64), 1.0)
            tl.store(s_ptr + g[:, None], scale.to(s_ptr.dtype.element_ty), mask=gmask)
            for c in range(0, width, WP):
                mask = gmask & (c + j < width) & (col0 + c + j < n_cols)
                offs = row * n_cols + col0 + c + j
                x = tl.load(x_ptr + offs, mask=mask, other=0.0)
                _finish_tile(x, scale, row, col0, c, j, gmask, mask, offs, x_ptr, p_ptr, c_ptr, noise_ptr, seed, width,
                             n_cols, c_row_stride, QMAX, IS_FP8, NOISE, WRITE_P, WRITE_ERR, CODES, G, WP, F64)

    @triton.jit
    def _dequantize_kernel(c_ptr, s_ptr, out_ptr, numel, n_cols, groups_per_row, width, c_row_stride,
                           FMT: tl.constexpr, BLOCK: tl.constexpr, BIG: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if BIG:
            offs = offs.to(tl.int64)
        mask = offs < numel
        row = offs // n_cols
        col = offs % n_cols
        s = tl.load(s_ptr + row * groups_per_row + col // width, mask=mask, other=1.0)
        if FMT == 1:  # int8
            v = tl.load(c_ptr + row * c_row_stride + col, mask=mask, other=0).to(s.dtype)
        elif FMT == 2:  # int4, two per byte
            b = tl.load(c_ptr + row * c_row_stride + col // 2, mask=mask, other=0).to(tl.int32)
            v = (tl.where(col % 2 == 0, b & 15, b >> 4) - 8).to(s.dtype)
        else:  # float8_e4m3fn bytes
            b = tl.load(c_ptr + row * c_row_stride + col, mask=mask, other=0).to(tl.int32)
            e = (b >> 3) & 15
            m = (b & 7).to(s.dtype)
            big = (m + 8.0) * ((tl.maximum(e, 1) + 117) << 23).to(tl.float32, bitcast=True).to(s.dtype)
            v = tl.where(e == 0, m * 0.001953125, big)
            nan = tl.full(v.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True).to(s.dtype)
            v = tl.where((b & 0x7F) == 0x7F, nan, v)
            v = v * tl.where((b & 0x80) != 0, -1.0, 1.0)  # not -v: Triton negates as 0 - v, losing -0.0
        tl.store(out_ptr + offs, _to_dtype(v * s, out_ptr.dtype.element_ty), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _launch(x: Tensor, p: Tensor | None, s: Tensor, codes: Tensor | None, code_kind: int, c_row_stride: int, *,
            fmt: str, scale_mode: str, block_size: int, seed: int | None, noise: Tensor | None) -> None:
    (rows, cols), width = _layout(tuple(x.shape), scale_mode, block_size)
    one_pass = width <= MAX_TILE
    wp = max(_next_pow2(width), 2) if one_pass else max(_next_pow2(min(MAX_TILE, TILE)), 2)
    groups_per_row = math.ceil(cols / width) if scale_mode == "block" else 1
    n_groups = rows * groups_per_row
    g = max(1, min(TILE // wp, _next_pow2(n_groups))) if one_pass else 1
    big = max(x.numel(), 0 if codes is None else codes.numel()) >= INT64_INDEX_AT
    noise_kind = 2 if noise is not None else 1 if seed is not None else 0
    _requantize_kernel[(triton.cdiv(n_groups, g),)](
        x, p if p is not None else x, s, codes if codes is not None else x, noise if noise is not None else x, cols,
        groups_per_row, n_groups, width, c_row_stride, seed if seed is not None else 0,
        QMAX=_QMAX[fmt], IS_FP8=fmt == "fp8_e4m3", NOISE=noise_kind, WRITE_P=p is not None, WRITE_ERR=p is not None,
        CODES=code_kind, G=g, WP=wp, ONE_PASS=one_pass, BIG=big, enable_fp_fusion=False,
    )


def requantize_triton(param: Tensor, theta: Tensor, scale: Tensor, *, fmt: str = "int8", scale_mode: str = "block",
                      block_size: int = 128, seed: int | None = None, noise: Tensor | None = None) -> Tensor:
    """The Triton implementation of :func:`requantize_reference` (same arguments, bit-identical results)."""
    fmt = _check_requantize(param, theta, scale, fmt, scale_mode, block_size, seed, noise)
    check_contiguous([param, theta, scale] + ([noise] if noise is not None else []),
                     "(param, theta, scale, noise)", "requantize")
    if not theta.numel():
        scale.fill_(1.0)
        return theta
    _launch(theta, param, scale, None, 0, 0, fmt=fmt, scale_mode=scale_mode, block_size=block_size, seed=seed,
            noise=noise)
    return theta


def quantize_triton(x: Tensor, fmt: str = "int8", *, scale_mode: str = "block", block_size: int = 128,
                    seed: int | None = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The Triton implementation of :func:`quantize_reference` (same arguments, bit-identical results). INT4 codes
    are packed in the kernel, except with an odd ``block_size`` (blocks then straddle bytes): the kernel writes int8
    codes and torch packs them."""
    fmt = _check_quantize(x, fmt, scale_mode, block_size, seed, noise, "quantize")
    check_contiguous([x] + ([noise] if noise is not None else []), "(x, noise)", "quantize")
    rows, cols = x.shape
    xc = x.to(compute_dtype(x.dtype))
    s = torch.ones(scale_shape(x.shape, scale_mode, block_size), dtype=xc.dtype, device=x.device)
    # in-kernel packing needs every tile to start at an even column of a row
    packed_in_kernel = fmt == "int4" and not ((scale_mode == "block" and block_size % 2)
                                              or (scale_mode == "tensor" and cols % 2))
    if packed_in_kernel:
        codes = torch.full((rows, math.ceil(cols / 2)), 0x88, dtype=torch.uint8, device=x.device)
        kind, stride = 2, codes.shape[1]
    else:
        codes = torch.zeros((rows, cols), dtype=torch.int8 if fmt != "fp8_e4m3" else torch.uint8, device=x.device)
        kind, stride = (3 if fmt == "fp8_e4m3" else 1), cols
    if x.numel():
        _launch(xc, None, s, codes, kind, stride, fmt=fmt, scale_mode=scale_mode, block_size=block_size, seed=seed,
                noise=noise)
    if fmt == "fp8_e4m3":
        return codes.view(torch.float8_e4m3fn), s
    if fmt == "int4" and not packed_in_kernel:
        return pack_int4(codes), s
    return codes, s


def dequantize_triton(codes: Tensor, scale: Tensor, fmt: str = "int8", *, cols: int | None = None,
                      scale_mode: str = "block", block_size: int = 128, dtype: torch.dtype | None = None) -> Tensor:
    """The Triton implementation of :func:`dequantize_reference` (same arguments, bit-identical results)."""
    fmt, cols = _check_dequantize(codes, scale, fmt, cols, scale_mode, block_size)
    check_contiguous([codes, scale], "(codes, scale)", "dequantize")
    rows = codes.shape[0]
    out = torch.empty((rows, cols), dtype=dtype or scale.dtype, device=codes.device)
    if not out.numel():
        return out
    (r, c), width = _layout((rows, cols), scale_mode, block_size)
    groups_per_row = math.ceil(c / width) if scale_mode == "block" else 1
    if scale_mode == "tensor" and fmt == "int4" and cols % 2:  # int4 bytes of odd rows: not one flat row
        codes = pack_int4(unpack_int4(codes, cols).reshape(1, -1))
    big = out.numel() >= INT64_INDEX_AT
    _dequantize_kernel[(triton.cdiv(out.numel(), DEQUANT_BLOCK),)](
        codes.view(torch.uint8) if fmt == "fp8_e4m3" else codes, scale, out, out.numel(), c, groups_per_row,
        width, codes.shape[1] if r > 1 else 0, FMT={"int8": 1, "int4": 2, "fp8_e4m3": 3}[fmt], BLOCK=DEQUANT_BLOCK, BIG=big,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def requantize(param: Tensor, theta: Tensor, scale: Tensor, *, fmt: str = "int8", scale_mode: str = "block",
               block_size: int = 128, seed: int | None = None, noise: Tensor | None = None) -> Tensor:
    """ECO's requantize step, in place (see the module docstring): ``param`` (2-D, any float dtype) receives
    ``q(theta)``, ``scale`` (shape :func:`scale_shape`) its scales, and ``theta`` (2-D, float32; float64 for a float64
    parameter) the error ``e = theta - param``; returns ``theta``. ``seed`` (an int in [0, 2^64)) turns on stochastic
    rounding with the Philox noise ``tl.rand(seed, flat index)``; ``noise`` (theta's shape, values in [0, 1))
    supplies the noise instead; neither: round to nearest. Triton on CUDA, torch elsewhere."""
    impl = requantize_triton if use_triton([param, theta, scale], "requantize") else requantize_reference
    return impl(param, theta, scale, fmt=fmt, scale_mode=scale_mode, block_size=block_size, seed=seed, noise=noise)


def quantize(x: Tensor, fmt: str = "int8", *, scale_mode: str = "block", block_size: int = 128,
             seed: int | None = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(codes, scale)`` of a 2-D ``x``: int8 codes, uint8 with two int4 codes per byte (low nibble first, offset by
    8), or float8_e4m3fn; scales (float32, float64 for float64 ``x``) of :func:`scale_shape`. Rounding as in
    :func:`requantize`. Floor: read x, write 1 B (int4: 0.5 B) per element plus the scales. Triton on CUDA."""
    impl = quantize_triton if use_triton([x], "quantize") else quantize_reference
    return impl(x, fmt, scale_mode=scale_mode, block_size=block_size, seed=seed, noise=noise)


def dequantize(codes: Tensor, scale: Tensor, fmt: str = "int8", *, cols: int | None = None, scale_mode: str = "block",
               block_size: int = 128, dtype: torch.dtype | None = None) -> Tensor:
    """The values ``codes * scale`` of :func:`quantize`'s output, in ``dtype`` (default: the scale's dtype); ``cols``
    is the number of columns (int4 codes of an odd row hold one pad nibble). Floor: read 1 B (0.5 B) per element and
    the scales, write the values. Triton on CUDA."""
    impl = dequantize_triton if use_triton([codes, scale], "dequantize") else dequantize_reference
    return impl(codes, scale, fmt, cols=cols, scale_mode=scale_mode, block_size=block_size, dtype=dtype)
