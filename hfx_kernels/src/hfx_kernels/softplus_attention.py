"""Softplus attention (LSSA) with the optional re-weighting of LSSAR (Gao, Spratling, Gionfrida, arXiv 2501.13428,
ICML 2026), forward and backward, as a flash-style Triton kernel pair (no Tq x Tk matrix is ever stored).

For a query row ``i`` with ``N_i`` visible keys (mask-aware: padding and causality both count)::

    s_ij = scale * q_i . k_j                              (scale defaults to 1/sqrt(D), as SDPA)
    f_ij = softplus(lam_i * s_ij) * M_ij                  M_ij = 1 where key j is visible, else 0
    A_ij = f_ij / sum_k f_ik                              (LSSA; a row with no visible key gives 0, not NaN)
    lam_i = log N_i                                       length_scale=True (default)
          = log N_i / log train_length                    train_length given (this module's option, see below)
          = 1                                             length_scale=False
    out_i = sum_j A_ij v_j

With ``power=p != 1`` the re-weighting stage (LSSAR) follows::

    u_ij = N_i * A_ij - o_i                               o_i = 1, except o_i = 0 where N_i <= 3
    W_ij = relu(u_ij)^p / sum_k relu(u_ik)^p              (0 for a row whose u_ij are all <= 0)
    out_i = sum_j W_ij v_j

The threshold ``N_i * A_ij > 1`` (i.e. ``A_ij > 1/N_i``, above the uniform weight) needs the row sum of pass one, so
the Triton forward reads the keys twice; the second pass runs an online softmax over ``p * log u_ij`` (the same weights
as ``relu(u)^p`` renormalised, without the overflow of ``u^15`` in fp32). ``power=1`` (the default) means *no*
re-weighting, i.e. LSSA; ``power`` must be 1 or > 1 (the paper uses 3 and 15).

Provenance (what was verified, and from what). The official repository (github.com/iminfine/freeatten) and the paper's
PDF/HTML body could not be read from this workplace. Read instead: the abstracts of arXiv v2/v4/v5 and of the ICML
2026 version (stored pages); a detailed paper note of the ICML 2026 version ("[Paper Note] Softplus Attention with
Re-weighting ...", papernotes, English and Chinese editions, which restate the equations); and a third-party
re-implementation (``lssa_attention`` / ``lssar_attention``, "from arXiv:2501.13428"). Both secondary sources agree on:

- [secondary, consistent] LSSA: q and k rows are L2-normalised, the logit is ``(log d * log N_i) * q^.k^`` (d = head
  dim, N_i = number of tokens row i attends to, so ``log 1 = 0`` on the first causal row), then Softplus, the 0/1
  mask multiplied in, and row-wise l1 normalisation. This kernel leaves the L2 normalisation to the caller and takes
  the ``log d`` as ``scale``: for the paper's LSSA pass ``F.normalize(q, dim=-1)``, ``F.normalize(k, dim=-1)`` and
  ``scale=math.log(D)``; ``length_scale=True`` multiplies by ``log N_i``.
- [secondary, consistent] LSSAR: ``relu(A * N - O)^p`` then l1 normalisation, O all ones except the first 3 rows
  (0 there, "to prevent early training instability"); p = 15 (best at 8K) or 3 (best at 1K). "First 3 rows" is
  generalised here to rows with ``N_i <= 3`` (the same rows under plain causal masking, and sensible with padding).
  The re-implementation adds eps=1e-8 to the l1 denominators; here a row sum of 0 gives 0 instead (no eps), which
  differs only for rows that are exactly uniform (all ``u`` <= 0) or empty.
- [not from the paper] ``train_length``: ``lam_i = log N_i / log train_length`` (the "logn" form that equals 1 at the
  training length, as in Qwen / SSMax variants). Neither source normalises by a training length; it is offered for
  softmax-initialised models and is off by default.
- [verified here] softplus(-inf) = 0, so masked entries are exactly 0; the row sums are 1; no max subtraction is
  needed in LSSA because softplus grows linearly.

Backward (both forms), with dO the output gradient and ``D_i = dO_i . out_i``::

    LSSA:   df_ij = (dO_i . v_j - D_i) / Z_i                                  Z_i = sum_k f_ik
    LSSAR:  g_ij  = W_ij (dO_i . v_j - D_i) p / u_ij,  R_i = sum_j g_ij A_ij,  df_ij = N_i / Z_i (g_ij - R_i)
    ds_ij = df_ij * lam_i * sigmoid(lam_i s_ij);   dq = scale * ds k;   dk = scale * ds^T q;   dv = W^T dO

The dq kernel owns query rows (and computes ``R_i`` in a first pass for LSSAR); the dk/dv kernel owns key rows and
loops over the query heads of its KV group (GQA without repeating k/v, and without atomics).

Masks: ``None`` = bottom-right-aligned causal (query i sits at key position Tk - Tq + i); a bool tensor broadcastable
to (B, 1 or H, Tq, Tk), True = attend; or a float mask, where an entry attends iff it is > finfo(dtype).min / 2
(0 / -inf / finfo.min, as HF's eager masks). A float mask with other (bias) values is rejected: softplus attention
has no additive bias. Inputs: q (B, H, Tq, D), k and v (B, Hkv, Tk, D), H % Hkv == 0; output (B, H, Tq, D) in q's
dtype, accumulated in float32. D may be anything (padded to a power of two >= 16 in-kernel). float64 inputs run the
torch reference.

Example::

    from hfx_kernels.softplus_attention import softplus_attention

    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)            # the paper's cosine logits
    out = softplus_attention(q, k, v, scale=math.log(q.shape[-1]))   # LSSA, causal
    out = softplus_attention(q, k, v, attn_mask, scale=math.log(q.shape[-1]), power=15.0)   # LSSAR, padded batch
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hfx_kernels._backend import compute_dtype, interpreting, tl, tl_dtype, triton, use_triton

__all__ = [
    "softplus_attention",
    "softplus_attention_reference",
    "softplus_attention_triton",
]

KERNEL = "softplus_attention"
# Tiles of the Triton kernels (tests shrink them to 16 to cross block boundaries with small shapes).
BLOCK_M = 64
BLOCK_N = 64
# Rows with at most this many visible keys get no re-weighting offset (the paper's "first 3 rows").
NO_OFFSET_UP_TO = 3

# --------------------------------------------------------------------------------------------------
# Checks and masks (shared by attn_colsum and tpa_decode)
# --------------------------------------------------------------------------------------------------


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, kernel: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            raise ValueError(f"{kernel}: {name} must be a 4-D tensor (batch, heads, time, head_dim), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise ValueError(f"{kernel}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(f"{kernel}: q, k and v must share device and dtype; {name} is {t.dtype} on {t.device}, "
                             f"q is {q.dtype} on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"{kernel}: k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    (b, h, _, d), (bk, hkv, _, dk) = q.shape, k.shape
    if b != bk or d != dk:
        raise ValueError(f"{kernel}: q is {tuple(q.shape)} and k is {tuple(k.shape)}: batch and head_dim must match")
    if hkv == 0 or h % hkv:
        raise ValueError(f"{kernel}: q has {h} heads and k/v {hkv}: the query heads must be a multiple of the KV "
                         "heads (GQA); pass k/v unrepeated")


def _visible(mask: Tensor | None, shape: tuple[int, int, int, int], device, kernel: str) -> Tensor | None:
    """``None`` (causal, built where needed) or the mask as a bool view of shape (B, 1 or H, Tq, Tk), True = attend.

    A float mask attends where it is > finfo.min / 2; bias values (finite, non-zero, not masked) are rejected."""
    if mask is None:
        return None
    b, h, tq, tk = shape
    if not isinstance(mask, Tensor):
        raise TypeError(f"{kernel}: mask must be None or a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise ValueError(f"{kernel}: mask must be bool (True = attend) or float (0 / -inf), got {mask.dtype}")
        visible = mask > torch.finfo(mask.dtype).min / 2
        if bool(((mask != 0) & visible).any()):
            raise ValueError(f"{kernel}: the float mask has values other than 0 and -inf/finfo.min (an additive bias); "
                             "this kernel takes visibility only: pass a bool mask or a 0 / -inf mask")
        mask = visible
    if mask.device != device:
        raise ValueError(f"{kernel}: mask is on {mask.device} but q is on {device}; put them on one device")
    if mask.ndim > 4:
        raise ValueError(f"{kernel}: mask must have at most 4 dims (B, 1 or H, Tq, Tk), got {tuple(mask.shape)}")
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    heads = h if mask.shape[1] == h else 1
    try:
        return mask.expand(b, heads, tq, tk)
    except RuntimeError:
        raise ValueError(f"{kernel}: mask of shape {tuple(mask.shape)} does not broadcast to (B, 1 or H, Tq, Tk) = "
                         f"({b}, 1 or {h}, {tq}, {tk})") from None


def _causal(tq: int, tk: int, device) -> Tensor:
    """Bottom-right-aligned causal visibility (Tq, Tk): query i sees keys j <= Tk - Tq + i."""
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= i + (tk - tq)


def _dense_visible(mask: Tensor | None, shape, device, kernel: str) -> Tensor:
    """The visibility as a bool (B, 1 or H, Tq, Tk) tensor (broadcast view), causal when ``mask`` is None."""
    vis = _visible(mask, shape, device, kernel)
    if vis is None:
        vis = _causal(shape[2], shape[3], device)[None, None]
    return vis


def _mask_args(vis: Tensor | None, like: Tensor) -> tuple[Tensor, tuple[int, int, int, int], bool]:
    """(pointer tensor, (stride_b, stride_h, stride_q, stride_k), has_mask) for a kernel; a broadcast head has stride
    0. Without a mask the pointer is unused."""
    if vis is None:
        return like, (0, 0, 0, 0), False
    m = vis.view(torch.uint8)
    stride_h = m.stride(1) if m.shape[1] > 1 else 0
    return m, (m.stride(0), stride_h, m.stride(2), m.stride(3)), True


def _visible_counts(vis: Tensor | None, b: int, h: int, tq: int, tk: int, device) -> Tensor:
    """N_i, the number of visible keys of each row, as float32 (B, H, Tq) (contiguous)."""
    if vis is None:
        n = (torch.arange(tq, device=device, dtype=torch.float32) + (tk - tq + 1)).clamp_(0, tk)
        return n.expand(b, h, tq).contiguous()
    return vis.sum(-1, dtype=torch.int64).to(torch.float32).expand(b, h, tq).contiguous()


def _length_factor(n: Tensor, length_scale: bool, train_length: float | None) -> Tensor:
    """lam_i from the visible counts: log N_i (/ log train_length), or 1 without length scaling; 0 for empty rows."""
    if not length_scale:
        return torch.ones_like(n)
    lam = torch.log(n.clamp(min=1))
    return lam / math.log(train_length) if train_length is not None else lam


def _check_options(power: float, train_length: float | None) -> None:
    if not (power == 1.0 or power > 1.0):
        raise ValueError(f"{KERNEL}: power must be 1 (no re-weighting, LSSA) or > 1 (LSSAR's sharpening, e.g. 15), "
                         f"got {power!r}")
    if train_length is not None and not train_length > 1:
        raise ValueError(f"{KERNEL}: train_length must be > 1 (lam = log N / log train_length), got {train_length!r}")


# --------------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------------


def softplus_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
                                 scale: float | None = None, length_scale: bool = True, power: float = 1.0,
                                 train_length: float | None = None) -> Tensor:
    """The module docstring's formula in eager torch (Tq x Tk memory), differentiable by autograd; float32 arithmetic
    (float64 for float64 inputs), the result in q's dtype.

    >>> out = softplus_attention_reference(q, k, v, power=15.0)  # doctest: +SKIP
    """
    _check_qkv(q, k, v, KERNEL)
    _check_options(power, train_length)
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    c = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    vis = _dense_visible(mask, (b, h, tq, tk), q.device, KERNEL)
    n = vis.sum(-1, dtype=torch.int64).to(c)[..., None]  # (B, 1|H, Tq, 1)
    lam = _length_factor(n, length_scale, train_length)
    kk = k.to(c).repeat_interleave(h // hkv, dim=1)
    vv = v.to(c).repeat_interleave(h // hkv, dim=1)
    s = scale * (q.to(c) @ kk.transpose(-1, -2))
    f = F.softplus(lam * s).masked_fill(~vis, 0.0)
    z = f.sum(-1, keepdim=True)
    a = f / torch.where(z > 0, z, torch.ones_like(z))
    if power != 1.0:
        u = n * a - (n > NO_OFFSET_UP_TO).to(c)
        positive = u > 0
        # relu(u)^p renormalised = softmax(p log u) over u > 0: no overflow of u^p in float32
        t = torch.where(positive, power * torch.log(torch.where(positive, u, torch.ones_like(u))), -math.inf)
        alive = positive.any(-1, keepdim=True)
        a = torch.softmax(torch.where(alive, t, torch.zeros_like(t)), dim=-1) * alive
    return (a @ vv).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

if triton is not None:
    _NO_OFFSET_UP_TO = tl.constexpr(NO_OFFSET_UP_TO)

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
        # Triton's CPU interpreter multiplies bfloat16 operands as their raw uint16 bits: it gets float32 operands
        # (rounded to bfloat16 first, as on the GPU); compiled kernels keep the bfloat16 tensor-core dot
        if DOT_F32:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision=PRECISION)
        return out

    @triton.jit
    def _softplus(x):
        # max(x, 0) + log1p(exp(-|x|)), log1p by Goldberg's trick: exact enough where 1 + y rounds to 1
        y = tl.exp(-tl.abs(x))
        u = 1.0 + y
        log1p = tl.where(u == 1.0, y, tl.log(u) * y / tl.where(u == 1.0, 1.0, u - 1.0))
        return tl.maximum(x, 0.0) + log1p

    @triton.jit
    def _visible_block(m_ptr, m_base, offs_m, offs_n, Tq, Tk, m_sq, m_sk, HAS_MASK: tl.constexpr):
        ok = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
        if HAS_MASK:
            mv = tl.load(m_ptr + m_base + offs_m[:, None].to(tl.int64) * m_sq + offs_n[None, :].to(tl.int64) * m_sk,
                         mask=ok, other=0)
            ok = ok & (mv != 0)
        else:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
        return ok

    @triton.jit
    def _reweight_logits(f, vis, n, inv_z, off, power):
        # t = p log(N A - o) where positive, -inf elsewhere; also returns u = N A - o
        u = n[:, None] * f * inv_z[:, None] - off[:, None]
        good = vis & (u > 0)
        t = tl.where(good, power * tl.log(tl.where(good, u, 1.0)), float("-inf"))
        return t, u, good

    @triton.jit
    def _sp_fwd_kernel(q_ptr, k_ptr, v_ptr, m_ptr, lam_ptr, n_ptr, o_ptr, z_ptr, lse_ptr, scale, power,
                       H, GROUP, Tq, Tk, D, m_sb, m_sh, m_sq, m_sk,
                       HAS_MASK: tl.constexpr, REWEIGHT: tl.constexpr, OUT_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
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
        lam = tl.load(lam_ptr + rows, mask=row_ok, other=0.0)
        m_base = b.to(tl.int64) * m_sb + h.to(tl.int64) * m_sh
        hi = Tk
        if not HAS_MASK:  # causal: no key past the block's last row
            hi = tl.minimum(Tk, Tk - Tq + (pid_m + 1) * BLOCK_M)

        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        z = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, hi, BLOCK_N):  # pass 1: Z_i (and, for LSSA, sum f v)
            offs_n = start + tl.arange(0, BLOCK_N)
            kv_ok = (offs_n < Tk)[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, DOT_F32) * scale
            vis = _visible_block(m_ptr, m_base, offs_m, offs_n, Tq, Tk, m_sq, m_sk, HAS_MASK)
            f = tl.where(vis, _softplus(lam[:, None] * s), 0.0)
            z += tl.sum(f, 1)
            if not REWEIGHT:
                v = tl.load(v_ptr + kv + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
                acc += _dot(f.to(v.dtype), v, PRECISION, DOT_F32)
        tl.store(z_ptr + rows, z, mask=row_ok)
        inv_z = tl.where(z > 0, 1.0 / tl.where(z > 0, z, 1.0), 0.0)

        if REWEIGHT:  # pass 2: online softmax over p log(N A - o)
            n = tl.load(n_ptr + rows, mask=row_ok, other=0.0)
            off = tl.where(n > _NO_OFFSET_UP_TO, 1.0, 0.0)
            m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for start in range(0, hi, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                kv_ok = (offs_n < Tk)[:, None] & d_ok[None, :]
                k = tl.load(k_ptr + kv + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
                s = _dot(q, tl.trans(k), PRECISION, DOT_F32) * scale
                vis = _visible_block(m_ptr, m_base, offs_m, offs_n, Tq, Tk, m_sq, m_sk, HAS_MASK)
                f = tl.where(vis, _softplus(lam[:, None] * s), 0.0)
                t, _, _ = _reweight_logits(f, vis, n, inv_z, off, power)
                m_new = tl.maximum(m_i, tl.max(t, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(t - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_ptr + kv + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, DOT_F32)
                m_i = m_new
            out = acc * tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)[:, None]
            tl.store(lse_ptr + rows, tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("inf")),
                     mask=row_ok)
        else:
            out = acc * inv_z[:, None]
        tl.store(o_ptr + rows[:, None] * D + offs_d[None, :], out.to(OUT_DTYPE), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _sp_grad_f(s, vis, lam, inv_z, dp, delta, n, off, lse, r, power, REWEIGHT: tl.constexpr):
        """(W, ds): the final weights of the block and dL/ds (0 where not visible)."""
        f = tl.where(vis, _softplus(lam[:, None] * s), 0.0)
        if REWEIGHT:
            t, u, good = _reweight_logits(f, vis, n, inv_z, off, power)
            w = tl.exp(t - lse[:, None])
            g = tl.where(good, w * (dp - delta[:, None]) * power / tl.where(good, u, 1.0), 0.0)
            df = (n * inv_z)[:, None] * (g - r[:, None])
        else:
            w = f * inv_z[:, None]
            df = (dp - delta[:, None]) * inv_z[:, None]
        df = tl.where(vis, df, 0.0)
        ds = df * lam[:, None] * tl.sigmoid(lam[:, None] * s)
        return w, ds

    @triton.jit
    def _sp_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, m_ptr, lam_ptr, n_ptr, z_ptr, lse_ptr, do_ptr, delta_ptr, r_ptr,
                          dq_ptr, scale, power, H, GROUP, Tq, Tk, D, m_sb, m_sh, m_sq, m_sk,
                          HAS_MASK: tl.constexpr, REWEIGHT: tl.constexpr, OUT_DTYPE: tl.constexpr,
                          PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=qd_ok, other=0.0)
        do = tl.load(do_ptr + rows[:, None] * D + offs_d[None, :], mask=qd_ok, other=0.0)
        lam = tl.load(lam_ptr + rows, mask=row_ok, other=0.0)
        z = tl.load(z_ptr + rows, mask=row_ok, other=0.0)
        inv_z = tl.where(z > 0, 1.0 / tl.where(z > 0, z, 1.0), 0.0)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        n = tl.load(n_ptr + rows, mask=row_ok, other=0.0)
        off = tl.where(n > _NO_OFFSET_UP_TO, 1.0, 0.0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        m_base = b.to(tl.int64) * m_sb + h.to(tl.int64) * m_sh
        hi = Tk
        if not HAS_MASK:
            hi = tl.minimum(Tk, Tk - Tq + (pid_m + 1) * BLOCK_M)

        r = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if REWEIGHT:  # R_i = sum_j g_ij A_ij, before any dq term can be formed
            for start in range(0, hi, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                kv_ok = (offs_n < Tk)[:, None] & d_ok[None, :]
                k = tl.load(k_ptr + kv + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
                v = tl.load(v_ptr + kv + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
                s = _dot(q, tl.trans(k), PRECISION, DOT_F32) * scale
                dp = _dot(do, tl.trans(v), PRECISION, DOT_F32)
                vis = _visible_block(m_ptr, m_base, offs_m, offs_n, Tq, Tk, m_sq, m_sk, HAS_MASK)
                f = tl.where(vis, _softplus(lam[:, None] * s), 0.0)
                t, u, good = _reweight_logits(f, vis, n, inv_z, off, power)
                w = tl.exp(t - lse[:, None])
                g = tl.where(good, w * (dp - delta[:, None]) * power / tl.where(good, u, 1.0), 0.0)
                r += tl.sum(g * f, 1) * inv_z
            tl.store(r_ptr + rows, r, mask=row_ok)

        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            kv_ok = (offs_n < Tk)[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(v_ptr + kv + offs_n[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, DOT_F32) * scale
            dp = _dot(do, tl.trans(v), PRECISION, DOT_F32)
            vis = _visible_block(m_ptr, m_base, offs_m, offs_n, Tq, Tk, m_sq, m_sk, HAS_MASK)
            _, ds = _sp_grad_f(s, vis, lam, inv_z, dp, delta, n, off, lse, r, power, REWEIGHT)
            dq += _dot(ds.to(k.dtype), k, PRECISION, DOT_F32)
        tl.store(dq_ptr + rows[:, None] * D + offs_d[None, :], (dq * scale).to(OUT_DTYPE), mask=qd_ok)

    @triton.jit
    def _sp_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, m_ptr, lam_ptr, n_ptr, z_ptr, lse_ptr, do_ptr, delta_ptr, r_ptr,
                            dk_ptr, dv_ptr, scale, power, H, GROUP, Tq, Tk, D, m_sb, m_sh, m_sq, m_sk,
                            HAS_MASK: tl.constexpr, REWEIGHT: tl.constexpr, OUT_DTYPE: tl.constexpr,
                            PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        pid_n = tl.program_id(0)
        bhk = tl.program_id(1)
        hkv = H // GROUP
        b = bhk // hkv
        hk = bhk % hkv
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        kv_rows = bhk.to(tl.int64) * Tk + offs_n
        kv_ok = (offs_n < Tk)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + kv_rows[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
        lo = 0
        if not HAS_MASK:  # causal: rows before Tq - Tk + first key see none of this block
            lo = tl.maximum(0, pid_n * BLOCK_N - (Tk - Tq)) // BLOCK_M * BLOCK_M
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for hh in range(0, GROUP):  # the query heads sharing this KV head
            h = hk * GROUP + hh
            bh = b * H + h
            m_base = b.to(tl.int64) * m_sb + h.to(tl.int64) * m_sh
            for start in range(lo, Tq, BLOCK_M):
                offs_m = start + tl.arange(0, BLOCK_M)
                row_ok = offs_m < Tq
                rows = bh.to(tl.int64) * Tq + offs_m
                qd_ok = row_ok[:, None] & d_ok[None, :]
                q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=qd_ok, other=0.0)
                do = tl.load(do_ptr + rows[:, None] * D + offs_d[None, :], mask=qd_ok, other=0.0)
                lam = tl.load(lam_ptr + rows, mask=row_ok, other=0.0)
                z = tl.load(z_ptr + rows, mask=row_ok, other=0.0)
                inv_z = tl.where(z > 0, 1.0 / tl.where(z > 0, z, 1.0), 0.0)
                delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
                n = tl.load(n_ptr + rows, mask=row_ok, other=0.0)
                off = tl.where(n > _NO_OFFSET_UP_TO, 1.0, 0.0)
                lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
                r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
                s = _dot(q, tl.trans(k), PRECISION, DOT_F32) * scale
                dp = _dot(do, tl.trans(v), PRECISION, DOT_F32)
                vis = _visible_block(m_ptr, m_base, offs_m, offs_n, Tq, Tk, m_sq, m_sk, HAS_MASK)
                w, ds = _sp_grad_f(s, vis, lam, inv_z, dp, delta, n, off, lse, r, power, REWEIGHT)
                dv += _dot(tl.trans(w).to(do.dtype), do, PRECISION, DOT_F32)
                dk += _dot(tl.trans(ds).to(q.dtype), q, PRECISION, DOT_F32)
        tl.store(dk_ptr + kv_rows[:, None] * D + offs_d[None, :], (dk * scale).to(OUT_DTYPE), mask=kv_ok)
        tl.store(dv_ptr + kv_rows[:, None] * D + offs_d[None, :], dv.to(OUT_DTYPE), mask=kv_ok)


def _dot_args(dtype: torch.dtype) -> dict:
    """PRECISION / DOT_F32 of the kernels' dots: IEEE float32 products (no TF32: the reference's precision), and
    float32 operands for bfloat16 under the interpreter (see ``_dot``)."""
    return dict(PRECISION="ieee", DOT_F32=interpreting() and dtype == torch.bfloat16)


def _launch_args(q: Tensor) -> dict:
    d = q.shape[-1]
    return dict(OUT_DTYPE=tl_dtype(q.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                BLOCK_D=max(16, triton.next_power_of_2(d)), **_dot_args(q.dtype))


class _SoftplusAttention(torch.autograd.Function):
    """Triton forward and backward; tensors contiguous, (B, H, Tq, D) / (B, Hkv, Tk, D)."""

    @staticmethod
    def forward(ctx, q, k, v, vis, lam, n, scale, power):
        b, h, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        out = torch.empty_like(q)
        z = torch.empty((b, h, tq), device=q.device, dtype=torch.float32)
        lse = torch.empty_like(z) if power != 1.0 else z
        m, (m_sb, m_sh, m_sq, m_sk), has_mask = _mask_args(vis, q)
        grid = (triton.cdiv(tq, BLOCK_M), b * h)
        _sp_fwd_kernel[grid](q, k, v, m, lam, n, out, z, lse, float(scale), float(power), h, h // hkv, tq, tk, d,
                             m_sb, m_sh, m_sq, m_sk, HAS_MASK=has_mask, REWEIGHT=power != 1.0, **_launch_args(q))
        ctx.save_for_backward(q, k, v, vis, lam, n, out, z, lse)
        ctx.scale, ctx.power = float(scale), float(power)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, vis, lam, n, out, z, lse = ctx.saved_tensors
        b, h, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        do = dout.contiguous()
        delta = (do.float() * out.float()).sum(-1)  # D_i = dO_i . out_i
        reweight = ctx.power != 1.0
        r = torch.empty_like(delta) if reweight else delta
        m, (m_sb, m_sh, m_sq, m_sk), has_mask = _mask_args(vis, q)
        common = dict(HAS_MASK=has_mask, REWEIGHT=reweight, **_launch_args(q))
        dq = torch.empty_like(q)
        _sp_bwd_dq_kernel[(triton.cdiv(tq, BLOCK_M), b * h)](
            q, k, v, m, lam, n, z, lse, do, delta, r, dq, ctx.scale, ctx.power, h, h // hkv, tq, tk, d,
            m_sb, m_sh, m_sq, m_sk, **common)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _sp_bwd_dkdv_kernel[(triton.cdiv(tk, BLOCK_N), b * hkv)](
            q, k, v, m, lam, n, z, lse, do, delta, r, dk, dv, ctx.scale, ctx.power, h, h // hkv, tq, tk, d,
            m_sb, m_sh, m_sq, m_sk, **common)
        return dq, dk, dv, None, None, None, None, None


def softplus_attention_triton(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
                              scale: float | None = None, length_scale: bool = True, power: float = 1.0,
                              train_length: float | None = None) -> Tensor:
    """The Triton implementation of :func:`softplus_attention_reference` (same arguments), differentiable with
    respect to q, k and v. Copies strided q/k/v to contiguous; float32, bfloat16 or float16."""
    _check_qkv(q, k, v, KERNEL)
    _check_options(power, train_length)
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{KERNEL}: the Triton kernel takes float32/bfloat16/float16, got {q.dtype}; float64 runs "
                         "the torch reference (softplus_attention does that)")
    b, h, tq, d = q.shape
    tk = k.shape[2]
    if q.numel() == 0 or tk == 0:  # nothing to attend: zeros (keeps the graph for autograd)
        return q * 0.0
    vis = _visible(mask, (b, h, tq, tk), q.device, KERNEL)
    n = _visible_counts(vis, b, h, tq, tk, q.device)
    lam = _length_factor(n, length_scale, train_length).contiguous()
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    return _SoftplusAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), vis, lam, n, scale, power)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def softplus_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, scale: float | None = None,
                       length_scale: bool = True, power: float = 1.0, train_length: float | None = None) -> Tensor:
    """Softplus attention, LSSA (``power=1``) or LSSAR (``power=p > 1``): see the module docstring for the formula,
    the masks and what is verified from the paper. q (B, H, Tq, D), k/v (B, Hkv, Tk, D) with H % Hkv == 0 (GQA, no
    repeat needed); ``mask`` None (bottom-right causal), bool (True = attend) or 0/-inf float, broadcastable to
    (B, 1 or H, Tq, Tk). Returns (B, H, Tq, D) in q's dtype. Triton forward and backward on CUDA, eager torch
    elsewhere (and for float64).

    >>> out = softplus_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, scale=math.log(64),
    ...                          power=15.0)  # doctest: +SKIP
    """
    _check_qkv(q, k, v, KERNEL)
    kwargs = dict(scale=scale, length_scale=length_scale, power=power, train_length=train_length)
    if q.is_cuda:  # HF hands over transposed views; the kernel copies them anyway
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if q.dtype != torch.float64 and use_triton([q, k, v], KERNEL):
        return softplus_attention_triton(q, k, v, mask, **kwargs)
    return softplus_attention_reference(q, k, v, mask, **kwargs)
