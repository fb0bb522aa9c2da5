"""Fira: GaLore-style low-rank Adam plus the norm-scaled residual, for full-rank updates under a low-rank state
(Chen, Feng, Li, Lai, Yue, Yuan, Wang; NeurIPS 2025).

Paper: "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?", arXiv 2410.01623.

For a projected m×n parameter with gradient G, after the GaLore step up to ``N`` and ``c`` (see
:mod:`hfx_optim.galore2`; hfx optimizer spec §4.1)::

    residual = G - scale * back(R)        residual="official" (the official code; the reported results)
             = G - back(R)                residual="paper"    (the paper's G - P R)
    phi      = ||N[:, j]|| / (||R[:, j]|| + 1e-8) per column j  (left projection: R is r×n)
             = ||N[i, :]|| / (||R[i, :]|| + 1e-8) per row i     (right projection: R is m×r)
    S        = phi * residual             (phi broadcast along the dimension the projection keeps whole)
    norm-growth limiter (from the second step on, gamma = norm_growth_limit = 1.01):
             lim = max(||S|| / (prev + 1e-8), gamma) / gamma ;  S = S / lim ;  prev = ||S||  (after limiting)
    W = W - lr * c * (scale * back(N) + S)
    W = W - lr * weight_decay * W         (decay_mode="after")

The per-step math is the pure function :func:`fira_adamw_step`; :class:`Fira` reuses :class:`GaLore2`'s state,
subspace refresh and validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import Steps, check_choice, check_number, per_param
from .galore2 import (
    PROJECTION_KEYS,
    GaLore2,
    _adam,
    _check_lengths,
    _direction_buffers,
    factory_signature,
    galore_adamw_step,
)
from .projection import PROJ_TYPES, back_project_update, project, sum_over
from .targets import TARGET_FLAG, ModelOptimizerFactory

__all__ = ["FIRA_PROJECTION_KEYS", "RESIDUAL_FORMS", "Fira", "FiraFactory", "fira_adamw_step"]

RESIDUAL_FORMS = ("official", "paper")
FIRA_PROJ_TYPES = tuple(t for t in PROJ_TYPES if t != "full")
FIRA_PROJECTION_KEYS = (*PROJECTION_KEYS, "residual", "norm_growth_limit")
_PHI_EPS = 1e-8  # both constants are the official code's
_LIMITER_EPS = 1e-8


def fira_adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    lefts: Sequence[Tensor | None],
    rights: Sequence[Tensor | None],
    scaling_norms: Sequence[Tensor],
    *,
    step: Steps,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float = 1.0,
    correct_bias: bool = True,
    eps_mode: str = "hf",
    decay_mode: str = "after",
    residual: str = "official",
    norm_growth_limit: float | None = 1.01,
    row_sums: Sequence[Callable[[Tensor], Tensor] | None] | None = None,
) -> None:
    """One Fira step on every (projected) tensor of ``params`` (in place).

    Exactly one of ``lefts[i]`` (m×r) and ``rights[i]`` (r×n) is a basis. ``scaling_norms[i]`` is a 0-d tensor
    holding ``||S||`` of the previous step after limiting, ``inf`` before the first step (so the limiter passes
    it through, like the official "no previous norm" branch); it is updated in place when the limiter is on
    (``norm_growth_limit`` not None). ``row_sums[i]`` (optional) sums a 0-d tensor over the processes holding
    parameter i's other rows: with row shards (FSDP2) the limiter's ``||S||`` is then the whole matrix's.

    Kernels (:mod:`hfx_kernels`): one multi-tensor ``adam_direction`` over the projected gradients of all
    parameters; per parameter, phi and the limiter in torch (the residual's norm from column norms,
    :func:`residual_norm`), then one ``projection_update`` applies ``lr * c * back(scale * N - kept * phi * R)``,
    the state-free part ``lr * c * phi * G`` as the GEMM epilogue's scaled extra term (``phi * G`` never formed),
    and the decay.
    """
    steps = per_param(step, len(params))
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "lefts": lefts, "rights": rights,
             "scaling_norms": scaling_norms}
    _check_lengths(len(params), lists)
    for left, right in zip(lefts, rights):
        if (left is None) == (right is None):
            raise ValueError("fira_adamw_step needs exactly one basis (left or right) per parameter")
    lows = [project(g, left, right) for g, left, right in zip(grads, lefts, rights)]
    directions = _direction_buffers(exp_avgs)
    factors = _adam(None, lows, exp_avgs, exp_avg_sqs, steps, betas=betas, eps=eps, eps_mode=eps_mode,
                    correct_bias=correct_bias, out=directions)
    kept = scale if residual == "official" else 1.0  # the share of back(R) the residual removes from G
    row_sums = row_sums or [None] * len(params)
    for p, g, r, n, c, left, right, prev, row_sum in zip(params, grads, lows, directions, factors, lefts, rights,
                                                         scaling_norms, row_sums):
        # phi lives on the dimension the projection keeps whole: columns for R = L^T G, rows for R = G Rt^T. Chosen
        # from the side, not from R's shape (the official shape test picks rows for a square R = r×n with r = n).
        dim = 0 if left is not None else 1
        r_norms = torch.linalg.vector_norm(r, dim=dim, keepdim=True)
        phi = torch.linalg.vector_norm(n, dim=dim, keepdim=True).div_(r_norms + _PHI_EPS)
        if norm_growth_limit is not None:
            norm = residual_norm(g, r_norms, phi, kept, dim, row_sum=row_sum)
            limiter = (norm / (prev + _LIMITER_EPS)).clamp_(min=norm_growth_limit).div_(norm_growth_limit)
            phi = phi / limiter
            prev.copy_(norm / limiter)  # no host sync: the limiter stays a tensor
        # S = phi * (G - kept * back(R)) = phi * G - kept * back(phi * R): the in-subspace part joins N in the one
        # back-projection GEMM, so the residual is never formed (two GEMMs per step, as GaLore's).
        direction = (n * scale).sub_(r * phi, alpha=kept)
        back_project_update(p, direction, left, right, alpha=lr * c, extra=g, extra_scale=phi, beta=lr * c,
                            decay=1.0 - lr * weight_decay, decay_mode=decay_mode)


def residual_norm(grad: Tensor, low_norms: Tensor, phi: Tensor, kept: float, dim: int,
                  row_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``||phi * (G - kept * back(R))||`` without forming the residual: with an orthonormal basis (GaLore's SVD or
    randomized SVD bases are) each column (row) j has ``||G_j - kept * back(R)_j||^2 = ||G_j||^2 - (2 kept - kept^2)
    ||R_j||^2``. ``low_norms`` are ``||R_j||``; computed in at least float32, clamped at 0 against rounding.

    Its relative rounding error is about ``eps * ||G||^2 / ||G - kept * back(R)||^2``: with ``kept = 1`` (the paper
    form, or ``scale=1``) and a gradient almost inside the subspace it exceeds the formed residual's (1e-2 in fp32
    when 1e-5 of the energy is outside). The limiter only uses it to cap the growth of ``S`` at 1.01x per step, and
    ``S`` itself is exact."""
    acc = torch.promote_types(grad.dtype, torch.float32)
    sq = torch.linalg.vector_norm(grad, dim=dim, keepdim=True, dtype=acc).square_()
    sq.sub_(low_norms.to(acc).square(), alpha=2 * kept - kept * kept).clamp_(min=0)
    total = sq.mul_(phi.to(acc).square()).sum()
    return (total if row_sum is None else row_sum(total)).sqrt_()

class Fira(GaLore2):
    r"""Fira: GaLore-style low-rank Adam plus norm-based scaling of the gradient outside the subspace and a
    norm-growth limiter, so the update is full-rank while the Adam state stays low-rank.

    Paper: Chen, Feng, Li, Lai, Yue, Yuan, Wang, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
    Constraint?" (NeurIPS 2025), arXiv `2410.01623 <https://arxiv.org/abs/2410.01623>`_. Written from the hfx
    optimizer spec (§4.1); the update rule is in the module docstring.

    Example::

        import hfx
        from transformers import Trainer

        trainer = Trainer(model, args, train_dataset=ds,
                          optimizer_cls_and_kwargs=hfx.optimizer("fira", rank=128, target_modules="all-linear"))
        # or `hfx_optimizer: fira` with `hfx_optimizer_args: {rank: 128}` in an hfx trainer config

    Groups, validation, state, subspace refresh (``svd``, ``oversample``, ``power_iters``, ``seed``,
    ``moments_on_refresh``) and the AdamW groups are :class:`GaLore2`'s; see there. Differences:

    Args (defaults: the official ``FiraAdamW`` / ``divide_params`` / training script unless noted):
        scale: the official ``alpha`` (1.0; the C4 scripts use 0.25 at 60M and 0.0625 at 1B). Named ``scale`` as in
            GaLore2 and HF's GaLore; a group with an ``alpha`` key is refused.
        rank: 128 (``torchrun_main.py``; ``divide_params`` defaults to 8). update_proj_gap: 200.
        proj_type: "std", "reverse_std", "left" or "right". "full" is refused: phi needs one dimension the
            projection keeps whole.
        svd: "exact" (default: the official Fira projector is GaLore's exact SVD) or "randomized" (GaLore 2's).
            FSDP2 row shards take GaLore2's gather-free right projection, which needs "randomized"; the limiter's
            ``||S||`` is then summed over the shards (one scalar all-reduce per matrix and step).
        residual: which gradient the scaled residual starts from.
            "official" (default): ``G - scale * back(R)``, the official code, which produced the paper's results;
            with ``scale != 1`` it keeps ``(1 - scale)`` of the in-subspace gradient (75% at scale 0.25) and scales
            it by phi too.
            "paper": ``G - back(R)``, the paper's ``G - P R``: only the part of G outside the subspace.
            The two agree at ``scale=1``.
        norm_growth_limit: gamma of the norm-growth limiter (1.01, hard-coded in the official code): the residual
            update's norm may grow by at most this factor per step. None turns the limiter off.

    State: GaLore2's plus ``scaling_norm`` (a 0-d tensor, ``||S||`` after limiting; ``inf`` until the first step).
    Memory: GaLore2's plus one scalar per projected matrix.
    """

    _name = "Fira"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        svd: str = "exact",
        oversample: int = 8,
        power_iters: int = 2,
        seed: int = 0,
        moments_on_refresh: str = "keep",
        correct_bias: bool = True,
        eps_mode: str = "hf",
        decay_mode: str = "after",
        residual: str = "official",
        norm_growth_limit: float | None = 1.01,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, update_proj_gap=update_proj_gap,
            scale=scale, proj_type=proj_type, svd=svd, oversample=oversample, power_iters=power_iters, seed=seed,
            moments_on_refresh=moments_on_refresh, correct_bias=correct_bias, eps_mode=eps_mode, decay_mode=decay_mode,
            residual=residual, norm_growth_limit=norm_growth_limit,
        )
        self._setup(params, defaults)

    def _proj_types(self) -> Sequence[str]:
        return FIRA_PROJ_TYPES

    def _validate_group(self, group: dict[str, Any]) -> None:
        if group.get(TARGET_FLAG) and "alpha" in group:
            raise ValueError(f"Fira calls the official 'alpha' scale: pass scale={group['alpha']!r} instead of alpha")
        if group.get(TARGET_FLAG) and group.get("proj_type") == "full":
            raise ValueError(
                "proj_type='full' is not supported by Fira: its norm-based scaling needs one dimension the projection "
                f"keeps whole; use one of {', '.join(repr(t) for t in FIRA_PROJ_TYPES)}"
            )
        super()._validate_group(group)
        check_choice("residual", group["residual"], RESIDUAL_FORMS,
                     " ('official': G - scale*P R, the official code; 'paper': G - P R)")
        limit = group["norm_growth_limit"]
        if limit is not None:
            group["norm_growth_limit"] = check_number(
                "norm_growth_limit", limit, "the limiter's gamma, e.g. 1.01, or None to turn it off", minimum=1.0)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any], index: int) -> None:
        super()._init_state(group, p, state, index)
        if group[TARGET_FLAG]:
            state["scaling_norm"] = torch.full((), math.inf, dtype=p.dtype, device=p.device)

    def _update(self, group: dict[str, Any], lists: dict[str, list]) -> None:
        if not group[TARGET_FLAG]:
            galore_adamw_step(lists["p"], lists["g"], lists["m"], lists["v"], lists["left"], lists["right"],
                              step=lists["t"], **self._common(group))
            return
        fira_adamw_step(
            lists["p"], lists["g"], lists["m"], lists["v"], lists["left"], lists["right"],
            [state["scaling_norm"] for state in lists["state"]], step=lists["t"], scale=group["scale"],
            residual=group["residual"], norm_growth_limit=group["norm_growth_limit"],
            row_sums=[None if mesh is None else sum_over(mesh) for mesh in lists["mesh"]], **self._common(group),
        )


class FiraFactory(ModelOptimizerFactory):
    """Builds :class:`Fira` from a model, like :class:`hfx_optim.galore2.GaLore2Factory`; what
    ``hfx.optimizer("fira", ...)`` returns.

    >>> opt = FiraFactory()(model, rank=64, lr=1e-3)  # doctest: +SKIP
    """

    optimizer_cls = Fira
    target_keys = FIRA_PROJECTION_KEYS

    def __call__(self, model, **kwargs):
        return super().__call__(model, **kwargs)

    __call__.__signature__ = factory_signature(Fira)
