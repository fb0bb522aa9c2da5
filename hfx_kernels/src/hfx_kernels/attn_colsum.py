"""Attention mass per key for H2O (Zhang et al., arXiv 2306.14048; spec C2): the column sums of the softmax attention
probabilities, summed over the query rows and over the query heads of each KV group, without the Tq x Tk matrix::

    P[b, h, i, j] = softmax_j(scale * q[b, h, i] . k[b, h // g, j]  over the visible keys j)   (0 where masked)
    mass[b, hk, j] = sum_{h in group hk} sum_i P[b, h, i, j]                                     (B, Hkv, Tk) float32

g = H / Hkv. H2O keeps the keys with the largest accumulated mass; the prefill pass runs flash/SDPA for the output
and this kernel for the scores. Triton in two passes: (1) each query block's row log-sum-exp (online max/sum over
key blocks); (2) each key block recomputes ``P = exp(s - lse)`` for every query block of every head of its group and
sums the columns, so no program writes another's output (no atomics). Forward only: the scores are statistics for
the cache policy, so there is no autograd.

Masks as in :mod:`hfx_kernels.softplus_attention`: None = bottom-right causal; bool (True = attend) or 0 / -inf float
(attend where > finfo.min / 2), broadcastable to (B, 1 or H, Tq, Tk). A row with no visible key contributes 0.

Example::

    from hfx_kernels.attn_colsum import attn_colsum

    scores = attn_colsum(q, k)              # (B, Hkv, Tk): what each cached key received in this prefill
    layer_scores[..., :scores.shape[-1]] += scores
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hfx_kernels._backend import compute_dtype, tl, triton, use_triton
from hfx_kernels.softplus_attention import _check_qkv, _dense_visible, _dot_args, _mask_args, _visible

__all__ = ["attn_colsum", "attn_colsum_reference", "attn_colsum_triton"]

KERNEL = "attn_colsum"
BLOCK_M = 64
BLOCK_N = 64


def _check(q: Tensor, k: Tensor) -> None:
    _check_qkv(q, k, k, KERNEL)


def attn_colsum_reference(q: Tensor, k: Tensor, mask: Tensor | None = None, *, scale: float | None = None) -> Tensor:
    """The column sums in eager torch (materialises P): float32 (float64 for float64 inputs), shape (B, Hkv, Tk).

    >>> attn_colsum_reference(q, k).sum(-1)  # doctest: +SKIP  (= rows with a visible key, times the group size)
    """
    _check(q, k)
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    c = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    vis = _dense_visible(mask, (b, h, tq, tk), q.device, KERNEL)
    s = scale * (q.to(c) @ k.to(c).repeat_interleave(h // hkv, dim=1).transpose(-1, -2))
    s = s.masked_fill(~vis, -math.inf)
    alive = vis.any(-1, keepdim=True)
    p = torch.softmax(torch.where(alive, s, torch.zeros_like(s)), dim=-1) * alive
    return p.sum(2).reshape(b, hkv, h // hkv, tk).sum(2)


if triton is not None:
    from hfx_kernels.softplus_attention import _dot, _visible_block

    @triton.jit
    def _lse_kernel(q_ptr, k_ptr, m_ptr, lse_ptr, scale, H, GROUP, Tq, Tk, D, m_sb, m_sh, m_sq, m_sk,
                    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        kv = (b * (H // GROUP) + h // GROUP).to(tl.int64) * Tk * D
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < Tq
        d_ok = offs_d < D
        rows = bh.to(tl.int64) * Tq + offs_m
        q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_base = b.to(tl.int64) * m_sb + h.to(tl.int64) * m_sh
        hi = Tk
        if not HAS_MASK:
            hi = tl.minimum(Tk, Tk - Tq + (pid_m + 1) * BLOCK_M)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + kv + offs_n[:, None] * D + offs_d[None, :],
                        mask=(offs_n < Tk)[:, None] & d_ok[None, :], other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, DOT_F32) * scale
            vis = _visible_block(m_ptr, m_base, offs_m, offs_n, Tq, Tk, m_sq, m_sk, HAS_MASK)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        # +inf for a row with no visible key: exp(-inf - inf) = 0 in pass 2
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
        tl.store(lse_ptr + rows, lse, mask=row_ok)

    @triton.jit
    def _colsum_kernel(q_ptr, k_ptr, m_ptr, lse_ptr, out_ptr, scale, H, GROUP, Tq, Tk, D, m_sb, m_sh, m_sq, m_sk,
                       HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_n = tl.program_id(0)
        bhk = tl.program_id(1)
        hkv = H // GROUP
        b = bhk // hkv
        hk = bhk % hkv
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        kv_rows = bhk.to(tl.int64) * Tk + offs_n
        k = tl.load(k_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=(offs_n < Tk)[:, None] & d_ok[None, :],
                    other=0.0)
        lo = 0
        if not HAS_MASK:
            lo = tl.maximum(0, pid_n * BLOCK_N - (Tk - Tq)) // BLOCK_M * BLOCK_M
        mass = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for hh in range(0, GROUP):
            h = hk * GROUP + hh
            bh = b * H + h
            m_base = b.to(tl.int64) * m_sb + h.to(tl.int64) * m_sh
            for start in range(lo, Tq, BLOCK_M):
                offs_m = start + tl.arange(0, BLOCK_M)
                row_ok = offs_m < Tq
                rows = bh.to(tl.int64) * Tq + offs_m
                q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                            other=0.0)
                lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
                s = _dot(q, tl.trans(k), PRECISION, DOT_F32) * scale
                vis = _visible_block(m_ptr, m_base, offs_m, offs_n, Tq, Tk, m_sq, m_sk, HAS_MASK)
                p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
                mass += tl.sum(p, 0)
        tl.store(out_ptr + kv_rows, mass, mask=offs_n < Tk)


def attn_colsum_triton(q: Tensor, k: Tensor, mask: Tensor | None = None, *, scale: float | None = None) -> Tensor:
    """The Triton implementation of :func:`attn_colsum_reference` (same arguments): float32/bfloat16/float16 q, k
    (strided ones are copied); returns float32 (B, Hkv, Tk)."""
    _check(q, k)
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{KERNEL}: the Triton kernel takes float32/bfloat16/float16, got {q.dtype}")
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out = torch.zeros((b, hkv, tk), device=q.device, dtype=torch.float32)
    if out.numel() == 0 or tq == 0:
        return out
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k = q.contiguous(), k.contiguous()
    m, (m_sb, m_sh, m_sq, m_sk), has_mask = _mask_args(_visible(mask, (b, h, tq, tk), q.device, KERNEL), q)
    lse = torch.empty((b, h, tq), device=q.device, dtype=torch.float32)
    consts = dict(HAS_MASK=has_mask, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)),
                  **_dot_args(q.dtype))
    _lse_kernel[(triton.cdiv(tq, BLOCK_M), b * h)](q, k, m, lse, float(scale), h, h // hkv, tq, tk, d,
                                                  m_sb, m_sh, m_sq, m_sk, **consts)
    _colsum_kernel[(triton.cdiv(tk, BLOCK_N), b * hkv)](q, k, m, lse, out, float(scale), h, h // hkv, tq, tk, d,
                                                       m_sb, m_sh, m_sq, m_sk, **consts)
    return out


def attn_colsum(q: Tensor, k: Tensor, mask: Tensor | None = None, *, scale: float | None = None) -> Tensor:
    """Softmax attention mass received by each key, summed over query rows and the query heads of its KV group:
    float32 (B, Hkv, Tk) from q (B, H, Tq, D) and k (B, Hkv, Tk, D). ``mask``: None (bottom-right causal), bool
    (True = attend) or 0/-inf float, broadcastable to (B, 1 or H, Tq, Tk). Triton on CUDA, torch elsewhere (and for
    float64). No autograd.

    >>> attn_colsum(q, k, attention_mask)  # doctest: +SKIP
    """
    _check(q, k)
    if q.is_cuda:
        q, k = q.contiguous(), k.contiguous()
    with torch.no_grad():
        if q.dtype != torch.float64 and use_triton([q, k], KERNEL):
            return attn_colsum_triton(q, k, mask, scale=scale)
        return attn_colsum_reference(q, k, mask, scale=scale)
