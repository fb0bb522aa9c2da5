"""FRUGAL: full-rank updates with gradient splitting (Zmushko, Beznosikov, Takáč, Horváth; ICML 2025).

Paper: "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training", arXiv 2411.07837.

The gradient ``G`` of a targeted parameter is split into a *state-full* part, which lives in a small subspace and gets
AdamW, and a *state-free* remainder, which gets signSGD (or SGD), so every update is full-rank while the optimizer
keeps moments only for the subspace (hfx optimizer spec §5.1). With ``s`` the steps taken since the subspace was
last chosen and ``t`` the bias-correction step::

    if s % update_gap == 0:   choose the subspace (below); reset_statistics: M = V = 0, t = 0
    W = W * (1 - lr * weight_decay)                     # decoupled, before the update, with the unscaled lr
    t += 1
    R = down(G)                                         # the state-full coordinates
    M = b1 M + (1 - b1) R ;  V = b2 V + (1 - b2) R^2
    D = (M / (1 - b1^t)) / (sqrt(V) / sqrt(1 - b2^t) + eps)          # torch.optim.AdamW's form
    W = W - lr * s_p * up(D) - lr * s_p * s_i * f(G - up(R))         # f = sign (sign_sgd), identity (sgd), 0 (no)

``s_p`` is ``proj_params_lr_scale`` and ``s_i`` ``inactive_lr_scale``. The subspace (``subspace``) is one of:

- ``"svd"``: the top ``r = round(density * k)`` singular vectors of the current gradient on the side ``proj_side``
  chooses (k its length; ``"std"`` projects the shorter side), i.e. the GaLore projector: ``down(G) = P^T G`` or
  ``G P^T`` and ``up`` multiplies back (see :mod:`hfx_optim.projection`);
- ``"random"``: the same with a random semi-orthogonal ``P`` (QR of a seeded Gaussian matrix);
- ``"columns"`` / ``"rows"`` / ``"randk"``: ``floor(density * n)`` random columns, ``floor(density * m)`` random rows,
  or ``floor(density * m * n)`` random entries; ``down`` gathers them and ``up`` scatters into zeros, so the state-free
  part is ``G`` with those coordinates zeroed;
- ``"block"``: whole tensors (BAdam-style): ``round(density * N)`` of the group's N tensors are active (AdamW on all
  of ``G``), the others are updated by the state-free rule only. At every refresh all of the group's state is cleared
  and the next tensors are activated, walking from the last tensor backwards (``block_order="descending"``) or at
  random (``"random"``).

Every parameter outside the targeted groups takes AdamW (same form, no scales). Random choices come from CPU
generators seeded by integers kept in the optimizer state, not from the global RNG, so a resumed run is bit-identical
and every DDP rank picks the same subspace.

The per-step math is the pure function :func:`frugal_step` over lists of tensors (with :func:`split_gradient`
stating the split); :class:`FRUGAL` owns the state and the subspace refreshes. Its element-wise parts run on
:mod:`hfx_kernels` multi-tensor kernels (AdamW, the Adam direction, the state-free signSGD/SGD step; Triton on CUDA,
torch elsewhere, ``HFX_KERNELS`` forces one), in float32 (float64 for float64 parameters) whatever the storage
dtype; projections, gathers and scatters stay torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hfx_kernels.adamw import adam_direction, adamw_step
from hfx_kernels.sign_sgd import sign_sgd_step

from ._common import (
    Steps,
    check_beta_range,
    check_bool,
    check_choice,
    check_int,
    complex_param_error,
    describe_param,
    finish_added_group,
    is_dtensor,
    local_part,
    params_with_grad,
    per_param,
    replicated_like,
    run_closure,
    sparse_grad_error,
    with_offsets,
    zeros_sharded_like,
)
from .galore2 import factory_signature
from .projection import (
    SVD_METHODS,
    back_project_update,
    compute_projectors,
    is_row_sharded,
    projection_sides,
    sharded_right_basis,
    sketch_seed,
    svd_dtype,
)
from .targets import TARGET_FLAG, ModelOptimizerFactory

__all__ = [
    "BLOCK_ORDERS",
    "FRUGAL",
    "FRUGAL_KEYS",
    "INACTIVE_UPDATE_RULES",
    "PROJ_SIDES",
    "SUBSPACES",
    "FRUGALFactory",
    "Subspace",
    "frugal_step",
    "split_gradient",
    "subspace_size",
]

SUBSPACES = ("block", "svd", "random", "columns", "rows", "randk")
PROJECTION_SUBSPACES = ("svd", "random")
COORDINATE_SUBSPACES = ("columns", "rows", "randk")
INACTIVE_UPDATE_RULES = ("sign_sgd", "sgd", "no")
BLOCK_ORDERS = ("descending", "random")
PROJ_SIDES = ("std", "reverse_std", "left", "right")  # "full" (two-sided) has no single side for density to size
# the options that belong to the targeted groups (ModelOptimizerFactory.target_keys)
FRUGAL_KEYS = ("density", "update_gap", "subspace", "proj_side", "block_order", "inactive_update_rule",
               "inactive_lr_scale", "proj_params_lr_scale", "reset_statistics", "svd", "oversample", "power_iters",
               "seed")


# --------------------------------------------------------------------------------------------------
# Pure update functions (lists of tensors in, tensors updated in place)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subspace:
    """Where the state-full part of an m×n gradient lives (tensors only; built from the optimizer state each step).

    - ``left`` (m×r, orthonormal columns) and/or ``right`` (r×n, orthonormal rows): a projection;
    - ``index`` with ``dim`` 0 (rows), 1 (columns) or None (flat entries): coordinates;
    - nothing: the whole tensor (a block-active parameter, or an AdamW parameter).

    ``complete=True`` says the basis spans the whole projected side (rank = side), so the state-free part is exactly
    zero; without it the residual ``G - P P^T G`` would be rounding noise, which ``sign`` turns into ±1 steps.
    """

    left: Tensor | None = None
    right: Tensor | None = None
    index: Tensor | None = None
    dim: int | None = None
    complete: bool = False

    @property
    def whole(self) -> bool:
        return self.left is None and self.right is None and self.index is None


WHOLE = Subspace()


def _down(grad: Tensor, sub: Subspace) -> Tensor:
    if sub.index is not None:
        return grad.reshape(-1)[sub.index] if sub.dim is None else grad.index_select(sub.dim, sub.index)
    out = grad
    if sub.left is not None:
        out = sub.left.mT @ out
    if sub.right is not None:
        out = out @ sub.right.mT
    return out


def _up(low: Tensor, sub: Subspace, shape: torch.Size) -> Tensor:
    if sub.index is not None:
        full = low.new_zeros(shape)
        if sub.dim is None:
            full.view(-1)[sub.index] = low
        else:
            full.index_copy_(sub.dim, sub.index, low)
        return full
    out = low
    if sub.left is not None:
        out = sub.left @ out
    if sub.right is not None:
        out = out @ sub.right
    return out


def _state_free_part(grad: Tensor, sub: Subspace | None, low: Tensor | None) -> Tensor | None:
    """``G - up(down(G))``; None when it is zero by construction (whole tensor, complete basis)."""
    if sub is None:
        return grad
    if sub.whole or sub.complete:
        return None
    if sub.index is not None:  # zero the chosen coordinates: an exact partition, no subtraction
        rest = grad.clone(memory_format=torch.contiguous_format)  # contiguous: view(-1) below
        if sub.dim is None:
            rest.view(-1)[sub.index] = 0
        else:
            rest.index_fill_(sub.dim, sub.index, 0)
        return rest
    return grad - _up(low, sub, grad.shape)


def split_gradient(grad: Tensor, sub: Subspace | None) -> tuple[Tensor, Tensor]:
    """``(state_full, state_free)``: the part of ``grad`` in the subspace ``sub`` (``up(down(G))``; zeros for
    ``sub=None``, i.e. a block-inactive tensor) and the remainder; they sum to ``grad`` (exactly for coordinates and
    blocks, to rounding for projections)."""
    if sub is None:
        return torch.zeros_like(grad), grad.clone()
    low = _down(grad, sub)
    full = grad.clone() if sub.whole else _up(low, sub, grad.shape)
    rest = _state_free_part(grad, sub, low)
    return full, torch.zeros_like(grad) if rest is None else rest


def _adamw_whole(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, lr_full, betas, eps, weight_decay) -> None:
    """AdamW on whole tensors by the multi-tensor kernel: ``W = W * (1 - lr*wd) - lr_full * D`` (torch.optim.AdamW's
    form), the decay with the unscaled ``lr`` and the update with ``lr_full = lr * s_p``."""
    if lr_full == 0 and lr * weight_decay != 0:  # no update to carry the decay: moments only, then the decay
        adam_direction(grads, exp_avgs, exp_avg_sqs, steps=steps, betas=betas, eps=eps, eps_mode="torch")
        torch._foreach_mul_(list(params), 1.0 - lr * weight_decay)
        return
    # the kernel decays by 1 - lr_full * wd': wd' = wd * lr / lr_full keeps FRUGAL's unscaled-lr decay
    decay = weight_decay if lr_full == lr or weight_decay == 0 else weight_decay * lr / lr_full
    adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps=steps, lr=lr_full, betas=betas, eps=eps,
               weight_decay=decay, eps_mode="torch", decay_mode="before")


def frugal_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | None],
    exp_avg_sqs: Sequence[Tensor | None],
    subspaces: Sequence[Subspace | None],
    *,
    step: Steps,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    proj_params_lr_scale: float = 1.0,
    inactive_update_rule: str = "sign_sgd",
    inactive_lr_scale: float = 1.0,
) -> None:
    """One FRUGAL step on every tensor of ``params`` (in place); the rule is in the module docstring.

    ``subspaces[i]``: parameter i's state-full subspace (:class:`Subspace`; ``Subspace()`` for the whole tensor, which
    with ``proj_params_lr_scale=1`` is plain AdamW) or None when it has no state-full part (a block-inactive tensor;
    its ``exp_avgs[i]``/``exp_avg_sqs[i]`` are then None). The moments have the shape of ``down(G)``. ``step`` is the
    bias-correction step t >= 1 (after incrementing), one int or one per parameter (ignored for None subspaces).

    The element-wise parts run on :mod:`hfx_kernels` (Triton on CUDA, torch elsewhere; ``HFX_KERNELS`` forces one),
    each a multi-tensor call over the list: whole tensors take :func:`hfx_kernels.adamw.adamw_step`; the state-free
    parts take :func:`hfx_kernels.sign_sgd.sign_sgd_step`, which also applies the decay; the subspace moments and
    directions take :func:`hfx_kernels.adamw.adam_direction`; a basis's back-projection and update take
    :func:`hfx_kernels.projection.projection_update`; ``down`` and coordinate scatters stay torch.
    """
    n = len(params)
    steps = per_param(step, n)
    for name, values in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                         ("subspaces", subspaces)):
        if len(values) != n:
            raise ValueError(f"frugal_step: {name} has {len(values)} entries for {n} parameters")
    lr_full = lr * proj_params_lr_scale
    whole, split, lows, free_p, free_g, decay_only = [], [], [], [], [], []
    for i, (p, g, sub) in enumerate(zip(params, grads, subspaces)):
        if sub is not None and sub.whole:
            whole.append(i)
            continue
        low = None
        if sub is not None:
            low = _down(g, sub)
            split.append(i)
            lows.append(low)
        rest = None if inactive_update_rule == "no" else _state_free_part(g, sub, low)
        if rest is None:
            decay_only.append(p)
        else:
            free_p.append(p)
            free_g.append(rest)
    if whole:
        _adamw_whole(*([lst[i] for i in whole] for lst in (params, grads, exp_avgs, exp_avg_sqs, steps)), lr=lr,
                     lr_full=lr_full, betas=betas, eps=eps, weight_decay=weight_decay)
    # the state-free part, with the decay: W = W * (1 - lr * wd) - lr * s_p * s_i * f(G - up(down(G)))
    if free_p:
        sign_sgd_step(free_p, free_g, lr=lr, weight_decay=weight_decay,
                      lr_scale=proj_params_lr_scale * inactive_lr_scale, rule=inactive_update_rule)
    if decay_only and weight_decay != 0:
        torch._foreach_mul_(decay_only, 1.0 - lr * weight_decay)
    # the state-full part: moments and N = M / (sqrt(V) + eps') by the kernel, then W -= lr_full * c * up(N): by the
    # projection epilogue for a basis (the product P·N is never materialised), a scatter in torch for coordinates
    if split:
        directions, factors = adam_direction(lows, [exp_avgs[i] for i in split], [exp_avg_sqs[i] for i in split],
                                             steps=[steps[i] for i in split], betas=betas, eps=eps, eps_mode="torch")
        for i, direction, c in zip(split, directions, factors, strict=True):
            sub = subspaces[i]
            if sub.index is not None:
                params[i].add_(_up(direction, sub, params[i].shape), alpha=-lr_full * c)
                continue
            back_project_update(params[i], direction, sub.left, sub.right, alpha=lr_full * c, decay=1.0,
                                decay_mode="before")


def subspace_size(subspace: str, shape: Sequence[int], density: float, proj_side: str = "std") -> int:
    """How many coordinates of a parameter of ``shape`` are state-full: the rank ``round(density * side)`` for
    "svd"/"random" (side: the length of the projected side), ``floor(density * n)`` columns, ``floor(density * m)``
    rows or ``floor(density * m * n)`` entries (spec §5.1/§5.2; Python's ``round``, half to even, as the official
    code). Not for "block", which counts tensors."""
    m, n = shape
    if subspace in PROJECTION_SUBSPACES:
        left, _ = projection_sides(proj_side, (m, n))
        return round(density * (m if left else n))
    if subspace == "columns":
        return math.floor(density * n)
    if subspace == "rows":
        return math.floor(density * m)
    if subspace == "randk":
        return math.floor(density * m * n)
    raise ValueError(f"subspace_size: no per-matrix size for subspace {subspace!r}")


# --------------------------------------------------------------------------------------------------
# Validation helpers (errors say where and how to fix)
# --------------------------------------------------------------------------------------------------


def _where(group: dict[str, Any] | None) -> str:
    names = (group or {}).get("param_names")
    if not names:
        return ""
    shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f" (param group of {shown})"


def _number(group: dict[str, Any], key: str, hint: str, *, low: float = 0.0, high: float = math.inf,
            low_open: bool = False) -> float:
    value = group[key]
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
        raise ValueError(f"{key} must be a finite number in {interval}, got {value!r}{_where(group)}; {hint}")
    return float(value)


def _integer(group: dict[str, Any], key: str, hint: str, *, minimum: int) -> int:
    return check_int(key, group[key], hint, minimum=minimum, where=_where(group))


def _choice(group: dict[str, Any], key: str, choices: Sequence[str], hint: str = "") -> str:
    return check_choice(key, group[key], choices, hint, where=_where(group))


def _betas(group: dict[str, Any]) -> tuple[float, float]:
    betas = group["betas"]
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of floats in [0, 1), got {betas!r}{_where(group)}; pass e.g. "
                         "betas=(0.9, 0.999)") from None
    return check_beta_range((beta1, beta2), where=_where(group))


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------


class FRUGAL(torch.optim.Optimizer):
    r"""FRUGAL: AdamW on a subspace of each targeted gradient plus signSGD/SGD on the rest (full-rank updates with a
    low-dimensional optimizer state).

    Paper: Zmushko, Beznosikov, Takáč, Horváth, "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
    Scalable Training" (ICML 2025), arXiv `2411.07837 <https://arxiv.org/abs/2411.07837>`_. Written from the hfx
    optimizer spec (§5); the update rule is in the module docstring.

    Example::

        import hfx
        from transformers import Trainer

        # name-aware: Linear weights split, embeddings / lm_head / norms / biases on AdamW, HF's decay split kept
        trainer = Trainer(model, args, train_dataset=ds,
                          optimizer_cls_and_kwargs=hfx.optimizer("frugal", density=0.25, subspace="svd"))

        # or in an hfx trainer config (YAML: `hfx_optimizer: frugal`, `hfx_optimizer_args: {density: 0.25}`); the
        # Trainer's learning_rate, adam_beta1/2, adam_epsilon and weight_decay are forwarded

        # or directly, with groups from hfx_optim.targets
        from hfx_optim.targets import param_groups
        opt = hfx.FRUGAL(param_groups(model, "all-linear", target_options={"density": 0.25}), lr=1e-3)

    Which groups are split: a group with ``hfx_target=True`` (what :func:`hfx_optim.targets.param_groups` marks) or,
    without that key, a group that sets ``density`` or the official ``is_proj_params=True``. Every other group takes
    AdamW. At least one split group is required: ``FRUGAL(model.parameters())`` would be plain AdamW and is refused.

    Args (defaults: the official FRUGAL code's unless noted; every one may be set per group):
        lr: 1e-3. betas: (0.9, 0.999). eps: 1e-8 (torch.optim.AdamW's placement). weight_decay: 0.01, decoupled,
            applied before the update with the unscaled ``lr`` to every parameter (state-free ones too). Through the
            factory or a Trainer, the groups carry Trainer's ``weight_decay`` (0 on biases and norms).
        density: rho in (0, 1], the state-full share (0.25).
        update_gap: T, steps between subspace choices (200); the subspace is chosen before steps 1, T+1, 2T+1, ...
        subspace: "block" (default: the ``--optimizer frugal`` of the official pre-training scripts), "svd",
            "random", "columns" (the official Coord constructor's default), "rows" or "randk" (the README's Coord
            choice). "block" works on tensors of any shape; the others need 2-D parameters. The official
            ``proj_type="randperm"`` is a random choice of coordinates on the projected side: use "columns"/"rows".
        proj_side: which side "svd"/"random" project: "std" (the shorter side; default), "reverse_std", "left",
            "right".
        block_order: "descending" (default; the official scripts': from the last tensor of the group backwards,
            cyclically) or "random" (the official constructor's default: a fresh uniform draw at every refresh).
        inactive_update_rule: the state-free rule, "sign_sgd" (default), "sgd" or "no" (drop the remainder).
        inactive_lr_scale: s_i (1.0, pre-training; the paper's fine-tuning runs use 0.1).
        proj_params_lr_scale: s_p, scales both parts' learning rate in the split groups (1.0).
        reset_statistics: zero the moments and restart the bias correction when "svd"/"random"/coordinates are
            chosen again (True, official). "block" always starts a newly activated tensor from zero moments.
        svd: "exact" (default, official) or "randomized" (GaLore 2's refresh) for ``subspace="svd"``; run in float32
            (float64 for float64 parameters). oversample (8), power_iters (2): of the randomized SVD.
        seed: base seed (0) of every random choice: parameter i's k-th draw uses ``sketch_seed(state["seed"], k)``
            with ``state["seed"] = sketch_seed(seed, i)`` (i counts over all param_groups); a "block"/"random" group
            draws from ``sketch_seed(seed, group_index, refresh_count)``.

    State (tensors and plain numbers only, so ``torch.load(weights_only=True)`` resumes it bit-identically):
    AdamW parameters: ``step``, ``exp_avg``, ``exp_avg_sq``. "svd"/"random"/coordinates: also ``adam_step`` (the
    bias-correction step), ``proj_left`` (m×r) or ``proj_right`` (r×n), or ``coord_index`` (int64), ``seed`` and
    ``refreshes``; moments of the shape of ``down(G)``. "block": only active tensors hold state (``step``,
    ``exp_avg``, ``exp_avg_sq``); the group holds ``block_steps``, ``block_refreshes`` and ``block_active`` (indices
    into its params), which ``state_dict()`` saves with the other group entries.

    Memory for an m×n matrix at density rho (elements; AdamW keeps 2mn): "svd"/"random" ``k*r + 2*r*l`` with
    ``r = round(rho*k)``, k the projected side and l the other (std: ``rho*(min^2 + 2*m*n)``, i.e. ``rho*(1 +
    min/(2*max))`` of AdamW); "columns" ``2*m*floor(rho*n)`` plus ``floor(rho*n)`` int64 indices (rows alike);
    "randk" ``2*floor(rho*m*n)`` plus as many int64 indices (as many bytes as the two fp32 moments); "block"
    ``2*m*n`` on the active tensors and 0 on the others, about ``rho`` of AdamW over a group.

    Distributed: DDP works (every random choice is seeded from the state, so all ranks agree). FSDP2 (DTensor)
    parameters: "block" and the AdamW groups are elementwise and take any shards; on row shards (``Shard(0)``)
    "columns" (the same columns on every rank) and "svd"/"random" with ``proj_side="right"`` (a right basis; "svd"
    with ``svd="randomized"``, sketched across the shards without gathering G, as in GaLore2) step like whole
    matrices. "rows"/"randk", a left basis and ``svd="exact"`` are refused with an error naming the fix, as are the
    1-D flat shards of FSDP1 (``use_orig_params=False``) and DeepSpeed ZeRO.
    """

    _name = "FRUGAL"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        density: float = 0.25,
        update_gap: int = 200,
        subspace: str = "block",
        proj_side: str = "std",
        block_order: str = "descending",
        inactive_update_rule: str = "sign_sgd",
        inactive_lr_scale: float = 1.0,
        proj_params_lr_scale: float = 1.0,
        reset_statistics: bool = True,
        svd: str = "exact",
        oversample: int = 8,
        power_iters: int = 2,
        seed: int = 0,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density, update_gap=update_gap,
            subspace=subspace, proj_side=proj_side, block_order=block_order,
            inactive_update_rule=inactive_update_rule, inactive_lr_scale=inactive_lr_scale,
            proj_params_lr_scale=proj_params_lr_scale, reset_statistics=reset_statistics, svd=svd,
            oversample=oversample, power_iters=power_iters, seed=seed,
        )
        self._validate_group(dict(defaults, **{TARGET_FLAG: True}))  # fail on bad defaults even if groups override
        super().__init__(params, defaults)
        if not any(group[TARGET_FLAG] for group in self.param_groups):
            raise ValueError(
                "FRUGAL got no parameter group to split, so it would be plain AdamW. Build the groups with "
                "hfx_optim.targets.param_groups(model, 'all-linear', target_options={'density': 0.25}), use "
                "hfx.optimizer('frugal', density=0.25, target_modules='all-linear') (a factory for Trainer), or mark "
                "the groups to split with hfx_target=True (or the official is_proj_params=True)."
            )

    # -- groups ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        """Check and normalise a parameter group in place; every error names the group and the fix."""
        group["lr"] = _number(group, "lr", "pass a learning rate, e.g. lr=1e-3")
        group["eps"] = _number(group, "eps", "pass e.g. eps=1e-8")
        group["weight_decay"] = _number(group, "weight_decay", "pass e.g. weight_decay=0.01, or 0 for none")
        group["betas"] = _betas(group)
        if not group[TARGET_FLAG]:
            return
        group["density"] = _number(group, "density", "the state-full share rho, e.g. density=0.25 (the paper's)",
                                   high=1.0, low_open=True)
        _integer(group, "update_gap", "steps between subspace choices, e.g. update_gap=200", minimum=1)
        if group["subspace"] == "randperm":
            raise ValueError(f"subspace 'randperm'{_where(group)}: a random choice of coordinates on the projected "
                             "side is subspace='columns' (or 'rows') here")
        _choice(group, "subspace", SUBSPACES, " (block: whole tensors; svd/random: a projection; "
                "columns/rows/randk: coordinates)")
        if group["proj_side"] == "full":
            raise ValueError(f"proj_side 'full'{_where(group)} is not supported: density sizes one side; use 'std' "
                             "(the shorter side), 'reverse_std', 'left' or 'right'")
        _choice(group, "proj_side", PROJ_SIDES)
        _choice(group, "block_order", BLOCK_ORDERS, " ('descending': from the last tensor backwards)")
        _choice(group, "inactive_update_rule", INACTIVE_UPDATE_RULES,
                " (the state-free rule: signSGD, SGD, or no update of the remainder)")
        group["inactive_lr_scale"] = _number(group, "inactive_lr_scale", "e.g. 1.0 (pre-training) or 0.1 "
                                             "(fine-tuning)")
        group["proj_params_lr_scale"] = _number(group, "proj_params_lr_scale", "e.g. proj_params_lr_scale=1.0")
        check_bool("reset_statistics", group["reset_statistics"], _where(group))
        _choice(group, "svd", SVD_METHODS, " (the exact SVD, official; or GaLore 2's randomized SVD)")
        _integer(group, "oversample", "extra sketch columns, e.g. oversample=8", minimum=0)
        _integer(group, "power_iters", "subspace iterations, e.g. power_iters=2", minimum=0)
        _integer(group, "seed", "any non-negative int, e.g. seed=0", minimum=0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            # hand-built groups: one that sets `density` (or the official `is_proj_params=True`) is split
            param_group.setdefault(TARGET_FLAG, bool(param_group.get("is_proj_params")) or "density" in param_group)
        super().add_param_group(param_group)
        finish_added_group(self.param_groups, self._finish_group)

    def _finish_group(self, group: dict[str, Any]) -> None:
        self._validate_group(group)
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise complex_param_error("FRUGAL", describe_param(group, i, p))
            if group[TARGET_FLAG] and group["subspace"] != "block":
                self._check_matrix(group, i, p)
        if group[TARGET_FLAG] and group["subspace"] == "block":
            count = len(group["params"])
            if round(group["density"] * count) < 1:
                raise ValueError(
                    f"density={group['density']} activates round({group['density']} * {count}) = 0 of the "
                    f"{count} tensor(s){_where(group)} with subspace='block', so none would get AdamW. Pass "
                    f"density > {0.5 / count:.3g} (round() takes halves to even), or put more tensors in the group."
                )
            group.setdefault("block_steps", 0)
            group.setdefault("block_refreshes", 0)
            group.setdefault("block_active", [])

    def _check_matrix(self, group: dict[str, Any], i: int, p: Tensor) -> None:
        """The per-matrix subspaces need a whole 2-D tensor with at least one state-full coordinate."""
        what, kind = describe_param(group, i, p), group["subspace"]
        if is_dtensor(p):
            self._check_shards(group, what, p)
        if p.ndim != 2:
            raise ValueError(
                f"FRUGAL: {what} is not 2-D, but subspace={kind!r} splits matrices. Use subspace='block' (any "
                "shape), or leave it out of target_modules (it then runs AdamW). FSDP1 with use_orig_params=False "
                "and DeepSpeed ZeRO flatten parameters to 1-D: use DDP, or FSDP2 with subspace='block'."
            )
        size, rho = subspace_size(kind, p.shape, group["density"], group["proj_side"]), group["density"]
        if size < 1:
            raise ValueError(
                f"FRUGAL: density={rho} gives {what} no state-full coordinate with subspace={kind!r} (size "
                f"{size}); raise density, use subspace='block', or leave this module out of target_modules."
            )
        if kind == "svd" and size > min(p.shape):
            raise ValueError(
                f"FRUGAL: density={rho} with proj_side={group['proj_side']!r} asks for rank {size} of {what}, but an "
                f"SVD has at most min(rows, cols) = {min(p.shape)} directions. Use proj_side='std' (the shorter "
                "side) or a smaller density."
            )

    @staticmethod
    def _check_shards(group: dict[str, Any], what: str, p: Tensor) -> None:
        """A DTensor in a per-matrix group: row shards (FSDP2's ``Shard(0)``) whose subspace keeps every row's
        coordinates local (a right basis or chosen columns), or an error naming the fix."""
        kind = group["subspace"]
        fixes = "use subspace='block' (any shards), train with DDP, or leave this module out of target_modules"
        if not is_row_sharded(p):
            raise ValueError(f"FRUGAL: {what} is a DTensor with placements {tuple(p.placements)} on a "
                             f"{p.device_mesh.ndim}-D mesh; the per-matrix subspaces take row shards on a 1-D mesh "
                             f"(Shard(0), FSDP2's fully_shard). Shard it by rows, or {fixes}.")
        if kind in ("rows", "randk"):
            raise ValueError(f"FRUGAL: {what} is row-sharded (FSDP2) and subspace={kind!r} picks rows or entries "
                             f"across the shards. Use subspace='columns', 'svd' or 'random' with "
                             f"proj_side='right', or {fixes}.")
        if kind in ("svd", "random") and projection_sides(group["proj_side"], p.shape) != (False, True):
            raise ValueError(f"FRUGAL: {what} is row-sharded (FSDP2) and proj_side={group['proj_side']!r} projects "
                             f"its rows; only a right basis keeps shards local. Pass proj_side='right', or {fixes}.")
        if kind == "svd" and group["svd"] != "randomized":
            raise ValueError(f"FRUGAL: {what} is row-sharded (FSDP2) and svd='exact' needs the whole matrix; pass "
                             f"svd='randomized' (it sketches across shards without gathering G), or {fixes}.")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every state tensor but "step" to its parameter's dtype: int64 coordinates would come back as
        # floats (inexact in bf16 above 256), so they are restored from the saved tensors as they were
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        indices = {i: saved[i]["coord_index"] for i in ids if i in saved and "coord_index" in saved[i]}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params, strict=True):
            if i in indices:
                self.state[p]["coord_index"] = indices[i].to(device=p.device, dtype=torch.int64)

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step (choosing new subspaces where due). Returns the closure's loss."""
        loss = run_closure(closure)
        self._check_grads()  # before any state changes: an error leaves the optimizer as it was
        # index: position over all param_groups, so per-parameter draws do not depend on which have grads
        for group_index, (group, index) in enumerate(with_offsets(self.param_groups)):
            if not group[TARGET_FLAG]:
                self._step_adamw(group)
            elif group["subspace"] == "block":
                self._step_block(group, group_index)
            else:
                self._step_matrices(group, index)
        return loss

    def _check_grads(self) -> None:
        for group, i, p in params_with_grad(self.param_groups):
            if p.grad.is_sparse:
                raise sparse_grad_error("FRUGAL", describe_param(group, i, p))
            if group[TARGET_FLAG] and group["subspace"] != "block":
                self._check_matrix(group, i, p)  # again: FSDP2/ZeRO may have swapped it since construction

    @staticmethod
    def _hyper(group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])

    def _split_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(self._hyper(group), proj_params_lr_scale=group["proj_params_lr_scale"],
                    inactive_update_rule=group["inactive_update_rule"], inactive_lr_scale=group["inactive_lr_scale"])

    @staticmethod
    def _zeros_state(p: Tensor, state: dict[str, Any], shape=None) -> None:
        if shape is None:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:  # a row-sharded parameter's low-rank moments (rows × size) are sharded with its rows
            state["exp_avg"], state["exp_avg_sq"] = (zeros_sharded_like(p, shape) for _ in range(2))

    def _step_adamw(self, group: dict[str, Any]) -> None:
        params, grads, ms, vs, ts = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:  # lazily, from the actual (possibly sharded) parameter
                state["step"] = 0
                self._zeros_state(p, state)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
            ts.append(state["step"])
        if params:
            frugal_step(params, grads, ms, vs, [WHOLE] * len(params), step=ts, **self._hyper(group))

    # block: whole tensors, chosen for the group ----------------------------------------------------------------
    def _choose_blocks(self, group: dict[str, Any], group_index: int) -> list[int]:
        count = len(group["params"])
        k = round(group["density"] * count)
        if group["block_order"] == "descending":
            start = group["block_refreshes"] * k
            return sorted({count - 1 - (start + j) % count for j in range(k)})
        generator = torch.Generator().manual_seed(sketch_seed(group["seed"], group_index, group["block_refreshes"]))
        return sorted(torch.randperm(count, generator=generator)[:k].tolist())

    def _step_block(self, group: dict[str, Any], group_index: int) -> None:
        if all(p.grad is None for p in group["params"]):
            return
        if group["block_steps"] % group["update_gap"] == 0:
            group["block_active"] = self._choose_blocks(group, group_index)
            group["block_refreshes"] += 1
            for p in group["params"]:  # the official rule: every tensor of the group starts afresh; frees memory
                self.state.pop(p, None)
        group["block_steps"] += 1
        active = set(group["block_active"])
        params, grads, ms, vs, subs, ts = [], [], [], [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            m = v = sub = None
            t = 0
            if i in active:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    self._zeros_state(p, state)
                state["step"] += 1
                m, v, sub, t = state["exp_avg"], state["exp_avg_sq"], WHOLE, state["step"]
            params.append(p)
            grads.append(p.grad)
            ms.append(m)
            vs.append(v)
            subs.append(sub)
            ts.append(t)
        frugal_step(params, grads, ms, vs, subs, step=ts, **self._split_hyper(group))

    # svd / random / coordinates: one subspace per matrix ---------------------------------------------------------
    def _refresh(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        """Choose parameter p's subspace again; allocate, keep or reset its moments."""
        kind, rho = group["subspace"], group["density"]
        size = subspace_size(kind, p.shape, rho, group["proj_side"])
        seed = sketch_seed(state["seed"], state["refreshes"])
        for key in ("proj_left", "proj_right", "coord_index"):
            state.pop(key, None)
        m, n = p.shape
        if kind == "svd" and is_dtensor(p):  # row shards: the right basis without gathering G (GaLore2's)
            left, right = None, replicated_like(p, sharded_right_basis(p.grad, size, oversample=group["oversample"],
                                                                   power_iters=group["power_iters"], seed=seed))
        elif kind == "svd":
            left, right = compute_projectors(p.grad, size, group["proj_side"], method=group["svd"],
                                             oversample=group["oversample"], power_iters=group["power_iters"],
                                             seed=seed, dtype=p.dtype)
        elif kind == "random":
            use_left, _ = projection_sides(group["proj_side"], p.shape)
            side = m if use_left else n
            generator = torch.Generator().manual_seed(seed)  # drawn on the CPU in float64: the same on every device
            gaussian = torch.randn(side, size, generator=generator, dtype=torch.float64)
            basis = torch.linalg.qr(gaussian.to(svd_dtype(p.dtype))).Q.to(dtype=p.dtype, device=p.device)
            left, right = (basis.contiguous(), None) if use_left else (None, replicated_like(p, basis.mT.contiguous()))
        else:
            left = right = None
            total = {"columns": n, "rows": m, "randk": m * n}[kind]
            generator = torch.Generator().manual_seed(seed)
            chosen = torch.randperm(total, generator=generator)[:size].sort().values
            state["coord_index"] = chosen.to(p.device)
        if left is not None:
            state["proj_left"] = left
        if right is not None:
            state["proj_right"] = right
        state["refreshes"] += 1
        shape = {"svd": None, "random": None, "columns": (m, size), "rows": (size, n), "randk": (size,)}[kind]
        if shape is None:
            shape = (size, n) if left is not None else (m, size)
        if "exp_avg" not in state or tuple(state["exp_avg"].shape) != shape:
            self._zeros_state(p, state, shape)
            state["adam_step"] = 0
        elif group["reset_statistics"]:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["adam_step"] = 0

    @staticmethod
    def _subspace(group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> Subspace:
        kind = group["subspace"]
        if kind in COORDINATE_SUBSPACES:
            return Subspace(index=state["coord_index"], dim={"columns": 1, "rows": 0, "randk": None}[kind])
        left, right = state.get("proj_left"), local_part(state.get("proj_right"))
        side = p.shape[0] if left is not None else p.shape[1]
        rank = (left if left is not None else right.mT).shape[1]
        return Subspace(left=left, right=right, complete=rank == side)

    def _step_matrices(self, group: dict[str, Any], first_index: int) -> None:
        params, grads, ms, vs, subs, ts = [], [], [], [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:  # lazily, from the actual parameter
                state.update(step=0, adam_step=0, seed=sketch_seed(group["seed"], first_index + i), refreshes=0)
            if state["step"] % group["update_gap"] == 0:
                self._refresh(group, p, state)
            state["step"] += 1
            state["adam_step"] += 1
            params.append(local_part(p))  # a row-sharded DTensor steps on its local rows
            grads.append(local_part(p.grad))
            ms.append(local_part(state["exp_avg"]))
            vs.append(local_part(state["exp_avg_sq"]))
            subs.append(self._subspace(group, p, state))
            ts.append(state["adam_step"])
        if params:
            frugal_step(params, grads, ms, vs, subs, step=ts, **self._split_hyper(group))


# --------------------------------------------------------------------------------------------------
# Factory for Trainer(optimizer_cls_and_kwargs=...) and hfx_optimizer
# --------------------------------------------------------------------------------------------------


class FRUGALFactory(ModelOptimizerFactory):
    """Builds :class:`FRUGAL` from a model (``Factory()(model, **kwargs)``, transformers 5's factory protocol):
    ``target_modules`` Linear weights ("all-linear" = every Linear except the output head) are split with the FRUGAL
    options (:data:`FRUGAL_KEYS`); embeddings, ``lm_head``, norms and biases run AdamW (the official grouping); HF's
    decay/no-decay split is kept. This is what ``hfx.optimizer("frugal", ...)`` returns.

    >>> opt = FRUGALFactory()(model, density=0.25, subspace="svd", lr=1e-3)  # doctest: +SKIP
    """

    optimizer_cls = FRUGAL
    target_keys = FRUGAL_KEYS

    def __call__(self, model, **kwargs):
        return super().__call__(model, **kwargs)

    __call__.__signature__ = factory_signature(FRUGAL)
