"""Projection epilogue: a tiled GEMM ``A @ B`` whose epilogue updates a weight matrix in place.

For ``W`` (m×n), ``A`` (m×r), ``B`` (r×n), an optional extra term ``E`` (m×n) and its optional per-column (1×n)
or per-row (m×1) scale ``s``::

    U = alpha * (A @ B) + beta * E * s
    W = W * decay - U          (decay_mode "before", torch.optim.AdamW's order)
    W = (W - U) * decay        (decay_mode "after", official GaLore/Fira)

This is the back-projection of the low-rank optimizers: GaLore's ``W <- W(1 - lr*wd) - s*alpha*P*N`` with
``(A, B) = (P, N)`` (left basis) or ``(N, P)`` (right basis), ``alpha = lr * c * scale``; Fira adds its scaled
residual as ``E`` (``beta = lr * c``); FRUGAL's SVD mode is the same shape of update. The official code materialises
``P @ N``, scales it, adds it and decays ``W`` in separate passes; here ``U`` never leaves registers. Fira's
state-free term ``phi * G`` is ``E * s`` with ``E = G`` and ``s = phi``, so it is never formed either.

Arithmetic is in float32 (float64 when any operand is float64), whatever the storage dtype of ``W`` (fp32, bf16,
fp16, fp64) and of ``A``, ``B``, ``E`` (any float dtype); ``W`` is rounded once. The Triton GEMM runs its fp32
products in IEEE precision (no TF32), so it matches the reference to summation order. ``r`` may be anything (1, 3,
17, 1024): K is padded to the tile with masked loads. All four tensors may be strided (no copies are made).

Floor (memory traffic, fp32): read and write ``W`` (8 B per element of W), read ``E`` (+4 B), read ``A`` and ``B``
once (``4 r (m + n)`` B in all, i.e. ``4 rho`` per element of W with ``rho = r / min(m, n)``). FLOPs: ``2 m n r``.

    >>> projection_update(w, basis, direction, alpha=lr * c * scale, decay=1 - lr * wd,
    ...                   decay_mode="after")  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor

from hfx_kernels._backend import tl, tl_dtype, triton, use_triton

DECAY_MODES = ("before", "after")
KERNEL = "projection_update"


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any operand is float64, float32 otherwise (bf16/fp16/fp32 storage)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(w: Tensor, a: Tensor, b: Tensor, extra: Tensor | None, decay_mode: str,
           extra_scale: Tensor | None = None) -> None:
    """Shapes, dtypes, devices and the decay mode, with errors that say what to pass."""
    if decay_mode not in DECAY_MODES:
        raise ValueError(f"{KERNEL}: unknown decay_mode {decay_mode!r}: use 'before' (W*decay - U, torch.optim.AdamW) "
                         "or 'after' ((W - U)*decay, official GaLore/Fira)")
    if extra_scale is not None and extra is None:
        raise ValueError(f"{KERNEL}: extra_scale scales the extra term; pass extra too, or drop extra_scale")
    named = {"w": w, "a": a, "b": b, **({} if extra is None else {"extra": extra}),
             **({} if extra_scale is None else {"extra_scale": extra_scale})}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{KERNEL}: {name} must be a tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{KERNEL}: {name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{KERNEL}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != w.device:
            raise ValueError(f"{KERNEL}: {name} is on {t.device} but w is on {w.device}; put them on one device")
    (m, n), (am, r), (br, bn) = w.shape, a.shape, b.shape
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"{KERNEL}: a is {am}×{r} and b is {br}×{bn}: a's columns must equal b's rows (the rank)")
    if (am, bn) != (m, n):
        raise ValueError(f"{KERNEL}: a @ b is {am}×{bn} but w is {m}×{n}; they must have the same shape")
    if extra is not None and tuple(extra.shape) != (m, n):
        raise ValueError(f"{KERNEL}: extra has shape {tuple(extra.shape)}, w has {(m, n)}; they must match")
    if extra_scale is not None and tuple(extra_scale.shape) not in ((m, 1), (1, n), (m, n)):
        raise ValueError(f"{KERNEL}: extra_scale has shape {tuple(extra_scale.shape)}; for w of shape {(m, n)} it "
                         f"must be ({m}, 1) (one scale per row), (1, {n}) (per column) or ({m}, {n})")
    if any(stride == 0 and size > 1 for stride, size in zip(w.stride(), w.shape)):
        raise ValueError(f"{KERNEL}: w (shape {tuple(w.shape)}, strides {w.stride()}) has overlapping elements (an "
                         "expanded view); it is updated in place, so pass a tensor that owns its elements")


# --------------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------------


def projection_update_reference(w: Tensor, a: Tensor, b: Tensor, *, alpha: float = 1.0, extra: Tensor | None = None,
                                beta: float = 1.0, decay: float = 1.0, decay_mode: str = "before",
                                extra_scale: Tensor | None = None) -> None:
    """The formula of the module docstring in plain torch: ``W`` updated in place."""
    c = _compute_dtype(w, a, b, extra, extra_scale)
    u = (a.to(c) @ b.to(c)).mul_(alpha)
    if extra is not None:
        u.add_(extra.to(c) if extra_scale is None else extra.to(c) * extra_scale.to(c), alpha=beta)
    w32 = w.to(c)
    w.copy_(w32 * decay - u if decay_mode == "before" else (w32 - u) * decay)


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

BLOCK_M = 64
BLOCK_N = 64
GROUP_M = 8  # tile order: GROUP_M row tiles share the B columns they read, for L2 reuse

if triton is not None:

    @triton.jit
    def _projection_update_kernel(w_ptr, a_ptr, b_ptr, e_ptr, s_ptr, scalars, M, N, K,
                                  stride_wm, stride_wn, stride_am, stride_ak, stride_bk, stride_bn, stride_em,
                                  stride_en, stride_sm, stride_sn, W_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr,
                                  HAS_E: tl.constexpr, HAS_S: tl.constexpr,
                                  DECAY_AFTER: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m

        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = tl.arange(0, BLOCK_K).to(tl.int64)
        mask_m = rm < M
        mask_n = rn < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=C_DTYPE)
        for k0 in range(0, K, BLOCK_K):  # K padded to the tile: masked loads give zeros past r
            kk = k0 + rk
            mask_k = kk < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(C_DTYPE)
            b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(C_DTYPE)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=C_DTYPE)

        alpha = tl.load(scalars + 0)
        beta = tl.load(scalars + 1)
        decay = tl.load(scalars + 2)
        mask = mask_m[:, None] & mask_n[None, :]
        u = alpha * acc
        if HAS_E:
            e = tl.load(e_ptr + rm[:, None] * stride_em + rn[None, :] * stride_en, mask=mask, other=0.0).to(C_DTYPE)
            if HAS_S:  # a broadcast scale: stride 0 along the dimension it does not vary on
                e = e * tl.load(s_ptr + rm[:, None] * stride_sm + rn[None, :] * stride_sn, mask=mask,
                                other=0.0).to(C_DTYPE)
            u = u + beta * e
        w_ptrs = w_ptr + rm[:, None] * stride_wm + rn[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(C_DTYPE)
        if DECAY_AFTER:  # noqa: SIM108 - a compile-time branch
            w = (w - u) * decay
        else:
            w = w * decay - u
        tl.store(w_ptrs, w.to(W_DTYPE), mask=mask)


def projection_update_triton(w: Tensor, a: Tensor, b: Tensor, *, alpha: float = 1.0, extra: Tensor | None = None,
                             beta: float = 1.0, decay: float = 1.0, decay_mode: str = "before",
                             extra_scale: Tensor | None = None, input_precision: str = "ieee") -> None:
    """The Triton implementation of :func:`projection_update_reference` (same arguments). ``input_precision`` is
    Triton's for the fp32 products: "ieee" (default, matches the reference) or "tf32" (faster on tensor cores, ~1e-3
    relative error in ``A @ B``)."""
    _check(w, a, b, extra, decay_mode, extra_scale)
    (m, n), r = w.shape, a.shape[1]
    if m == 0 or n == 0:
        return
    c = _compute_dtype(w, a, b, extra, extra_scale)
    scalars = torch.tensor([alpha, beta, decay], dtype=c).to(w.device, non_blocking=True)
    e = extra if extra is not None else w  # unread without HAS_E
    s_full = extra_scale.expand(m, n) if extra_scale is not None else w  # unread without HAS_S
    block_k = 16 if r <= 16 else 32  # tl.dot needs K >= 16
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    _projection_update_kernel[grid](
        w, a, b, e, s_full, scalars, m, n, r, *w.stride(), *a.stride(), *b.stride(), *e.stride(), *s_full.stride(),
        W_DTYPE=tl_dtype(w.dtype), C_DTYPE=tl_dtype(c), HAS_E=extra is not None, HAS_S=extra_scale is not None,
        DECAY_AFTER=decay_mode == "after",
        PRECISION=input_precision if c == torch.float32 else "ieee", BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=block_k, GROUP_M=GROUP_M,
    )


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def projection_update(w: Tensor, a: Tensor, b: Tensor, *, alpha: float = 1.0, extra: Tensor | None = None,
                      beta: float = 1.0, decay: float = 1.0, decay_mode: str = "before",
                      extra_scale: Tensor | None = None) -> None:
    """Update ``w`` (m×n) in place with the product ``a @ b`` (m×r @ r×n) and an optional ``extra`` (m×n), scaled
    by an optional ``extra_scale`` per row (m×1) or per column (1×n)::

        U = alpha * (a @ b) + beta * extra * extra_scale
        w = w * decay - U          (decay_mode="before")
        w = (w - U) * decay        (decay_mode="after")

    in float32 (float64 when any operand is float64), ``w`` rounded once to its dtype. ``decay`` is the decoupled
    weight-decay factor ``1 - lr * weight_decay``. Triton on CUDA (one tiled GEMM with this update as its epilogue:
    reads and writes ``w`` once, reads ``extra`` once, never materialises ``a @ b``), torch elsewhere. Any strides.

    Example, GaLore's back-projection with a left basis ``P`` (m×r) and the Adam direction ``N`` (r×n)::

        projection_update(w, P, N, alpha=lr * c * scale, decay=1 - lr * wd, decay_mode="after")
    """
    _check(w, a, b, extra, decay_mode, extra_scale)
    tensors = [t for t in (w, a, b, extra, extra_scale) if t is not None]
    kw = dict(alpha=alpha, extra=extra, beta=beta, decay=decay, decay_mode=decay_mode, extra_scale=extra_scale)
    if use_triton(tensors, KERNEL):
        projection_update_triton(w, a, b, **kw)
    elif w.dtype in (torch.float32, torch.float64) and all(t.dtype == w.dtype for t in tensors):
        _projection_update_addmm(w, a, b, **kw)
    else:
        projection_update_reference(w, a, b, **kw)


def _projection_update_addmm(w, a, b, *, alpha, extra, beta, decay, decay_mode, extra_scale) -> None:
    """The torch path when everything is in W's dtype: BLAS's own epilogue, ``W <- d*W - alpha'*(a@b)`` in one
    ``addmm_`` (the product is never materialised); the (scaled) extra term by one ``add_``/``addcmul_`` after it
    (decay before: ``d*W - alpha*AB - beta*E``) or before it (after: ``d*(W - beta*E) - d*alpha*AB``)."""
    decay_after = decay_mode == "after"
    if extra is not None and decay_after:
        _sub_extra(w, extra, extra_scale, beta)
    w.addmm_(a, b, beta=decay, alpha=-alpha * (decay if decay_after else 1.0))
    if extra is not None and not decay_after:
        _sub_extra(w, extra, extra_scale, beta)


def _sub_extra(w: Tensor, extra: Tensor, extra_scale: Tensor | None, beta: float) -> None:
    if extra_scale is None:
        w.add_(extra, alpha=-beta)
    else:
        w.addcmul_(extra, extra_scale, value=-beta)
