"""Multi-tensor state-free step (FRUGAL's update of the state-free gradient part): one Triton launch per dtype group
updates every tensor of a list. Per tensor, with ``f = sign`` (signSGD) or the identity (SGD)::

    p = p * decay - step * f(g)        decay = 1 - lr * weight_decay,   step = lr * lr_scale

The decay is decoupled, applied to the pre-update parameter, with the *unscaled* ``lr`` (FRUGAL: ``lr_scale`` is
``proj_params_lr_scale * inactive_lr_scale``, which scales the update only). ``sign`` is torch's: ``sign(0) = 0``
(and 0 for NaN, as ``torch.sign`` on this torch). No state. Floor: 12 bytes per fp32 parameter (read p, g; write p).

    >>> sign_sgd_step(params, grads, lr=1e-3, weight_decay=0.01)  # doctest: +SKIP
    >>> sign_sgd_step(params, grads, lr=1e-3, lr_scale=0.1, rule="sgd")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from hfx_kernels._backend import (
    BLOCK,
    CHUNK,
    TensorTable,
    check_contiguous,
    check_same_shapes,
    compute_dtype,
    group_by_dtype,
    tl,
    tl_dtype,
    triton,
    use_triton,
)

RULES = ("sign_sgd", "sgd")

# --------------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------------


def sign_sgd_reference(params, grads, *, step, decay=1.0, sign=True) -> None:
    """The kernel's formula in plain torch, per tensor: ``p = p * decay - step * (sign(g) if sign else g)``, computed
    in float32 (float64 for float64 parameters). Updates ``params`` in place."""
    for p, g in zip(params, grads, strict=True):
        c = compute_dtype(p.dtype)
        u = g.to(c)
        u = u.sign() if sign else u
        p.copy_(p.to(c).mul_(decay).sub_(u, alpha=step))


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _sign_sgd_kernel(chunks, numels, num_chunks, p_tab, g_tab, hyper, P_DTYPE: tl.constexpr,
                         G_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr, SIGN: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(chunks + pid)
        start = tl.load(chunks + num_chunks + pid)
        n = tl.load(numels + t)
        p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DTYPE))
        decay = tl.load(hyper + 0)
        step = tl.load(hyper + 1)
        for off in range(0, tl.minimum(CHUNK, n - start), BLOCK):  # a short tensor's chunk stops at its end
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < n
            u = tl.load(g_ptr + idx, mask=mask, other=0.0).to(C_DTYPE)
            if SIGN:  # torch.sign: 0 at 0 (and at NaN)
                u = (u > 0).to(C_DTYPE) - (u < 0).to(C_DTYPE)
            p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(C_DTYPE)
            tl.store(p_ptr + idx, (p * decay - step * u).to(P_DTYPE), mask=mask)


def sign_sgd_triton(params, grads, *, step, decay=1.0, sign=True) -> None:
    """The Triton implementation of :func:`sign_sgd_reference` (same arguments)."""
    check_contiguous(params, "params", "sign_sgd_step")
    check_contiguous(grads, "grads", "sign_sgd_step")
    for (device, p_dtype, g_dtype), idx in group_by_dtype(len(params), params, grads).items():
        keep = [i for i in idx if params[i].numel()]
        if not keep:
            continue
        c = compute_dtype(p_dtype)
        table = TensorTable([params[i].numel() for i in keep], device)
        _sign_sgd_kernel[(table.num_chunks,)](
            table.chunks, table.numels, table.num_chunks, table.addresses([params[i] for i in keep]),
            table.addresses([grads[i] for i in keep]), table.floats([decay, step], c),
            P_DTYPE=tl_dtype(p_dtype), G_DTYPE=tl_dtype(g_dtype), C_DTYPE=tl_dtype(c), SIGN=sign, CHUNK=CHUNK,
            BLOCK=BLOCK,
        )


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def sign_sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], *, lr: float, weight_decay: float = 0.0,
                  lr_scale: float = 1.0, rule: str = "sign_sgd") -> None:
    """One state-free step on every tensor (in place): ``p = p * (1 - lr * weight_decay) - lr * lr_scale * f(g)``
    with ``f = sign`` (``rule="sign_sgd"``) or the identity (``"sgd"``). The decay uses the unscaled ``lr``
    (FRUGAL's placement). Triton on CUDA, torch elsewhere."""
    if rule not in RULES:
        raise ValueError(f"sign_sgd_step: unknown rule {rule!r}: use 'sign_sgd' or 'sgd'")
    check_same_shapes({"params": params, "grads": grads}, "sign_sgd_step")
    impl = sign_sgd_triton if use_triton([*params, *grads], "sign_sgd_step") else sign_sgd_reference
    impl(params, grads, step=lr * lr_scale, decay=1.0 - lr * weight_decay, sign=rule == "sign_sgd")
