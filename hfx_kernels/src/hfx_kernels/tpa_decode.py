"""TPA attention on the factor cache (Tensor Product Attention, Zhang et al., arXiv 2501.06425; spec C5), without
materialising K or V. The cache holds, per token t::

    K[b, t, h, :] = (1/Rk) sum_r a_k[b, t, h, r] * b_k[b, t, r, :]        a_k (B, Tk, H, Rk), b_k (B, Tk, Rk, D)
    V[b, t, h, :] = (1/Rv) sum_r a_v[b, t, h, r] * b_v[b, t, r, :]        a_v (B, Tk, H, Rv), b_v (B, Tk, Rv, D)

and the output is ordinary softmax attention, (B, H, Tq, D) in q's dtype::

    out[b, h, i] = sum_t softmax_t(scale * q[b, h, i] . K[b, t, h] + mask) V[b, t, h]

The Triton kernel contracts with the factors (FlashTPA-style decode): the logits are
``(scale/Rk) sum_r a_k[t, h, r] * (q_i . b_k[t, r])``, i.e. one small GEMM ``q . b_k[:, r]`` per rank, then the
per-head mix; the value side accumulates ``sum_r (p * a_v[:, h, r] / Rv) @ b_v[:, r]``. One program takes a block of
(head, query) rows of one batch row, so each b_k / b_v tile is read once for all heads, and an online softmax runs
over key blocks. Memory read per token: (Rk + Rv)(H + D) numbers instead of 2 H D. Forward only (decode).

Masks: None = bottom-right causal (query i sits at key position Tk - Tq + i; with Tq = 1 every key is visible); a
bool (True = attend) or 0 / -inf float mask broadcastable to (B, 1 or H, Tq, Tk). A row with no visible key gives 0.

Example::

    from hfx_kernels.tpa_decode import tpa_decode

    out = tpa_decode(q, cache.a_k, cache.b_k, cache.a_v, cache.b_v)   # q (B, H, 1, D): one decode step
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hfx_kernels._backend import compute_dtype, tl, tl_dtype, triton, use_triton
from hfx_kernels.softplus_attention import _dense_visible, _dot_args, _mask_args, _visible

__all__ = ["tpa_decode", "tpa_decode_reference", "tpa_decode_triton", "tpa_materialize"]

KERNEL = "tpa_decode"
BLOCK_M = 16  # (head, query) rows per program: decode has H * Tq rows per batch row
BLOCK_N = 64


def _check(q: Tensor, a_k: Tensor, b_k: Tensor, a_v: Tensor, b_v: Tensor) -> None:
    named = {"q": q, "a_k": a_k, "b_k": b_k, "a_v": a_v, "b_v": b_v}
    for name, t in named.items():
        if not isinstance(t, Tensor) or t.ndim != 4:
            raise ValueError(f"{KERNEL}: {name} must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise ValueError(f"{KERNEL}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{KERNEL}: {name} is on {t.device} but q is on {q.device}; put them on one device")
    b, h, _, d = q.shape
    tk = a_k.shape[1]
    for side, a, bf in (("k", a_k, b_k), ("v", a_v, b_v)):
        want_a, want_b = (b, tk, h, a.shape[3]), (b, tk, a.shape[3], d)
        if tuple(a.shape) != want_a or tuple(bf.shape) != want_b or a.shape[3] == 0:
            raise ValueError(f"{KERNEL}: with q {tuple(q.shape)} and {tk} cached tokens, a_{side} must be (B, Tk, H, "
                             f"R{side}) = {want_a} and b_{side} (B, Tk, R{side}, D) = {want_b} with R{side} >= 1; got "
                             f"a_{side} {tuple(a.shape)}, b_{side} {tuple(bf.shape)}")


def tpa_materialize(a: Tensor, b: Tensor) -> Tensor:
    """K (or V) from its factors: (1/R) sum_r a[b, t, h, r] b[b, t, r, :], returned as (B, H, T, D).

    a is divided by R *before* the contraction, so R·indicator head factors give exactly 1·b (TPA's GQA conversion
    is bit-exact)."""
    return torch.einsum("bthr,btrd->bhtd", a / a.shape[-1], b)


def tpa_decode_reference(q: Tensor, a_k: Tensor, b_k: Tensor, a_v: Tensor, b_v: Tensor, mask: Tensor | None = None,
                         *, scale: float | None = None) -> Tensor:
    """Materialise K and V from the factors, then eager softmax attention; float32 arithmetic (float64 for float64
    q), the result in q's dtype."""
    _check(q, a_k, b_k, a_v, b_v)
    bsz, h, tq, d = q.shape
    tk = a_k.shape[1]
    c = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = tpa_materialize(a_k.to(c), b_k.to(c))
    values = tpa_materialize(a_v.to(c), b_v.to(c))
    vis = _dense_visible(mask, (bsz, h, tq, tk), q.device, KERNEL)
    s = (scale * (q.to(c) @ keys.transpose(-1, -2))).masked_fill(~vis, -math.inf)
    alive = vis.any(-1, keepdim=True)
    p = torch.softmax(torch.where(alive, s, torch.zeros_like(s)), dim=-1) * alive
    return (p @ values).to(q.dtype)


if triton is not None:
    from hfx_kernels.softplus_attention import _dot

    @triton.jit
    def _tpa_decode_kernel(q_ptr, ak_ptr, bk_ptr, av_ptr, bv_ptr, m_ptr, o_ptr, scale, H, Tq, Tk, D, RK, RV,
                           ak_sb, ak_st, ak_sh, ak_sr, bk_sb, bk_st, bk_sr, bk_sd,
                           av_sb, av_st, av_sh, av_sr, bv_sb, bv_st, bv_sr, bv_sd,
                           m_sb, m_sh, m_sq, m_sk, HAS_MASK: tl.constexpr, OUT_DTYPE: tl.constexpr,
                           PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        # q and out are contiguous (B, H, Tq, D); the factors are read at their own strides (views of a packed cache)
        pid = tl.program_id(0)
        b64 = tl.program_id(1).to(tl.int64)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # flattened (head, query) rows of batch row b
        row_ok = rows < H * Tq
        hr = rows // Tq
        ir = rows % Tq
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_rows = b64 * H * Tq + rows
        q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        ak_ptr += b64 * ak_sb
        bk_ptr += b64 * bk_sb
        av_ptr += b64 * av_sb
        bv_ptr += b64 * bv_sb
        m_rows = b64 * m_sb + hr.to(tl.int64) * m_sh + ir.to(tl.int64) * m_sq
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start in range(0, Tk, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Tk
            tok = offs_n.to(tl.int64)
            ok = row_ok[:, None] & n_ok[None, :]
            if HAS_MASK:
                mv = tl.load(m_ptr + m_rows[:, None] + offs_n[None, :].to(tl.int64) * m_sk, mask=ok, other=0)
                vis = ok & (mv != 0)
            else:  # bottom-right causal
                vis = ok & (offs_n[None, :] <= ir[:, None] + (Tk - Tq))
            s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r in range(0, RK):  # q . b_k[:, r] first, then the head mix a_k[:, h, r]
                bk = tl.load(bk_ptr + tok[:, None] * bk_st + r * bk_sr + offs_d[None, :] * bk_sd,
                             mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                qb = _dot(q, tl.trans(bk), PRECISION, DOT_F32)
                ak = tl.load(ak_ptr + tok[None, :] * ak_st + hr[:, None] * ak_sh + r * ak_sr, mask=ok, other=0.0)
                s += qb * ak.to(tl.float32)
            s = tl.where(vis, s * (scale / RK), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            for r in range(0, RV):  # sum_r (p * a_v[:, h, r]) @ b_v[:, r]
                av = tl.load(av_ptr + tok[None, :] * av_st + hr[:, None] * av_sh + r * av_sr, mask=ok, other=0.0)
                bv = tl.load(bv_ptr + tok[:, None] * bv_st + r * bv_sr + offs_d[None, :] * bv_sd,
                             mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                acc += _dot((p * av.to(tl.float32)).to(bv.dtype), bv, PRECISION, DOT_F32)
            m_i = m_new
        out = acc * tl.where(l_i > 0, 1.0 / (tl.where(l_i > 0, l_i, 1.0) * RV), 0.0)[:, None]
        tl.store(o_ptr + q_rows[:, None] * D + offs_d[None, :], out.to(OUT_DTYPE), mask=row_ok[:, None] & d_ok[None, :])


def tpa_decode_triton(q: Tensor, a_k: Tensor, b_k: Tensor, a_v: Tensor, b_v: Tensor, mask: Tensor | None = None, *,
                      scale: float | None = None) -> Tensor:
    """The Triton implementation of :func:`tpa_decode_reference` (same arguments): float32/bfloat16/float16 q;
    factors of any float dtype (float64 ones are rejected) and any strides (views of a packed cache are read in place,
    not copied); a strided q is copied."""
    _check(q, a_k, b_k, a_v, b_v)
    if any(t.dtype not in (torch.float32, torch.bfloat16, torch.float16) for t in (q, a_k, b_k, a_v, b_v)):
        raise ValueError(f"{KERNEL}: the Triton kernel takes float32/bfloat16/float16 tensors; float64 runs the torch "
                         "reference (tpa_decode does that)")
    bsz, h, tq, d = q.shape
    tk, rk, rv = a_k.shape[1], a_k.shape[3], a_v.shape[3]
    if q.numel() == 0 or tk == 0:
        return torch.zeros_like(q)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # tl.dot needs one operand dtype: the b factors take q's (a copy only when they differ)
    q, b_k, b_v = q.contiguous(), b_k.to(q.dtype), b_v.to(q.dtype)
    m, (m_sb, m_sh, m_sq, m_sk), has_mask = _mask_args(_visible(mask, (bsz, h, tq, tk), q.device, KERNEL), q)
    out = torch.empty_like(q)
    _tpa_decode_kernel[(triton.cdiv(h * tq, BLOCK_M), bsz)](
        q, a_k, b_k, a_v, b_v, m, out, float(scale), h, tq, tk, d, rk, rv,
        *a_k.stride(), *b_k.stride(), *a_v.stride(), *b_v.stride(), m_sb, m_sh, m_sq, m_sk,
        HAS_MASK=has_mask, OUT_DTYPE=tl_dtype(q.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(d)), **_dot_args(q.dtype))
    return out


def tpa_decode(q: Tensor, a_k: Tensor, b_k: Tensor, a_v: Tensor, b_v: Tensor, mask: Tensor | None = None, *,
               scale: float | None = None) -> Tensor:
    """Softmax attention of q (B, H, Tq, D) over a TPA factor cache (a_k (B, Tk, H, Rk), b_k (B, Tk, Rk, D), a_v
    (B, Tk, H, Rv), b_v (B, Tk, Rv, D)) without materialising K/V; see the module docstring. Returns (B, H, Tq, D) in
    q's dtype. Triton on CUDA, torch elsewhere (and for float64). No autograd.

    >>> out = tpa_decode(q_step, a_k, b_k, a_v, b_v)  # doctest: +SKIP
    """
    _check(q, a_k, b_k, a_v, b_v)
    q = q.contiguous()  # a few query rows; the factors stay as they are (views of the packed cache: never copied)
    tensors = [q, a_k, b_k, a_v, b_v]
    with torch.no_grad():
        # the kernel takes the factors at any strides, so q alone decides (_check put every tensor on its device)
        if all(t.dtype != torch.float64 for t in tensors) and use_triton([q], KERNEL):
            return tpa_decode_triton(*tensors, mask, scale=scale)
        return tpa_decode_reference(*tensors, mask, scale=scale)
