"""Multi-tensor MARS step (MARS-AdamW and MARS-Lion) in two Triton launches per dtype group.

Per tensor i, with ``k = gamma * beta1 / (1 - beta1)``::

    c = g + k * (g - g_prev)                 (computed as (g - g_prev) * k + g)
    c = c / max(1, ||c||_F)                  per-tensor Frobenius clip at 1, no host sync
    m = beta1 * m + (1 - beta1) * c
    adamw: v = beta2 * v + (1 - beta2) * c * c
           p = p * decay - step_size[i] * m / (sqrt(v) + eps[i])
    lion:  p = p * decay - lr * sign(m)
    g_prev = g                               (store_grads: approximate MARS keeps the last gradient)

with ``decay = 1 - lr * weight_decay`` (decoupled, on the pre-update parameter) and ``step_size[i]``/``eps[i]`` from
:func:`hfx_kernels.adamw.adam_scalars` with ``eps_mode="torch"``, so the AdamW update is torch.optim.AdamW's
``lr/bc1 * m / (sqrt(v/bc2) + eps)`` (official MARS). Arithmetic in float32 (float64 for float64 parameters).

Pass 1 reads g and g_prev and writes one partial sum of squares of c per chunk (8 bytes per fp32 parameter); pass 2
sums its tensor's chunk partials in a fixed order (no float atomics: bit-identical run to run), then reads p, g,
g_prev, m, v and writes p, m, v, and g_prev with ``store_grads``. Floor (spec §9): 40 bytes per fp32 parameter for
MARS-AdamW, 44 with the copy of g into g_prev; MARS-Lion drops v (32 / 36).

    >>> mars_adamw_step(params, grads, prev_grads, exp_avgs, exp_avg_sqs, steps=[1] * len(params), lr=3e-3,
    ...                 betas=(0.95, 0.99), gamma=0.025, eps=1e-8, weight_decay=0.01)  # doctest: +SKIP
    >>> mars_lion_step(params, grads, prev_grads, exp_avgs, lr=1e-4, betas=(0.9, 0.99), gamma=0.025)  # doctest: +SKIP
"""

from __future__ import annotations

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
    tl,
    tl_dtype,
    triton,
    use_triton,
)
from hfx_kernels.adamw import per_tensor_steps, step_scalars, torch_fused_adamw, torch_fused_applies

UPDATES = ("adamw", "lion")


def mars_k(gamma: float, beta1: float) -> float:
    """The variance-reduction coefficient ``k = gamma * beta1 / (1 - beta1)`` (0.475 with the official defaults)."""
    return gamma * beta1 / (1.0 - beta1)


# --------------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------------


def mars_step_reference(params, grads, prev_grads, exp_avgs, exp_avg_sqs, *, k, betas, step_sizes, eps=None,
                        decay=1.0, update="adamw", store_grads=True) -> None:
    """The kernels' formula in plain torch, per tensor (see the module docstring). Updates ``params``, ``exp_avgs``,
    ``exp_avg_sqs`` (None for ``update="lion"``) and, with ``store_grads``, ``prev_grads`` in place. For Lion,
    ``step_sizes[i]`` is the learning rate and ``eps`` is unused."""
    beta1, beta2 = betas
    for i, (p, g, g_prev, m) in enumerate(zip(params, grads, prev_grads, exp_avgs, strict=True)):
        c_dtype = compute_dtype(p.dtype)
        g32 = g.to(c_dtype)
        c = (g32 - g_prev.to(c_dtype)).mul_(k).add_(g32)
        c.div_(torch.clamp(torch.linalg.vector_norm(c), min=1.0))  # out of place: a DTensor's norm is all-reduced
        m32 = m.to(c_dtype).mul_(beta1).add_(c, alpha=1.0 - beta1)
        if update == "lion":
            d = m32.sign()
        else:
            v = exp_avg_sqs[i]
            v32 = v.to(c_dtype).mul_(beta2).addcmul_(c, c, value=1.0 - beta2)
            d = m32 / v32.sqrt().add_(eps[i])
            v.copy_(v32)
        m.copy_(m32)
        p.copy_(p.to(c_dtype).mul_(decay).sub_(d, alpha=step_sizes[i]))
        if store_grads:
            g_prev.copy_(g)


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _mars_norm_kernel(chunks, numels, num_chunks, g_tab, gp_tab, partials, hyper, G_DTYPE: tl.constexpr,
                          GP_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """Pass 1: ``partials[chunk] = sum(c * c)`` over the chunk's elements."""
        pid = tl.program_id(0)
        t = tl.load(chunks + pid)
        start = tl.load(chunks + num_chunks + pid)
        n = tl.load(numels + t)
        g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DTYPE))
        gp_ptr = tl.load(gp_tab + t).to(tl.pointer_type(GP_DTYPE))
        k = tl.load(hyper + 0)
        acc = tl.zeros([BLOCK], dtype=C_DTYPE)
        for off in range(0, tl.minimum(CHUNK, n - start), BLOCK):  # a short tensor's chunk stops at its end
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < n
            g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(C_DTYPE)
            gp = tl.load(gp_ptr + idx, mask=mask, other=0.0).to(C_DTYPE)
            c = (g - gp) * k + g
            acc += c * c
        tl.store(partials + pid, tl.sum(acc, axis=0))

    @triton.jit
    def _mars_update_kernel(chunks, numels, num_chunks, first_chunk, chunk_count, partials, p_tab, g_tab, gp_tab,
                            m_tab, v_tab, step_sizes, eps_tab, hyper, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                            GP_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr,
                            LION: tl.constexpr, STORE_GRADS: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK: tl.constexpr):
        """Pass 2: the tensor's ||c||² from its chunk partials (same order in every program), then the update."""
        pid = tl.program_id(0)
        t = tl.load(chunks + pid)
        start = tl.load(chunks + num_chunks + pid)
        n = tl.load(numels + t)
        c0 = tl.load(first_chunk + t)
        nc = tl.load(chunk_count + t)
        sq = tl.zeros([BLOCK], dtype=C_DTYPE)
        for j in range(0, nc, BLOCK):
            jj = j + tl.arange(0, BLOCK)
            sq += tl.load(partials + c0 + jj, mask=jj < nc, other=0.0)
        denom = tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), 1.0)
        p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DTYPE))
        gp_ptr = tl.load(gp_tab + t).to(tl.pointer_type(GP_DTYPE))
        m_ptr = tl.load(m_tab + t).to(tl.pointer_type(S_DTYPE))
        step_size = tl.load(step_sizes + t)
        k = tl.load(hyper + 0)
        beta1 = tl.load(hyper + 1)
        one_minus_beta1 = tl.load(hyper + 2)
        beta2 = tl.load(hyper + 3)
        one_minus_beta2 = tl.load(hyper + 4)
        decay = tl.load(hyper + 5)
        eps = tl.load(eps_tab + t)
        for off in range(0, tl.minimum(CHUNK, n - start), BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < n
            g_raw = tl.load(g_ptr + idx, mask=mask, other=0.0)
            g = g_raw.to(C_DTYPE)
            gp = tl.load(gp_ptr + idx, mask=mask, other=0.0).to(C_DTYPE)
            c = ((g - gp) * k + g) / denom
            m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(C_DTYPE) * beta1 + one_minus_beta1 * c
            if LION:  # torch.sign: 0 at 0
                d = (m > 0).to(C_DTYPE) - (m < 0).to(C_DTYPE)
            else:
                v_ptr = tl.load(v_tab + t).to(tl.pointer_type(S_DTYPE))
                v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(C_DTYPE) * beta2 + one_minus_beta2 * (c * c)
                d = m / (tl.sqrt(v) + eps)
                tl.store(v_ptr + idx, v.to(S_DTYPE), mask=mask)
            tl.store(m_ptr + idx, m.to(S_DTYPE), mask=mask)
            p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(C_DTYPE)
            tl.store(p_ptr + idx, (p * decay - step_size * d).to(P_DTYPE), mask=mask)
            if STORE_GRADS:
                tl.store(gp_ptr + idx, g_raw.to(GP_DTYPE), mask=mask)


def mars_step_triton(params, grads, prev_grads, exp_avgs, exp_avg_sqs, *, k, betas, step_sizes, eps=None,
                     decay=1.0, update="adamw", store_grads=True) -> None:
    """The Triton implementation of :func:`mars_step_reference` (same arguments)."""
    lion = update == "lion"
    lists = {"params": params, "grads": grads, "prev_grads": prev_grads, "exp_avgs": exp_avgs}
    if not lion:
        lists["exp_avg_sqs"] = exp_avg_sqs
    for name, tensors in lists.items():
        check_contiguous(tensors, name, "mars_step")
    beta1, beta2 = betas
    for (device, p_dtype, g_dtype, gp_dtype, s_dtype), idx in group_by_dtype(
            len(params), params, grads, prev_grads, exp_avgs).items():
        if not lion and any(exp_avg_sqs[i].dtype != s_dtype for i in idx):
            raise ValueError("mars_step: exp_avgs and exp_avg_sqs must share a dtype")
        keep = [i for i in idx if params[i].numel()]
        if not keep:
            continue
        c = compute_dtype(p_dtype)
        numels = [params[i].numel() for i in keep]
        counts = [-(-n // CHUNK) for n in numels]
        firsts = [sum(counts[:j]) for j in range(len(counts))]
        table = TensorTable(numels, device)
        tab = {name: table.addresses([tensors[i] for i in keep]) for name, tensors in lists.items()}
        partials = torch.empty(table.num_chunks, dtype=c, device=device)
        hyper = table.floats([k, beta1, 1.0 - beta1, beta2, 1.0 - beta2, decay], c)
        dtypes = dict(G_DTYPE=tl_dtype(g_dtype), GP_DTYPE=tl_dtype(gp_dtype), C_DTYPE=tl_dtype(c))
        _mars_norm_kernel[(table.num_chunks,)](
            table.chunks, table.numels, table.num_chunks, tab["grads"], tab["prev_grads"], partials, hyper,
            CHUNK=CHUNK, BLOCK=BLOCK, **dtypes,
        )
        _mars_update_kernel[(table.num_chunks,)](
            table.chunks, table.numels, table.num_chunks, table.ints(firsts), table.ints(counts), partials,
            tab["params"], tab["grads"], tab["prev_grads"], tab["exp_avgs"], tab.get("exp_avg_sqs", tab["exp_avgs"]),
            table.floats([step_sizes[i] for i in keep], c),
            table.floats([1.0] * len(keep) if lion else [eps[i] for i in keep], c), hyper,
            P_DTYPE=tl_dtype(p_dtype), S_DTYPE=tl_dtype(s_dtype), LION=lion, STORE_GRADS=store_grads, CHUNK=CHUNK,
            BLOCK=BLOCK, **dtypes,
        )


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def mars_adamw_step(params: Sequence[Tensor], grads: Sequence[Tensor], prev_grads: Sequence[Tensor],
                    exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], *, steps: int | Sequence[int],
                    lr: float, betas: tuple[float, float], gamma: float, eps: float, weight_decay: float = 0.0,
                    store_grads: bool = True) -> None:
    """One MARS-AdamW step on every tensor (in place): the variance-reduced, Frobenius-clipped ``c`` drives AdamW
    (torch.optim.AdamW's form at each tensor's ``steps``, t >= 1 after incrementing; decoupled decay before the
    update). ``prev_grads`` holds g_prev (zeros at t = 1); with ``store_grads`` each ``grads[i]`` is copied into
    ``prev_grads[i]`` for the next step. Triton on CUDA, torch elsewhere."""
    check_same_shapes({"params": params, "grads": grads, "prev_grads": prev_grads, "exp_avgs": exp_avgs,
                       "exp_avg_sqs": exp_avg_sqs}, "mars_step")
    steps = per_tensor_steps(steps, len(params), "mars_step")
    step_sizes, eps_list = step_scalars(steps, lr=lr, betas=betas, eps=eps)
    tensors = [*params, *grads, *prev_grads, *exp_avgs, *exp_avg_sqs]
    if use_triton(tensors, "mars_step"):
        impl = mars_step_triton
    elif _fast_torch_applies(params, grads, prev_grads, exp_avgs, exp_avg_sqs):
        _mars_adamw_fast_torch(params, grads, prev_grads, exp_avgs, exp_avg_sqs, steps, lr=lr, betas=betas,
                               gamma=gamma, eps=eps, weight_decay=weight_decay, store_grads=store_grads)
        return
    else:
        impl = mars_step_reference
    impl(params, grads, prev_grads, exp_avgs, exp_avg_sqs, k=mars_k(gamma, betas[0]), betas=betas,
         step_sizes=step_sizes, eps=eps_list, decay=1.0 - lr * weight_decay, update="adamw", store_grads=store_grads)


def _fast_torch_applies(params, grads, prev_grads, exp_avgs, exp_avg_sqs) -> bool:
    """Whether the torch path can run in multi-tensor form: float32/float64 storage throughout (the reference computes
    bf16/fp16 tensors in float32, which foreach ops on them would not); no DTensor (``torch_fused_applies``: the
    reference's out-of-place norm is what all-reduces a sharded tensor's norm)."""
    return (torch_fused_applies(params, grads, exp_avgs, exp_avg_sqs)
            and all(p.dtype in (torch.float32, torch.float64) and p.dtype == gp.dtype
                    for p, gp in zip(params, prev_grads)))


def _mars_adamw_fast_torch(params, grads, prev_grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, gamma, eps,
                           weight_decay, store_grads) -> None:
    """The torch path in multi-tensor form: ``c = g + k (g - g_prev)`` by one lerp, its norm by a BLAS dot, then
    torch's fused AdamW kernel on ``c`` with the clip ``max(1, ||c||)`` as its gradient divisor (the same formula as
    :func:`mars_step_reference`, a few times faster on the CPU). Passes over memory: 14 (lerp 3, dot 1, AdamW 8 as
    it writes the clipped c back, copy into g_prev 2) against fused AdamW's 7; the Triton kernel's 11 need the norm
    and the update fused."""
    k = mars_k(gamma, betas[0])
    grads, prev_grads = list(grads), list(prev_grads)
    if store_grads:  # g_prev is overwritten with g below anyway: c is built in its buffer (no allocation)
        c = prev_grads
        # weight >= 0.5: lerp computes g - (g - g_prev)(1 - w), i.e. g + k (g - g_prev), the reference's form
        torch._foreach_lerp_(c, grads, 1.0 + k)
    else:
        c = torch._foreach_lerp(prev_grads, grads, 1.0 + k)
    norms = [torch.dot(x.view(-1), x.view(-1)) for x in c]  # BLAS dot: ~2x faster than torch's norm on the CPU
    torch._foreach_sqrt_(norms)
    torch._foreach_clamp_min_(norms, 1.0)
    common = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if all(n.dtype == torch.float32 for n in norms):  # torch's kernel takes a float32 divisor: the clip rides in it
        for i in range(len(params)):
            torch_fused_adamw([params[i]], [c[i]], [exp_avgs[i]], [exp_avg_sqs[i]], [steps[i]], grad_divisor=norms[i],
                              **common)
    else:
        torch._foreach_div_(c, norms)
        torch_fused_adamw(params, c, exp_avgs, exp_avg_sqs, steps, **common)
    if store_grads:
        torch._foreach_copy_(prev_grads, grads)


def mars_lion_step(params: Sequence[Tensor], grads: Sequence[Tensor], prev_grads: Sequence[Tensor],
                   exp_avgs: Sequence[Tensor], *, lr: float, betas: tuple[float, float], gamma: float,
                   weight_decay: float = 0.0, store_grads: bool = True) -> None:
    """One MARS-Lion step on every tensor (in place): ``m = beta1*m + (1-beta1)*c``,
    ``p = p * (1 - lr*wd) - lr * sign(m)``. Only ``betas[0]`` is used. ``prev_grads`` and ``store_grads`` as in
    :func:`mars_adamw_step`. Triton on CUDA, torch elsewhere."""
    check_same_shapes({"params": params, "grads": grads, "prev_grads": prev_grads, "exp_avgs": exp_avgs}, "mars_step")
    tensors = [*params, *grads, *prev_grads, *exp_avgs]
    impl = mars_step_triton if use_triton(tensors, "mars_step") else mars_step_reference
    impl(params, grads, prev_grads, exp_avgs, None, k=mars_k(gamma, betas[0]), betas=betas,
         step_sizes=[lr] * len(params), decay=1.0 - lr * weight_decay, update="lion", store_grads=store_grads)
