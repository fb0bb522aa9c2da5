"""Multi-tensor AdamW-family step: one Triton launch per dtype group updates every tensor of a list.

Per tensor i, with per-tensor ``step_size[i]`` and ``eps[i]`` (which carry the bias correction, computed on the host
from each tensor's step, so no device sync) and an optional gradient scale ``s`` (HF's clip coefficient as a device
scalar, folded in instead of a separate pass over the gradients)::

    u = s * g
    m = beta1 * m + (1 - beta1) * u
    v = beta2 * v + (1 - beta2) * u * u
    d = m / (sqrt(v) + eps[i])
    p = p * decay - step_size[i] * d      (decay_mode "before", torch.optim.AdamW)
    p = (p - step_size[i] * d) * decay    (decay_mode "after", official GaLore/Fira)

with ``decay = 1 - lr * weight_decay``. Without parameters the kernel writes ``d`` instead (the subspace Adam
direction of GaLore 2 / Fira / FRUGAL, back-projected by the caller). :func:`adam_scalars` turns (lr, betas, eps, t)
into ``step_size``/``eps`` for both eps conventions; both equal torch.optim.AdamW's
``lr/bc1 * m / (sqrt(v/bc2) + eps)`` (``eps_mode="torch"``) or ``lr*sqrt(bc2)/bc1 * m / (sqrt(v) + eps)`` (``"hf"``).
Floor: 28 bytes per fp32 parameter (read p, g, m, v; write p, m, v).

    >>> adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps=[1] * len(params), lr=1e-3, betas=(0.9, 0.999),
    ...            eps=1e-8, weight_decay=0.01)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from hfx_kernels._backend import (
    BLOCK,
    CHUNK,
    TensorTable,
    check_contiguous,
    check_same_shapes,
    compute_dtype,
    group_by_dtype,
    is_dtensor,
    tl,
    tl_dtype,
    triton,
    use_triton,
)

EPS_MODES = ("torch", "hf")
DECAY_MODES = ("before", "after")


def adam_scalars(step: int, *, lr: float, betas: tuple[float, float], eps: float, eps_mode: str = "torch",
                 correct_bias: bool = True) -> tuple[float, float]:
    """``(step_size, eps')`` for step ``t`` such that the Adam update is ``step_size * m / (sqrt(v) + eps')``.

    ``eps_mode="torch"``: eps is added after the bias correction of v (torch.optim.AdamW, official MARS);
    ``"hf"``: eps is added to sqrt(v) (official GaLore/Fira, transformers' legacy AdamW). Without ``correct_bias``
    both corrections are 1."""
    if eps_mode not in EPS_MODES:
        raise ValueError(f"unknown eps_mode {eps_mode!r}: use 'torch' or 'hf'")
    beta1, beta2 = betas
    bc1 = 1.0 - beta1**step if correct_bias else 1.0
    bc2_sqrt = math.sqrt(1.0 - beta2**step) if correct_bias else 1.0
    return lr * bc2_sqrt / bc1, (eps * bc2_sqrt if eps_mode == "torch" else eps)


# --------------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------------


def adamw_step_reference(params, grads, exp_avgs, exp_avg_sqs, *, step_sizes, eps, betas, decay=1.0,
                         decay_mode="before", grad_scale=None, out=None) -> None:
    """The kernel's formula in plain torch, per tensor (see the module docstring). Updates ``params`` (or, with
    ``params=None``, writes the directions into ``out``), ``exp_avgs`` and ``exp_avg_sqs`` in place."""
    beta1, beta2 = betas
    for i, (g, m, v) in enumerate(zip(grads, exp_avgs, exp_avg_sqs, strict=True)):
        c = compute_dtype(m.dtype if params is None else params[i].dtype)
        u = g.to(c) if grad_scale is None else g.to(c) * grad_scale.to(c)
        m32 = m.to(c).mul_(beta1).add_(u, alpha=1.0 - beta1)
        v32 = v.to(c).mul_(beta2).addcmul_(u, u, value=1.0 - beta2)
        d = m32 / v32.sqrt().add_(eps[i])
        m.copy_(m32)
        v.copy_(v32)
        if params is None:
            out[i].copy_(d)
            continue
        p = params[i]
        p32 = p.to(c)
        if decay_mode == "before":
            p32 = p32.mul_(decay).sub_(d, alpha=step_sizes[i])
        else:
            p32 = p32.sub_(d, alpha=step_sizes[i]).mul_(decay)
        p.copy_(p32)


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _adamw_kernel(chunks, numels, num_chunks, p_tab, g_tab, m_tab, v_tab, out_tab, step_sizes, eps_tab,
                      hyper, grad_scale, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                      C_DTYPE: tl.constexpr, HAS_P: tl.constexpr, DECAY_AFTER: tl.constexpr,
                      HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(chunks + pid)
        start = tl.load(chunks + num_chunks + pid)
        n = tl.load(numels + t)
        g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DTYPE))
        m_ptr = tl.load(m_tab + t).to(tl.pointer_type(S_DTYPE))
        v_ptr = tl.load(v_tab + t).to(tl.pointer_type(S_DTYPE))
        step_size = tl.load(step_sizes + t)
        eps = tl.load(eps_tab + t)
        beta1 = tl.load(hyper + 0)
        one_minus_beta1 = tl.load(hyper + 1)
        beta2 = tl.load(hyper + 2)
        one_minus_beta2 = tl.load(hyper + 3)
        decay = tl.load(hyper + 4)
        if HAS_SCALE:
            scale = tl.load(grad_scale).to(C_DTYPE)
        for off in range(0, tl.minimum(CHUNK, n - start), BLOCK):  # a small tensor's chunk stops early
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < n
            u = tl.load(g_ptr + idx, mask=mask, other=0.0).to(C_DTYPE)
            if HAS_SCALE:
                u = u * scale
            m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(C_DTYPE) * beta1 + one_minus_beta1 * u
            v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(C_DTYPE) * beta2 + one_minus_beta2 * (u * u)
            d = m / (tl.sqrt(v) + eps)
            tl.store(m_ptr + idx, m.to(S_DTYPE), mask=mask)
            tl.store(v_ptr + idx, v.to(S_DTYPE), mask=mask)
            if HAS_P:
                p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DTYPE))
                p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(C_DTYPE)
                if DECAY_AFTER:  # noqa: SIM108 - a compile-time branch
                    p = (p - step_size * d) * decay
                else:
                    p = p * decay - step_size * d
                tl.store(p_ptr + idx, p.to(P_DTYPE), mask=mask)
            else:
                o_ptr = tl.load(out_tab + t).to(tl.pointer_type(P_DTYPE))
                tl.store(o_ptr + idx, d.to(P_DTYPE), mask=mask)


def adamw_step_triton(params, grads, exp_avgs, exp_avg_sqs, *, step_sizes, eps, betas, decay=1.0,
                      decay_mode="before", grad_scale=None, out=None) -> None:
    """The Triton implementation of :func:`adamw_step_reference` (same arguments)."""
    targets = out if params is None else params
    lists = {"params" if params is not None else "out": targets, "grads": grads, "exp_avgs": exp_avgs,
             "exp_avg_sqs": exp_avg_sqs}
    for name, tensors in lists.items():
        check_contiguous(tensors, name, "adamw_step")
    beta1, beta2 = betas
    for (device, p_dtype, g_dtype, s_dtype, _), idx in group_by_dtype(
            len(targets), targets, grads, exp_avgs, exp_avg_sqs).items():
        if s_dtype != exp_avg_sqs[idx[0]].dtype:
            raise ValueError("adamw_step: exp_avgs and exp_avg_sqs must share a dtype")
        keep = [i for i in idx if targets[i].numel()]
        if not keep:
            continue
        c = compute_dtype(p_dtype)
        table = TensorTable([targets[i].numel() for i in keep], device)
        tab = {name: table.addresses([tensors[i] for i in keep]) for name, tensors in lists.items()}
        hyper = table.floats([beta1, 1.0 - beta1, beta2, 1.0 - beta2, decay], c)
        target_tab = tab["params" if params is not None else "out"]
        _adamw_kernel[(table.num_chunks,)](
            table.chunks, table.numels, table.num_chunks, target_tab, tab["grads"], tab["exp_avgs"],
            tab["exp_avg_sqs"], target_tab, table.floats([step_sizes[i] for i in keep], c),
            table.floats([eps[i] for i in keep], c), hyper, grad_scale if grad_scale is not None else hyper,
            P_DTYPE=tl_dtype(p_dtype), G_DTYPE=tl_dtype(g_dtype), S_DTYPE=tl_dtype(s_dtype), C_DTYPE=tl_dtype(c),
            HAS_P=params is not None, DECAY_AFTER=decay_mode == "after", HAS_SCALE=grad_scale is not None,
            CHUNK=CHUNK, BLOCK=BLOCK,
        )


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def per_tensor_steps(steps: int | Sequence[int], n: int, kernel: str = "adamw_step") -> list[int]:
    """``steps`` as one step number per tensor (one int stands for all ``n``)."""
    steps = [steps] * n if isinstance(steps, int) else list(steps)
    if len(steps) != n:
        raise ValueError(f"{kernel}: steps has {len(steps)} entries for {n} tensors")
    return steps


def step_scalars(steps: Sequence[int], *, lr: float, betas: tuple[float, float], eps: float, eps_mode: str = "torch",
                 correct_bias: bool = True) -> tuple[list[float], list[float]]:
    """:func:`adam_scalars` for each tensor's step: ``(step_sizes, eps')`` as two lists."""
    pairs = [adam_scalars(t, lr=lr, betas=betas, eps=eps, eps_mode=eps_mode, correct_bias=correct_bias) for t in steps]
    return [s for s, _ in pairs], [e for _, e in pairs]


def adamw_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], *, steps: int | Sequence[int], lr: float, betas: tuple[float, float],
               eps: float, weight_decay: float = 0.0, eps_mode: str = "torch", decay_mode: str = "before",
               correct_bias: bool = True, grad_scale: Tensor | None = None) -> None:
    """One AdamW step on every tensor (in place): moments, bias correction at each tensor's ``steps`` (t >= 1,
    after incrementing), decoupled weight decay applied ``decay_mode`` the update. ``grad_scale`` is an optional
    0-d device tensor multiplying every gradient (e.g. a clip coefficient). Triton on CUDA, torch elsewhere."""
    if decay_mode not in DECAY_MODES:
        raise ValueError(f"unknown decay_mode {decay_mode!r}: use 'before' (torch.optim.AdamW) or 'after'")
    check_same_shapes({"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
                      "adamw_step")
    steps = per_tensor_steps(steps, len(params))
    step_sizes, eps_list = step_scalars(steps, lr=lr, betas=betas, eps=eps, eps_mode=eps_mode,
                                        correct_bias=correct_bias)
    decay = 1.0 - lr * weight_decay
    if use_triton([*params, *grads, *exp_avgs, *exp_avg_sqs], "adamw_step"):
        impl = adamw_step_triton
    elif grad_scale is None and torch_fused_applies(params, grads, exp_avgs, exp_avg_sqs) and (
            forms := torch_fused_forms(steps, step_sizes, eps_list, betas, decay, decay_mode)) is not None:
        _run_fused_forms(forms, params, grads, exp_avgs, exp_avg_sqs, steps, betas)
        return
    else:
        impl = adamw_step_reference
    impl(params, grads, exp_avgs, exp_avg_sqs, step_sizes=step_sizes, eps=eps_list, betas=betas, decay=decay,
         decay_mode=decay_mode, grad_scale=grad_scale)


def torch_fused_applies(params, grads, exp_avgs, exp_avg_sqs) -> bool:
    """Whether torch's own fused AdamW kernel can take these tensors: one dtype for each parameter, its gradient and
    moments, contiguous, on the CPU or CUDA, and no DTensor (the kernel's step counters here are plain tensors, which
    DTensor dispatch refuses to mix; DTensors take the reference, op by op)."""
    return bool(params) and all(
        p.dtype == g.dtype == m.dtype == v.dtype and p.dtype in _FUSED_DTYPES and p.device.type in ("cpu", "cuda")
        and all(t.is_contiguous() and not is_dtensor(t) for t in (p, g, m, v))
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs))


def torch_fused_forms(steps: Sequence[int], step_sizes: Sequence[float], eps: Sequence[float],
                      betas: tuple[float, float], decay: float,
                      decay_mode: str) -> list[tuple[list[int], tuple]] | None:
    """Torch's fused AdamW computes ``p * (1 - lr wd) - lr/bc1 * m / (sqrt(v/bc2) + eps)`` with its own bias
    corrections at step t. Any step of the module docstring is that form with other scalars, exactly in real
    arithmetic: ``lr = step_size * bc1 / sqrt(bc2)`` and ``eps / sqrt(bc2)`` (so both eps modes and
    ``correct_bias=False``), and decay "after", ``(p - u) d = p d - d u``, is ``lr * d`` with ``lr wd = 1 - d``.
    Returns ``(indices, (lr, weight_decay, eps))`` per group of tensors that share them (one per distinct step), or
    None where no such form exists (a decay with a zero step: ``lr = 0``, or ``d = 0`` after the update)."""
    groups: dict[tuple, list[int]] = {}
    beta1, beta2 = betas
    for i, t in enumerate(steps):
        bc2_sqrt = math.sqrt(1.0 - beta2**t)
        lr_t = step_sizes[i] * (1.0 - beta1**t) / bc2_sqrt * (decay if decay_mode == "after" else 1.0)
        if decay != 1.0 and lr_t == 0.0:
            return None
        wd_t = 0.0 if decay == 1.0 else (1.0 - decay) / lr_t
        groups.setdefault((lr_t, wd_t, eps[i] / bc2_sqrt), []).append(i)
    return [(idx, scalars) for scalars, idx in groups.items()]


def _run_fused_forms(forms, params, grads, exp_avgs, exp_avg_sqs, steps, betas) -> None:
    for idx, (lr_t, wd_t, eps_t) in forms:
        p, g, m, v, t = ([lst[i] for i in idx] for lst in (params, grads, exp_avgs, exp_avg_sqs, steps))
        torch_fused_adamw(p, g, m, v, t, lr=lr_t, betas=betas, eps=eps_t, weight_decay=wd_t)


_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def torch_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay,
                      grad_divisor: Tensor | None = None) -> None:
    """The torch path's fast form: ``torch._fused_adamw_``, the kernel behind ``torch.optim.AdamW(fused=True)``.
    ``grad_divisor`` (a float32 0-d tensor) divides every gradient inside the kernel, overwriting ``grads``."""
    state_steps = [torch.tensor(float(t), device=p.device) for p, t in zip(params, steps)]
    torch._fused_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [], state_steps, lr=lr,
                        beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False,
                        maximize=False, grad_scale=grad_divisor)


def adam_direction(grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], *,
                   steps: int | Sequence[int], betas: tuple[float, float], eps: float, eps_mode: str = "hf",
                   correct_bias: bool = True, out: Sequence[Tensor] | None = None) -> tuple[list[Tensor], list[float]]:
    """Update the moments with ``grads`` (in place) and return ``(N, c)`` per tensor: the Adam step is
    ``-lr * c[i] * N[i]`` with ``N = m / (sqrt(v) + eps')`` (see :func:`adam_scalars`). ``N`` is written into
    ``out`` (new tensors of the moments' dtype by default). Triton on CUDA, torch elsewhere."""
    check_same_shapes({"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, "adam_direction")
    out = list(out) if out is not None else [torch.empty_like(m) for m in exp_avgs]
    steps = per_tensor_steps(steps, len(grads), "adam_direction")
    factors, eps_list = step_scalars(steps, lr=1.0, betas=betas, eps=eps, eps_mode=eps_mode, correct_bias=correct_bias)
    tensors = [*grads, *exp_avgs, *exp_avg_sqs, *out]
    if use_triton(tensors, "adam_direction"):
        adamw_step_triton(None, grads, exp_avgs, exp_avg_sqs, step_sizes=factors, eps=eps_list, betas=betas, out=out)
    elif (all(t.dtype == grads[0].dtype and t.dtype in (torch.float32, torch.float64) for t in tensors)
          and torch_fused_applies(out, grads, exp_avgs, exp_avg_sqs)):
        # torch's fused AdamW on a zeroed "parameter" with step size -1 leaves exactly N in it (0 + 1 * N)
        torch._foreach_zero_(out)
        forms = torch_fused_forms(steps, [-1.0] * len(grads), eps_list, betas, 1.0, "before")
        _run_fused_forms(forms, out, grads, exp_avgs, exp_avg_sqs, steps, betas)
    else:
        adamw_step_reference(None, grads, exp_avgs, exp_avg_sqs, step_sizes=factors, eps=eps_list, betas=betas,
                             out=out)
    return out, factors
