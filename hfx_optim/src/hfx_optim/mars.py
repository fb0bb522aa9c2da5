"""MARS: variance-reduced preconditioned optimisation (Yuan, Liu, Wu, Zhou, Gu; ICML 2025).

Paper: "MARS: Unleashing the Power of Variance Reduction for Training Large Models", arXiv 2411.10438.

The update is written as pure per-step functions over lists of tensors (:func:`mars_adamw_step`,
:func:`mars_lion_step`, :func:`mars_shampoo_step`, :func:`adamw_1d_step`); :class:`MARS` only gathers the lists and
owns the state. They run on :mod:`hfx_kernels`: the two-pass multi-tensor MARS kernel (:mod:`hfx_kernels.mars`) and
the AdamW kernel (:mod:`hfx_kernels.adamw`), Triton on CUDA and torch elsewhere (``HFX_KERNELS`` forces one);
MARS-Shampoo's Newton–Schulz step stays in torch. Element-wise arithmetic is float32 (float64 for float64
parameters) whatever the storage dtype.

For a parameter on the MARS path (a 2-D tensor, or every tensor with ``optimize_1d=True``), at step ``t >= 1``::

    k      = gamma * beta1 / (1 - beta1)
    c      = g + k * (g - g_prev)                     # g_prev = 0 at t = 1
    c      = c / max(1, ||c||_F)                      # per-tensor Frobenius clip at 1
    m      = beta1 * m + (1 - beta1) * c
    adamw:   v = beta2 * v + (1 - beta2) * c * c
             p = p - lr*wd*p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    lion:    p = p - lr * (wd*p + sign(m))
    shampoo: p = p - lr * (NS5(m / (1 - beta1)) * sqrt(max(1, rows/cols)) + wd*p)     (2-D; other shapes: adamw)

Every other parameter gets AdamW on the raw gradient ``g`` with ``betas_1d``, the learning rate
``lr * lr_1d / lr_at_construction`` and ``weight_decay_1d``, in the same bias-corrected form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hfx_kernels import mars as kernels

from ._common import (
    Steps,
    check_betas,
    check_bool,
    complex_param_error,
    describe_param,
    finish_added_group,
    is_dtensor,
    params_with_grad,
    per_param,
    run_closure,
    sparse_grad_error,
)
from ._common import adamw_step as adamw_1d_step  # AdamW in torch's form for the parameters MARS leaves to AdamW

__all__ = [
    "MARS",
    "MARS_TYPES",
    "NS5_COEFFICIENTS",
    "adamw_1d_step",
    "mars_adamw_step",
    "mars_correction",
    "mars_lion_step",
    "mars_shampoo_step",
    "newton_schulz5",
]

MARS_TYPES = ("adamw", "lion", "shampoo")
WEIGHT_DECAY_1D_MODES = ("group", "always")
NS_DTYPES = ("bfloat16", "float16", "float32", "float64")
NS5_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Newton–Schulz quintic (a, b, c)


# --------------------------------------------------------------------------------------------------
# Pure update functions (lists of tensors in, tensors updated in place)
# --------------------------------------------------------------------------------------------------


def mars_correction(grad: Tensor, prev_grad: Tensor, *, gamma: float, beta1: float) -> Tensor:
    """The variance-reduced gradient ``c = g + gamma*beta1/(1-beta1) * (g - g_prev)``, divided by its Frobenius norm
    when that norm exceeds 1. Returns a new tensor; the inputs are not modified."""
    k = gamma * beta1 / (1.0 - beta1)
    c = torch.sub(grad, prev_grad).mul_(k).add_(grad)
    # c / max(1, ||c||) equals the official `if norm > 1: c = c / norm` and needs no device-to-host sync
    # (out of place: a DTensor's norm is then all-reduced across its shards)
    return c.div_(torch.clamp(torch.linalg.vector_norm(c), min=1.0))


def _corrected(g: Tensor, g_prev: Tensor, *, gamma: float, beta1: float, store_grads: bool) -> Tensor:
    """:func:`mars_correction`; with ``store_grads``, ``g`` is then copied into ``g_prev`` for the next step."""
    c = mars_correction(g, g_prev, gamma=gamma, beta1=beta1)
    if store_grads:
        g_prev.copy_(g)
    return c


def mars_adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    prev_grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step: Steps,
    lr: float,
    betas: tuple[float, float],
    gamma: float,
    eps: float,
    weight_decay: float,
    store_grads: bool = True,
) -> None:
    """One MARS-AdamW step on every tensor of ``params`` (in place), by the multi-tensor MARS kernel
    (:func:`hfx_kernels.mars.mars_adamw_step`: Triton on CUDA, torch elsewhere; ``HFX_KERNELS`` forces one).

    ``step`` is the step number t >= 1 (after incrementing), one int for all or one per parameter. ``prev_grads``
    holds g_prev (zeros at t = 1). With ``store_grads`` (approximate MARS) each ``grads[i]`` is copied into
    ``prev_grads[i]`` after use, for the next step.
    """
    kernels.mars_adamw_step(params, grads, prev_grads, exp_avgs, exp_avg_sqs, steps=per_param(step, len(params)),
                            lr=lr, betas=betas, gamma=gamma, eps=eps, weight_decay=weight_decay,
                            store_grads=store_grads)


def mars_lion_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    prev_grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    gamma: float,
    weight_decay: float,
    store_grads: bool = True,
) -> None:
    """One MARS-Lion step (in place): ``m = beta1*m + (1-beta1)*c``, ``p -= lr*(wd*p + sign(m))``, by the
    multi-tensor MARS kernel (:func:`hfx_kernels.mars.mars_lion_step`).

    Only ``betas[0]`` is used; no second moment is kept (the official code allocates one it never reads).
    """
    kernels.mars_lion_step(params, grads, prev_grads, exp_avgs, lr=lr, betas=betas, gamma=gamma,
                           weight_decay=weight_decay, store_grads=store_grads)


def newton_schulz5(x: Tensor, *, steps: int = 5, eps: float = 1e-8, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate orthogonalisation of a 2-D ``x`` by the Newton–Schulz quintic
    ``X <- a*X + (b*A + c*A@A) @ X`` with ``A = X @ X^T`` and (a, b, c) = (3.4445, -4.7750, 2.0315), run in ``dtype``
    on ``x / (||x||_F + eps)``, on the transpose when rows > cols. Returns a tensor of ``dtype``."""
    if x.ndim != 2:
        raise ValueError(f"newton_schulz5 needs a 2-D tensor, got shape {tuple(x.shape)}")
    a, b, c = NS5_COEFFICIENTS
    y = x.to(dtype)
    y = y / (torch.linalg.vector_norm(y) + eps)
    transposed = y.shape[0] > y.shape[1]
    if transposed:
        y = y.mT
    for _ in range(steps):
        gram = y @ y.mT
        y = a * y + (b * gram + c * (gram @ gram)) @ y
    return y.mT if transposed else y


def mars_shampoo_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    prev_grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor | None],
    *,
    step: Steps,
    lr: float,
    betas: tuple[float, float],
    gamma: float,
    eps: float,
    weight_decay: float,
    ns_steps: int = 5,
    ns_dtype: torch.dtype = torch.bfloat16,
    store_grads: bool = True,
) -> None:
    """One MARS-Shampoo step (in place). A 2-D parameter moves by
    ``-lr * (NS5(m/(1-beta1)) * sqrt(max(1, rows/cols)) + wd*p)`` (``exp_avg_sqs[i]`` may be None for it); any other
    shape takes the MARS-AdamW update on ``c`` with its ``exp_avg_sqs[i]`` (all of them in one call of the MARS
    kernel)."""
    beta1 = betas[0]
    steps = per_param(step, len(params))
    others = [i for i, p in enumerate(params) if p.ndim != 2]
    if others:
        lists = [[lst[i] for i in others] for lst in (params, grads, prev_grads, exp_avgs, exp_avg_sqs)]
        mars_adamw_step(*lists, step=[steps[i] for i in others], lr=lr, betas=betas, gamma=gamma, eps=eps,
                        weight_decay=weight_decay, store_grads=store_grads)
    for p, g, g_prev, m in zip(params, grads, prev_grads, exp_avgs, strict=True):
        if p.ndim != 2:
            continue
        c = _corrected(g, g_prev, gamma=gamma, beta1=beta1, store_grads=store_grads)
        m.mul_(beta1).add_(c, alpha=1.0 - beta1)
        direction = newton_schulz5(m / (1.0 - beta1), steps=ns_steps, eps=eps, dtype=ns_dtype).to(p.dtype)
        scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        if weight_decay != 0:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(direction, alpha=-lr * scale)




# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------


def _normalize_mars_type(value: Any) -> str:
    name = str(value).lower()
    name = name.removeprefix("mars-").removeprefix("mars_")
    if name not in MARS_TYPES:
        raise ValueError(
            f"unknown mars_type {value!r}: use one of {', '.join(repr(t) for t in MARS_TYPES)} "
            "(the official names 'mars-adamw', 'mars-lion', 'mars-shampoo' are accepted too)"
        )
    return name


def _check_nonneg(name: str, value: Any, hint: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}; {hint}")
    return value


def _dtype_name(value: Any) -> str:
    name = str(value).removeprefix("torch.")
    if name not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {', '.join(NS_DTYPES)}, got {value!r}")
    return name


class MARS(torch.optim.Optimizer):
    r"""MARS (Make vAriance Reduction Shine): AdamW, Lion or Shampoo driven by a variance-reduced gradient.

    Paper: Yuan, Liu, Wu, Zhou, Gu, "MARS: Unleashing the Power of Variance Reduction for Training Large Models"
    (ICML 2025), arXiv `2411.10438 <https://arxiv.org/abs/2411.10438>`_. Written from the update rule of the hfx
    optimizer spec (§2.1), which restates the official ``MARS/optimizers/mars.py``; the full formulas are in the
    module docstring.

    Example::

        import hfx
        from transformers import Trainer

        trainer = Trainer(model, args, train_dataset=ds, optimizer_cls_and_kwargs=hfx.optimizer("mars", lr=3e-3))

        # or in an hfx trainer config (YAML: `hfx_optimizer: mars`)
        args = hfx.extend(SFTConfig)(output_dir="out", hfx_optimizer="mars", hfx_optimizer_args={"gamma": 0.025})

        # or directly
        opt = hfx.MARS(model.parameters(), lr=3e-3, weight_decay=0.01)

    Through ``hfx_optimizer``/``hfx.optimizer(args=...)`` the Trainer's ``learning_rate``, ``adam_beta1/2`` and
    ``adam_epsilon`` fill ``lr``, ``betas`` and ``eps``: pass ``betas=(0.95, 0.99)`` in ``hfx_optimizer_args`` for the
    paper's betas. Trainer puts biases and norms in a group with ``weight_decay=0`` (see ``weight_decay_1d_mode``).

    Args (defaults are the official constructor's unless noted):
        params: parameters or parameter groups. Every argument below may be overridden per group.
        lr: learning rate of the MARS path (3e-3). The GPT-2 recipes use 6e-3 (small) … 2e-3 (XL) with weight decay
            1e-2 and gradient clipping at 1.0.
        betas: (beta1, beta2) of the MARS path, (0.95, 0.99). On the 300-step toy benchmark AdamW's (0.9, 0.999)
            converged clearly better (0.94x AdamW's loss vs 1.03x; benchmarks/results/optim_convergence.md):
            tune them, as MARS issue #7 suggests.
        eps: added to sqrt(v / bias_correction2) (1e-8).
        weight_decay: decoupled weight decay of the MARS path, ``p -= lr * weight_decay * p`` (0.0).
        gamma: variance-reduction scale gamma (0.025); 0 makes MARS-AdamW AdamW with a Frobenius clip at 1 on the
            gradient.
        mars_type: "adamw" (default), "lion" or "shampoo" (the official "mars-adamw" etc. are accepted).
            "shampoo" uses 5 Newton–Schulz steps (``ns_steps``) in bfloat16 (``ns_dtype``) on 2-D parameters.
        is_approx: True (default, MARS-approx, recommended by the paper): g_prev is the previous step's gradient,
            which the optimizer copies into its own buffer (it never aliases ``p.grad``, so reused gradient buckets
            are safe). False (exact MARS): g_prev must be the gradient of the *current* batch at the *previous*
            parameters, supplied by the caller (see :meth:`step` and :meth:`set_prev_grads`); it costs a second
            forward/backward per step and a custom loop (Trainer calls ``step()`` without arguments).
        optimize_1d: put every parameter on the MARS path (False: only 2-D ones; the rest, including biases,
            norms and 3-D/4-D convolution weights, get AdamW on the raw gradient). "2-D" means ``ndim == 2``, as
            in the official code; embeddings and ``lm_head`` are 2-D.
        lr_1d: learning rate of the AdamW path at construction; it follows the scheduler by the fixed ratio
            ``lr_1d / lr``. Default None means "equal to ``lr``" (the official default is 3e-3, equal to its
            default ``lr``; a fixed 3e-3 next to Trainer's ``learning_rate`` would be a surprise).
        betas_1d: betas of the AdamW path, (0.9, 0.95).
        weight_decay_1d: weight decay of the AdamW path (0.1).
        weight_decay_1d_mode: how ``weight_decay_1d`` meets a group's ``weight_decay``.
            "group" (default, what HF users expect): a group with ``weight_decay == 0`` (Trainer's no-decay group of
            biases and norms, or a plain ``MARS(params)`` with the default ``weight_decay=0``) is not decayed on the
            AdamW path; other groups use ``weight_decay_1d``.
            "always" (the official code): every AdamW-path parameter decays by ``weight_decay_1d``, whatever its
            group says.
        ns_steps, ns_dtype: Newton–Schulz iterations (5) and the dtype they run in ("bfloat16") for "shampoo".

    State per parameter (tensors and ints only, so ``torch.load(weights_only=True)`` resumes it): ``step`` (int),
    ``exp_avg``, ``exp_avg_sq`` (not for Lion or Shampoo matrices), ``prev_grad`` (MARS path: g_prev; in exact mode
    only while one is pending) and ``next_prev_grad`` (exact mode, after :meth:`set_prev_grads`).
    Memory on the MARS path: 3 buffers per parameter in approximate mode (AdamW keeps 2), 4 in exact mode.

    Distributed: DDP works (every rank computes the same step). FSDP2 (DTensor) works for "adamw" and "lion": the
    state is created from the sharded parameter at the first step and each tensor's norm is all-reduced across its
    shards, so a sharded run steps like an unsharded one; those tensors take the torch path (the Triton kernel
    indexes local storage). "shampoo" refuses sharded matrices (Newton-Schulz needs the whole matrix). FSDP1
    flattens parameters into slices of a flat shard: MARS refuses them (use FSDP2 or DDP). DeepSpeed ZeRO also
    flattens parameters to 1-D, which MARS cannot detect: they would all take the AdamW path; use FSDP2 or DDP.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        gamma: float = 0.025,
        mars_type: str = "adamw",
        is_approx: bool = True,
        optimize_1d: bool = False,
        lr_1d: float | None = None,
        betas_1d: tuple[float, float] = (0.9, 0.95),
        weight_decay_1d: float = 0.1,
        weight_decay_1d_mode: str = "group",
        ns_steps: int = 5,
        ns_dtype: str | torch.dtype = "bfloat16",
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma=gamma, mars_type=mars_type,
            is_approx=is_approx, optimize_1d=optimize_1d, lr_1d=lr_1d, betas_1d=betas_1d,
            weight_decay_1d=weight_decay_1d, weight_decay_1d_mode=weight_decay_1d_mode, ns_steps=ns_steps,
            ns_dtype=ns_dtype,
        )
        self._validate_group(defaults)  # fail on bad defaults even if every group overrides them; normalise them
        super().__init__(params, defaults)

    # -- groups ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        """Check and normalise a parameter group in place; every error says how to fix it."""
        group["lr"] = _check_nonneg("lr", group["lr"], "pass a positive learning rate, e.g. lr=3e-3")
        group["eps"] = _check_nonneg("eps", group["eps"], "pass e.g. eps=1e-8")
        group["weight_decay"] = _check_nonneg("weight_decay", group["weight_decay"], "pass e.g. weight_decay=0.01")
        group["gamma"] = _check_nonneg("gamma", group["gamma"], "the paper uses gamma=0.025; 0 turns the correction off")
        group["betas"] = check_betas(group["betas"], example="(0.95, 0.99)")
        group["betas_1d"] = check_betas(group["betas_1d"], name="betas_1d", example="(0.95, 0.99)")
        group["weight_decay_1d"] = _check_nonneg(
            "weight_decay_1d", group["weight_decay_1d"], "pass e.g. weight_decay_1d=0.1, or 0 for none"
        )
        group["mars_type"] = _normalize_mars_type(group["mars_type"])
        if group["weight_decay_1d_mode"] not in WEIGHT_DECAY_1D_MODES:
            raise ValueError(
                f"weight_decay_1d_mode must be 'group' (respect a group's weight_decay=0) or 'always' (official: "
                f"always apply weight_decay_1d), got {group['weight_decay_1d_mode']!r}"
            )
        if group["lr_1d"] is not None:
            group["lr_1d"] = _check_nonneg("lr_1d", group["lr_1d"], "pass e.g. lr_1d=3e-3, or None to use lr")
        if not isinstance(group["ns_steps"], int) or group["ns_steps"] < 1:
            raise ValueError(f"ns_steps must be a positive int (5 in the paper), got {group['ns_steps']!r}")
        group["ns_dtype"] = _dtype_name(group["ns_dtype"])
        for flag in ("is_approx", "optimize_1d"):
            check_bool(flag, group[flag])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        finish_added_group(self.param_groups, self._finish_group)

    def _finish_group(self, group: dict[str, Any]) -> None:
        self._validate_group(group)
        for p in group["params"]:
            if p.is_complex():
                raise complex_param_error("MARS", f"shape {tuple(p.shape)}")
        if "lr_1d_ratio" not in group:
            # the AdamW path's learning rate is lr * lr_1d_ratio: the scheduler scales both paths together
            if group["lr_1d"] is None:
                group["lr_1d_ratio"] = 1.0
            elif group["lr"] > 0:
                group["lr_1d_ratio"] = group["lr_1d"] / group["lr"]
            elif group["lr_1d"] == 0:
                group["lr_1d_ratio"] = 0.0
            else:
                raise ValueError(
                    f"lr_1d={group['lr_1d']} needs lr > 0 at construction (the AdamW path runs at "
                    "lr * lr_1d / lr_at_construction); pass the initial lr, or lr_1d=None to use lr"
                )

    # -- exact MARS: supplying the gradient at the previous parameters ----------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _by_param(self, grads: Sequence[Tensor | None] | Mapping[Tensor, Tensor], what: str) -> dict[int, Tensor]:
        params = self._params()
        if isinstance(grads, Mapping):
            known = {id(p) for p in params}
            out = {id(p): g for p, g in grads.items() if g is not None}
            if not set(out) <= known:
                raise ValueError(f"{what} names a tensor that is not a parameter of this optimizer")
        else:
            grads = list(grads)
            if len(grads) != len(params):
                raise ValueError(
                    f"{what} has {len(grads)} entries but the optimizer has {len(params)} parameters; pass one "
                    "gradient (or None) per parameter, in param_groups order, or a {param: grad} dict"
                )
            out = {id(p): g for p, g in zip(params, grads, strict=True) if g is not None}
        shapes = {id(p): p for p in params}
        for key, g in out.items():
            p = shapes[key]
            if not isinstance(g, Tensor) or g.shape != p.shape:
                got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                raise ValueError(f"{what}: a gradient for a parameter of shape {tuple(p.shape)} has shape {got}")
            if g.is_sparse:
                raise ValueError(f"{what}: sparse gradients are not supported; pass dense tensors (g.to_dense())")
        return out

    def _require_exact(self, what: str) -> None:
        approx = [i for i, group in enumerate(self.param_groups) if group["is_approx"]]
        if approx:
            raise ValueError(
                f"{what} is for exact MARS; param group(s) {approx} use is_approx=True, which reuses the previous "
                "step's gradient. Construct MARS(..., is_approx=False) to supply gradients at the previous parameters."
            )

    @torch.no_grad()
    def set_prev_grads(self, grads: Sequence[Tensor | None] | Mapping[Tensor, Tensor] | None = None) -> None:
        """Exact MARS, official training loop: record the gradient of the **next** batch at the **current**
        parameters (default: a copy of every ``p.grad`` now), before the :meth:`step` that moves the parameters.
        That step keeps it; the step after it, which sees that batch, uses it as g_prev (the batch's gradient at the
        parameters one step back, grad f(x_{t-1}, xi_t) in the paper's notation)::

            opt = MARS(model.parameters(), is_approx=False)
            for batch, next_batch in pairwise(loader):
                loss_fn(model, next_batch).backward()   # next batch's gradient at the current parameters
                opt.set_prev_grads()
                opt.zero_grad()
                loss_fn(model, batch).backward()
                opt.step()                              # step 1 uses g_prev = 0, as the official code does

        ``grads``: one tensor (or None) per parameter in ``param_groups`` order, or a ``{param: grad}`` dict. The
        values are copied.
        """
        self._require_exact("set_prev_grads")
        params = self._params()
        by_id = self._by_param([p.grad for p in params] if grads is None else grads, "set_prev_grads")
        for p in params:
            g = by_id.get(id(p))
            if g is not None:
                self.state[p]["next_prev_grad"] = g.detach().to(dtype=p.dtype, device=p.device, copy=True)

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        prev_grads: Sequence[Tensor | None] | Mapping[Tensor, Tensor] | None = None,
    ):
        """One optimizer step. Returns the closure's loss when a ``closure`` is given.

        ``prev_grads`` (exact MARS only): g_prev for *this* step, the gradient of the current batch at the previous
        parameters, as one tensor (or None) per parameter in ``param_groups`` order or a ``{param: grad}`` dict; it
        takes precedence over one recorded by :meth:`set_prev_grads`. In exact mode a MARS-path parameter after its
        first step must get g_prev one of these two ways; at its first step g_prev defaults to 0. Passing the
        previous step's gradients here reproduces approximate MARS exactly.
        """
        loss = run_closure(closure)
        supplied: dict[int, Tensor] = {}
        if prev_grads is not None:
            self._require_exact("prev_grads")
            supplied = self._by_param(prev_grads, "prev_grads")
        self._check_grads(supplied)  # before any state changes: an error leaves the optimizer as it was
        for group in self.param_groups:
            self._step_group(group, supplied)
        return loss

    @staticmethod
    def _on_mars_path(group: dict[str, Any], p: Tensor) -> bool:
        return group["optimize_1d"] or p.ndim == 2

    def _check_grads(self, supplied: dict[int, Tensor]) -> None:
        for group, i, p in params_with_grad(self.param_groups):
            if p.grad.is_sparse:
                raise sparse_grad_error("MARS", f"parameter of shape {tuple(p.shape)}",
                                        ", or another optimizer for that parameter")
            if getattr(p, "_fsdp_flattened", False):  # FSDP1 marks its flat parameters and the views into them
                raise ValueError(
                    f"MARS: {describe_param(group, i, p)} was flattened by FSDP1 (FullyShardedDataParallel): its "
                    "gradient is a slice of a flat shard, so MARS cannot compute the parameter's norm or tell a "
                    "matrix from a bias. Use FSDP2 (torch.distributed.fsdp.fully_shard; accelerate: fsdp_version: 2) "
                    "or DDP."
                )
            if group["mars_type"] == "shampoo" and p.ndim == 2 and is_dtensor(p):
                raise ValueError(
                    f"MARS: {describe_param(group, i, p)} is a DTensor (FSDP2-sharded, placements "
                    f"{tuple(p.placements)}); mars_type='shampoo' orthogonalises whole matrices (Newton-Schulz), which "
                    "a shard is not. Use mars_type='adamw' or 'lion' (elementwise, per-tensor norms all-reduced: "
                    "they work on FSDP2 shards), or train with DDP."
                )
            state = self.state.get(p, {})
            if (
                not group["is_approx"]
                and self._on_mars_path(group, p)
                and state.get("step", 0) >= 1
                and id(p) not in supplied
                and "prev_grad" not in state
            ):
                raise RuntimeError(
                    f"exact MARS (is_approx=False), step {state['step'] + 1}: no gradient at the previous "
                    f"parameters for a parameter of shape {tuple(p.shape)}. Pass step(prev_grads=...) or call "
                    "set_prev_grads() before the previous step(); or use is_approx=True to reuse the last gradient."
                )

    def _step_group(self, group: dict[str, Any], supplied: dict[int, Tensor]) -> None:
        mars_type, approx = group["mars_type"], group["is_approx"]
        mars_p, mars_g, mars_prev, mars_m, mars_v, mars_t = [], [], [], [], [], []
        adam_p, adam_g, adam_m, adam_v, adam_t = [], [], [], [], []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            state = self.state[p]
            on_mars_path = self._on_mars_path(group, p)
            if "step" not in state:  # lazily, from the actual (possibly sharded) parameter
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if not on_mars_path or mars_type == "adamw" or (mars_type == "shampoo" and p.ndim != 2):
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if on_mars_path and approx:
                    state["prev_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            if not on_mars_path:
                adam_p.append(p)
                adam_g.append(g)
                adam_m.append(state["exp_avg"])
                adam_v.append(state["exp_avg_sq"])
                adam_t.append(state["step"])
                continue
            if approx:
                g_prev = state["prev_grad"]
            elif id(p) in supplied:
                g_prev = supplied[id(p)].to(dtype=g.dtype, device=g.device)
            elif "prev_grad" in state:
                g_prev = state["prev_grad"]
            else:  # first step (checked in _check_grads): g_prev = 0, as in the official code
                g_prev = torch.zeros_like(g)
            mars_p.append(p)
            mars_g.append(g)
            mars_prev.append(g_prev)
            mars_m.append(state["exp_avg"])
            mars_v.append(state.get("exp_avg_sq"))
            mars_t.append(state["step"])

        if mars_p:
            common = dict(lr=group["lr"], betas=group["betas"], gamma=group["gamma"], weight_decay=group["weight_decay"],
                          store_grads=approx)
            if mars_type == "adamw":
                mars_adamw_step(mars_p, mars_g, mars_prev, mars_m, mars_v, step=mars_t, eps=group["eps"], **common)
            elif mars_type == "lion":
                mars_lion_step(mars_p, mars_g, mars_prev, mars_m, **common)
            else:
                mars_shampoo_step(
                    mars_p, mars_g, mars_prev, mars_m, mars_v, step=mars_t, eps=group["eps"], ns_steps=group["ns_steps"],
                    ns_dtype=getattr(torch, group["ns_dtype"]), **common,
                )
            if not approx:  # a g_prev is used once; a recorded one becomes the next step's
                for p in mars_p:
                    state = self.state[p]
                    state.pop("prev_grad", None)
                    if "next_prev_grad" in state:
                        state["prev_grad"] = state.pop("next_prev_grad")
        if adam_p:
            decay = group["weight_decay_1d"]
            if group["weight_decay_1d_mode"] == "group" and group["weight_decay"] == 0:
                decay = 0.0  # e.g. Trainer's no-decay group (biases, norms)
            adamw_1d_step(
                adam_p, adam_g, adam_m, adam_v, step=adam_t, lr=group["lr"] * group["lr_1d_ratio"],
                betas=group["betas_1d"], eps=group["eps"], weight_decay=decay,
            )
