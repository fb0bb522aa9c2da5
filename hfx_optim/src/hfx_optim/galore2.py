"""GaLore 2: Adam in a low-rank gradient subspace refreshed by randomized SVD (Su, Gu, Xu, Tian, Zhao, 2025).

Papers: "GaLore 2: Large-Scale LLM Pre-Training by Gradient Low-Rank Projection", arXiv 2504.20437, on top of
"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et al.), arXiv 2403.03507.

The update is the official GaLore-AdamW rule (hfx optimizer spec §3.1); GaLore 2 changes how the subspace is found
(randomized SVD, §3.2). For a projected m×n parameter with gradient G, at step t >= 1 (s = t - 1 steps taken)::

    if s % update_proj_gap == 0:  P <- top-`rank` singular basis of G   (see hfx_optim.projection)
    R = project(G, P)                                   # r×n, m×r or r×r by proj_type
    M = b1 M + (1 - b1) R ;  V = b2 V + (1 - b2) R^2
    N = M / (sqrt(V) + eps)                             # eps_mode="hf": eps not bias-corrected (official)
    W = W - lr * sqrt(1 - b2^t) / (1 - b1^t) * scale * back(N, P)
    W = W - lr * weight_decay * W                       # decay_mode="after": on the updated W (official)

Other parameters take the same AdamW rule on the full gradient (no projection, no ``scale``).

The per-step math is the pure function :func:`galore_adamw_step` over lists of tensors; :class:`GaLore2` only owns
the state and the subspace refreshes. It runs on :mod:`hfx_kernels` (Triton on CUDA, torch elsewhere; ``HFX_KERNELS``
chooses): one multi-tensor Adam over the projected gradients of the step, then per matrix one GEMM whose epilogue
applies the scaled back-projection and the decay (:func:`hfx_kernels.projection.projection_update`), so
``P N`` is never materialised. The projection ``R = P^T G`` and the subspace refresh stay in torch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from hfx_kernels._backend import compute_dtype
from hfx_kernels.adamw import adam_direction as kernel_adam_direction
from hfx_kernels.adamw import adam_scalars, adamw_step, adamw_step_reference
from hfx_kernels.projection import projection_update

from ._common import (
    Steps,
    check_betas,
    check_bool,
    check_choice,
    check_int,
    check_number,
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
from .projection import (
    PROJ_TYPES,
    SVD_METHODS,
    back_project_update,
    compute_projectors,
    is_row_sharded,
    low_rank_shape,
    project,
    projection_sides,
    sharded_right_basis,
    sketch_seed,
)
from .targets import TARGET_FLAG, ModelOptimizerFactory

__all__ = [
    "DECAY_MODES",
    "EPS_MODES",
    "MOMENT_POLICIES",
    "PROJECTION_KEYS",
    "GaLore2",
    "GaLore2Factory",
    "adam_direction",
    "apply_update",
    "galore_adamw_step",
]

MOMENT_POLICIES = ("keep", "reset")
EPS_MODES = ("hf", "torch")
DECAY_MODES = ("after", "before")
# the options that belong to the projected groups (ModelOptimizerFactory.target_keys)
PROJECTION_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "svd", "oversample", "power_iters", "seed",
                   "moments_on_refresh")


# --------------------------------------------------------------------------------------------------
# Pure update functions (lists of tensors in, tensors updated in place)
# --------------------------------------------------------------------------------------------------


def _kernel_ready(*tensors: Tensor) -> bool:
    """Whether the multi-tensor kernels can take these tensors (they index flat, contiguous, local storage)."""
    return all(t.is_contiguous() and not is_dtensor(t) for t in tensors)


def _adam(params: Sequence[Tensor] | None, grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], steps: Sequence[int], *, betas: tuple[float, float], eps: float,
          eps_mode: str, correct_bias: bool, lr: float = 1.0, weight_decay: float = 0.0, decay_mode: str = "before",
          out: Sequence[Tensor] | None = None) -> list[float]:
    """One multi-tensor Adam pass: :func:`hfx_kernels.adamw.adamw_step` on ``params`` or, with ``params=None``,
    :func:`hfx_kernels.adamw.adam_direction` into ``out``; returns the per-tensor factors ``c`` of the directions.
    Tensors the kernels cannot take (strided, e.g. channels-last; DTensors) take the kernels' torch reference."""
    n = len(grads)
    targets = out if params is None else params
    is_ready = [_kernel_ready(targets[i], grads[i], exp_avgs[i], exp_avg_sqs[i]) for i in range(n)]
    ready = [i for i in range(n) if is_ready[i]]
    rest = [i for i in range(n) if not is_ready[i]]
    factors = [0.0] * n
    pick = lambda tensors, idx: [tensors[i] for i in idx]  # noqa: E731
    adam_kw = dict(betas=betas, eps=eps, eps_mode=eps_mode, correct_bias=correct_bias)
    if ready:
        args = (pick(grads, ready), pick(exp_avgs, ready), pick(exp_avg_sqs, ready))
        if params is None:
            _, cs = kernel_adam_direction(*args, steps=pick(steps, ready), out=pick(out, ready), **adam_kw)
            for i, c in zip(ready, cs):
                factors[i] = c
        else:
            adamw_step(pick(params, ready), *args, steps=pick(steps, ready), lr=lr, weight_decay=weight_decay,
                       decay_mode=decay_mode, **adam_kw)
    if rest:
        scalars = [adam_scalars(steps[i], lr=lr, **adam_kw) for i in rest]
        adamw_step_reference(None if params is None else pick(params, rest), pick(grads, rest), pick(exp_avgs, rest),
                             pick(exp_avg_sqs, rest), step_sizes=[st for st, _ in scalars],
                             eps=[e for _, e in scalars], betas=betas, decay=1.0 - lr * weight_decay,
                             decay_mode=decay_mode, out=None if out is None else pick(out, rest))
        for i, (st, _) in zip(rest, scalars):
            factors[i] = st
    return factors


def _direction_buffers(exp_avgs: Sequence[Tensor]) -> list[Tensor]:
    """Where the Adam directions go: float32 (float64 for float64 moments), so bf16/fp16 moments do not round them."""
    return [torch.empty(m.shape, dtype=compute_dtype(m.dtype), device=m.device) for m in exp_avgs]


def adam_direction(r: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, t: int, *, betas: tuple[float, float], eps: float,
                   correct_bias: bool = True, eps_mode: str = "hf") -> tuple[Tensor, float]:
    """Update the moments with ``r`` (in place) and return ``(N, c)`` such that the Adam step is ``-lr * c * N``.

    ``N = M / (sqrt(V) + eps')`` and ``c = sqrt(1 - b2^t) / (1 - b1^t)`` (both factors 1 without ``correct_bias``),
    with ``eps' = eps`` for ``eps_mode="hf"`` (official GaLore/Fira and transformers' legacy AdamW) and
    ``eps' = eps * sqrt(1 - b2^t)`` for ``eps_mode="torch"``, which makes ``c * N`` equal to torch.optim.AdamW's
    ``M / (1 - b1^t) / (sqrt(V / (1 - b2^t)) + eps)``. ``N`` is float32 (float64 for float64 moments).
    One tensor of :func:`hfx_kernels.adamw.adam_direction`; :func:`galore_adamw_step` calls that once per step for
    all tensors.
    """
    out = _direction_buffers([exp_avg])
    (c,) = _adam(None, [r], [exp_avg], [exp_avg_sq], [t], betas=betas, eps=eps, eps_mode=eps_mode,
                 correct_bias=correct_bias, out=out)
    return out[0], c


def apply_update(p: Tensor, update: Tensor, step_size: float, *, lr: float, weight_decay: float,
                 decay_mode: str = "after") -> None:
    """``p -= step_size * update`` with decoupled decay ``p *= 1 - lr * weight_decay`` applied after the update
    (``decay_mode="after"``, official GaLore/Fira) or before it (``"before"``, torch.optim.AdamW).

    One pass, rounded once: :func:`hfx_kernels.projection.projection_update` with rank 0 (its epilogue alone) for
    1-D and 2-D tensors; torch for others and for DTensors."""
    decay = 1.0 - lr * weight_decay
    if p.ndim <= 2 and not is_dtensor(p) and not is_dtensor(update):
        w, u = (p, update) if p.ndim == 2 else (p.view(1, -1), update.reshape(1, -1))
        empty = torch.empty(w.shape[0], 0, dtype=w.dtype, device=w.device)
        projection_update(w, empty, empty.new_empty(0, w.shape[1]), extra=u, beta=step_size, decay=decay,
                          decay_mode=decay_mode)
        return
    if weight_decay != 0 and decay_mode == "before":
        p.mul_(decay)
    p.add_(update.to(p.dtype), alpha=-step_size)
    if weight_decay != 0 and decay_mode == "after":
        p.mul_(decay)


def galore_adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    lefts: Sequence[Tensor | None],
    rights: Sequence[Tensor | None],
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
) -> None:
    """One GaLore-AdamW step on every tensor of ``params`` (in place).

    ``lefts[i]``/``rights[i]`` are parameter i's bases (m×r / r×n, see :mod:`hfx_optim.projection`) or None; with
    both None the parameter takes plain AdamW on its full gradient and ``scale`` does not apply. ``exp_avgs`` and
    ``exp_avg_sqs`` have the projected shape. ``step`` is the bias-correction step t >= 1, one int or one per
    parameter.

    Kernels (:mod:`hfx_kernels`, Triton on CUDA, torch elsewhere): the non-projected parameters take one multi-tensor
    ``adamw_step``; the projected ones are projected in torch (``R = P^T G``), take one multi-tensor
    ``adam_direction`` on the R's, and each is back-projected, scaled and decayed by one ``projection_update``
    (GEMM with the update in its epilogue).
    """
    steps = per_param(step, len(params))
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "lefts": lefts, "rights": rights}
    _check_lengths(len(params), lists)
    plain = [i for i in range(len(params)) if lefts[i] is None and rights[i] is None]
    projected = [i for i in range(len(params)) if lefts[i] is not None or rights[i] is not None]
    common = dict(betas=betas, eps=eps, eps_mode=eps_mode, correct_bias=correct_bias)
    if plain:
        _adam([params[i] for i in plain], [grads[i] for i in plain], [exp_avgs[i] for i in plain],
              [exp_avg_sqs[i] for i in plain], [steps[i] for i in plain], lr=lr, weight_decay=weight_decay,
              decay_mode=decay_mode, **common)
    if not projected:
        return
    lows = [project(grads[i], lefts[i], rights[i]) for i in projected]
    ms, vs = [exp_avgs[i] for i in projected], [exp_avg_sqs[i] for i in projected]
    directions = _direction_buffers(ms)
    factors = _adam(None, lows, ms, vs, [steps[i] for i in projected], out=directions, **common)
    for i, n, c in zip(projected, directions, factors):
        back_project_update(params[i], n, lefts[i], rights[i], alpha=lr * c * scale, decay=1.0 - lr * weight_decay,
                            decay_mode=decay_mode)


def _check_lengths(n: int, lists: dict[str, Sequence]) -> None:
    for name, values in lists.items():
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} parameters")


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------


class GaLore2(torch.optim.Optimizer):
    r"""GaLore 2: GaLore-AdamW whose gradient subspace is refreshed by randomized SVD, with tensor-only state.

    Papers: Su, Gu, Xu, Tian, Zhao, "GaLore 2: Large-Scale LLM Pre-Training by Gradient Low-Rank Projection",
    arXiv `2504.20437 <https://arxiv.org/abs/2504.20437>`_; Zhao et al., "GaLore: Memory-Efficient LLM Training by
    Gradient Low-Rank Projection", arXiv `2403.03507 <https://arxiv.org/abs/2403.03507>`_. Written from the hfx
    optimizer spec (§3); the update rule is in the module docstring.

    Example::

        import hfx
        from transformers import Trainer

        # name-aware: Linear weights projected, embeddings / lm_head / norms / biases on AdamW, HF's decay split kept
        trainer = Trainer(model, args, train_dataset=ds,
                          optimizer_cls_and_kwargs=hfx.optimizer("galore2", rank=128, target_modules="all-linear"))

        # or in an hfx trainer config (YAML: `hfx_optimizer: galore2`, `hfx_optimizer_args: {rank: 128}`); there the
        # Trainer's learning_rate, adam_beta1/2, adam_epsilon and weight_decay are forwarded (HF's GaLore drops them)

        # or directly, with groups from hfx_optim.targets
        from hfx_optim.targets import param_groups
        opt = hfx.GaLore2(param_groups(model, "all-linear", target_options={"rank": 128}), lr=1e-3)

    Which groups are projected: a group with ``hfx_target=True`` (what :func:`hfx_optim.targets.param_groups` marks)
    or, without that key, a group that sets ``rank`` itself (the official GaLore style). Every other group takes
    AdamW with the same formulas. At least one projected group is required: ``GaLore2(model.parameters())`` would be
    plain AdamW and is refused. A projected group holds 2-D parameters with ``rank <= min(rows, cols)``.

    Args (defaults: the official GaLore-AdamW constructor / README unless noted; every one may be set per group):
        lr: 1e-3 (the C4 pre-training scripts use 1e-2). betas: (0.9, 0.999). eps: 1e-6 (official; Trainer's
            ``adam_epsilon`` 1e-8 replaces it when forwarded). weight_decay: 0.0, decoupled.
        rank: subspace rank r (128, README and HF; the scripts use 128–1024 by model size).
        update_proj_gap: T, steps between subspace refreshes (200); a refresh happens before steps 1, T+1, 2T+1, ...
        scale: alpha, multiplies the back-projected update (0.25, README/HF/scripts; the projector's own default
            is 1.0).
        proj_type: "std" (project the shorter side), "reverse_std", "left", "right" or "full" (both sides, r×r
            moments). "right" keeps row shards local (the FSDP2-friendly choice of spec §3.2).
        svd: "randomized" (default, GaLore 2) or "exact" (GaLore 1). Both run in float32 (float64 for float64
            parameters) and give each singular vector a canonical sign (largest-magnitude entry positive).
        oversample: p, extra sketch columns (8). power_iters: q, subspace iterations (2, as
            ``torch.svd_lowrank``; 1 is cheaper, 0 is a single pass and poor on flat spectra).
        seed: base seed of the Gaussian sketches (0). Parameter i's k-th refresh draws from
            ``sketch_seed(state["seed"], k)``, with ``state["seed"] = sketch_seed(seed, i)`` (i counts over all
            param_groups in order), so every DDP rank draws the same sketch and a resume is bit-identical.
        moments_on_refresh: "keep" (default, official GaLore: the Adam moments carry over to the new subspace
            unchanged, GaLore issue #54) or "reset" (zero them and restart the bias correction, as FRUGAL does).
        correct_bias: Adam bias correction (True).
        eps_mode: "hf" (default, official: ``M / (sqrt(V) + eps)`` before the bias correction) or "torch"
            (torch.optim.AdamW's ``eps`` after it).
        decay_mode: "after" (default, official: decay the updated weights) or "before" (torch.optim.AdamW).

    State per parameter (tensors and ints only, so ``torch.load(weights_only=True)`` resumes it): ``step``,
    ``exp_avg``, ``exp_avg_sq``; projected parameters also ``proj_left`` (m×r) and/or ``proj_right`` (r×n),
    ``seed``, ``refreshes`` (count), ``last_refresh`` (steps taken at the last refresh), ``adam_step`` (the bias-
    correction step; restarts with ``moments_on_refresh="reset"``). State is created at the first ``step()`` from
    the parameter as it is then.

    Memory for an m×n projected matrix at rank r (elements; AdamW keeps 2mn): one-sided ``r*min(m,n) +
    2*r*max(m,n)`` for "std" (basis on the short side, moments on the long side), ``r*max + 2*r*min`` for
    "reverse_std", ``r*(m+n) + 2*r*r`` for "full".

    Distributed: DDP works (the same seeds on every rank). FSDP2 (DTensor parameters sharded by rows, ``Shard(0)``)
    works with the right projection (``proj_type="right"``, or "std" on matrices with rows >= cols), without
    gathering the gradient (spec §3.2): ``G_shard @ P^T``, the moments (row-sharded DTensors) and the
    back-projection are local, and a refresh all-reduces only n×k and gathers m×k sketches
    (:func:`hfx_optim.projection.sharded_right_basis`, the same basis as on the whole matrix). Other sharded
    layouts, a left projection and ``svd="exact"`` are refused with an error that names the fix; AdamW groups take
    any DTensor. :class:`hfx_optim.Fira` and FRUGAL's "svd"/"random" subspaces take row shards the same way. FSDP1
    with flat parameters and DeepSpeed ZeRO hand the optimizer 1-D shards, which a projected group refuses.
    """

    _name = "GaLore2"

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
        scale: float = 0.25,
        proj_type: str = "std",
        svd: str = "randomized",
        oversample: int = 8,
        power_iters: int = 2,
        seed: int = 0,
        moments_on_refresh: str = "keep",
        correct_bias: bool = True,
        eps_mode: str = "hf",
        decay_mode: str = "after",
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, update_proj_gap=update_proj_gap,
            scale=scale, proj_type=proj_type, svd=svd, oversample=oversample, power_iters=power_iters, seed=seed,
            moments_on_refresh=moments_on_refresh, correct_bias=correct_bias, eps_mode=eps_mode, decay_mode=decay_mode,
        )
        self._setup(params, defaults)

    def _setup(self, params, defaults: dict[str, Any]) -> None:
        self._validate_group(dict(defaults, **{TARGET_FLAG: True}))  # fail on bad defaults even if groups override them
        super().__init__(params, defaults)
        if not any(group[TARGET_FLAG] for group in self.param_groups):
            raise ValueError(
                f"{self._name} got no projected parameter group, so it would be plain AdamW. Build the groups with "
                f"hfx_optim.targets.param_groups(model, 'all-linear', target_options={{'rank': 128}}), use "
                f"hfx.optimizer('{self._name.lower()}', rank=128, target_modules='all-linear') (a factory for "
                "Trainer), or give the groups to project a 'rank' key yourself."
            )

    # -- groups ---------------------------------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check and normalise a parameter group in place; every error says how to fix it."""
        group["lr"] = check_number("lr", group["lr"], "pass a learning rate, e.g. lr=1e-3")
        group["eps"] = check_number("eps", group["eps"], "pass e.g. eps=1e-6")
        group["weight_decay"] = check_number("weight_decay", group["weight_decay"], "pass e.g. weight_decay=0.01")
        group["betas"] = check_betas(group["betas"])
        check_bool("correct_bias", group["correct_bias"])
        check_choice("eps_mode", group["eps_mode"], EPS_MODES,
                     " ('hf': eps added before the bias correction, official; 'torch': as torch.optim.AdamW)")
        check_choice("decay_mode", group["decay_mode"], DECAY_MODES,
                     " ('after': decay the updated weights, official; 'before': as torch.optim.AdamW)")
        if not group[TARGET_FLAG]:
            return
        check_choice("proj_type", group["proj_type"], self._proj_types())
        check_int("rank", group["rank"], "pass e.g. rank=128 (at most min(rows, cols) of every projected matrix)",
                  minimum=1)
        check_int("update_proj_gap", group["update_proj_gap"], "steps between subspace refreshes, e.g. 200",
                  minimum=1)
        group["scale"] = check_number("scale", group["scale"], "GaLore's alpha, e.g. scale=0.25")
        check_choice("svd", group["svd"], SVD_METHODS, " (GaLore 2's randomized SVD, or the exact one)")
        check_int("oversample", group["oversample"], "extra sketch columns, e.g. oversample=8", minimum=0)
        check_int("power_iters", group["power_iters"], "subspace iterations, e.g. power_iters=2", minimum=0)
        check_int("seed", group["seed"], "any non-negative int, e.g. seed=0", minimum=0)
        check_choice("moments_on_refresh", group["moments_on_refresh"], MOMENT_POLICIES,
                     " ('keep': official GaLore; 'reset': zero the moments and restart the bias correction)")

    def _proj_types(self) -> Sequence[str]:
        return PROJ_TYPES

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            # a hand-built group that sets `rank` is projected (official GaLore style); targets.param_groups marks both
            param_group.setdefault(TARGET_FLAG, "rank" in param_group)
        super().add_param_group(param_group)
        finish_added_group(self.param_groups, self._finish_group)

    def _finish_group(self, group: dict[str, Any]) -> None:
        self._validate_group(group)
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise complex_param_error(self._name, describe_param(group, i, p))
            if group[TARGET_FLAG]:
                self._check_projectable(group, i, p)

    def _check_projectable(self, group: dict[str, Any], i: int, p: Tensor) -> None:
        what = describe_param(group, i, p)
        if is_dtensor(p):
            self._check_shards(group, what, p)
        if p.ndim != 2:
            raise ValueError(
                f"{self._name}: {what} is in a projected group but is not 2-D; only matrices can be projected. "
                "Leave it out of target_modules (1-D/3-D parameters belong in an AdamW group). FSDP1 with "
                "use_orig_params=False and DeepSpeed ZeRO flatten parameters to 1-D: use DDP, or FSDP2 on the "
                "AdamW groups only."
            )
        rank, limit = group["rank"], min(p.shape)
        if rank > limit:
            raise ValueError(
                f"{self._name}: rank={rank} is larger than {what} allows: the rank must be <= min(rows, cols) = "
                f"{limit}. Pass a smaller rank (e.g. rank={max(1, limit // 4)}), or leave this module out of "
                "target_modules."
            )

    def _check_shards(self, group: dict[str, Any], what: str, p: Tensor) -> None:
        """A projected DTensor: row shards (FSDP2's ``Shard(0)``) with the right projection and the randomized SVD,
        or an error naming the fix."""
        leave_out = ("or leave this module out of target_modules (its group then runs AdamW, which takes any "
                     "DTensor)")
        if not is_row_sharded(p):
            raise ValueError(f"{self._name}: {what} is a DTensor with placements {tuple(p.placements)} on a "
                             f"{p.device_mesh.ndim}-D mesh; the projected path takes row shards on a 1-D mesh "
                             f"(Shard(0), FSDP2's fully_shard). Shard it by rows, {leave_out}.")
        if projection_sides(group["proj_type"], p.shape) != (False, True):
            raise ValueError(f"{self._name}: {what} is row-sharded (FSDP2) and proj_type={group['proj_type']!r} "
                             f"projects its rows; only the right projection keeps shards local. Pass "
                             f"proj_type='right' (it projects the columns: moments of rows × rank), {leave_out}.")
        if group["svd"] != "randomized":
            raise ValueError(f"{self._name}: {what} is row-sharded (FSDP2) and svd='exact' needs the whole matrix; "
                             f"pass svd='randomized' (it sketches across shards without gathering G), {leave_out}.")

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step (refreshing the subspace of parameters due for it). Returns the closure's loss."""
        loss = run_closure(closure)
        self._check_grads()  # before any state changes: an error leaves the optimizer as it was
        for group, index in with_offsets(self.param_groups):  # sketch seeds do not depend on which have grads
            self._step_group(group, index)
        return loss

    def _check_grads(self) -> None:
        for group, i, p in params_with_grad(self.param_groups):
            if p.grad.is_sparse:
                raise sparse_grad_error(self._name, describe_param(group, i, p))
            if group[TARGET_FLAG]:
                self._check_projectable(group, i, p)  # again: FSDP2/ZeRO may have swapped it since construction

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any], index: int) -> None:
        state["step"] = 0
        if group[TARGET_FLAG]:
            state["adam_step"] = 0
            state["seed"] = sketch_seed(group["seed"], index)
            state["refreshes"] = 0
            state["last_refresh"] = 0
        else:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _refresh(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        """New bases from the current gradient; moments allocated, kept or reset."""
        sides = projection_sides(group["proj_type"], p.shape)
        sketch = dict(oversample=group["oversample"], power_iters=group["power_iters"],
                      seed=sketch_seed(state["seed"], state["refreshes"]))
        if is_dtensor(p):  # row shards: the right basis without gathering G, kept as a replicated DTensor
            left, right = None, replicated_like(p, sharded_right_basis(p.grad, group["rank"], **sketch))
        else:
            left, right = compute_projectors(p.grad, group["rank"], group["proj_type"], method=group["svd"],
                                             dtype=p.dtype, **sketch)
        for key, basis in (("proj_left", left), ("proj_right", right)):
            if basis is None:
                state.pop(key, None)
            else:
                state[key] = basis
        state["refreshes"] += 1
        state["last_refresh"] = state["step"]
        shape = low_rank_shape(p.shape, group["rank"], sides)
        if "exp_avg" not in state or tuple(state["exp_avg"].shape) != shape:
            state["exp_avg"], state["exp_avg_sq"] = (zeros_sharded_like(p, shape) for _ in range(2))
            state["adam_step"] = 0
        elif group["moments_on_refresh"] == "reset":
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["adam_step"] = 0

    def _step_group(self, group: dict[str, Any], first_index: int) -> None:
        projected = group[TARGET_FLAG]
        lists: dict[str, list] = {k: [] for k in ("p", "g", "m", "v", "left", "right", "t", "state", "mesh")}
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:  # lazily, from the actual parameter
                self._init_state(group, p, state, first_index + i)
            if projected:
                if state["step"] % group["update_proj_gap"] == 0:
                    self._refresh(group, p, state)
                state["adam_step"] += 1
            state["step"] += 1
            # a DTensor steps on its local shard (row shards when projected): every tensor below is then local
            lists["p"].append(local_part(p))
            lists["g"].append(local_part(p.grad))
            lists["m"].append(local_part(state["exp_avg"]))
            lists["v"].append(local_part(state["exp_avg_sq"]))
            lists["left"].append(local_part(state.get("proj_left")))
            lists["right"].append(local_part(state.get("proj_right")))
            lists["t"].append(state["adam_step"] if projected else state["step"])
            lists["state"].append(state)
            lists["mesh"].append(p.device_mesh if projected and is_dtensor(p) else None)  # rows on other ranks
        if lists["p"]:
            self._update(group, lists)

    def _common(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                    correct_bias=group["correct_bias"], eps_mode=group["eps_mode"], decay_mode=group["decay_mode"])

    def _update(self, group: dict[str, Any], lists: dict[str, list]) -> None:
        galore_adamw_step(
            lists["p"], lists["g"], lists["m"], lists["v"], lists["left"], lists["right"], step=lists["t"],
            scale=group["scale"] if group[TARGET_FLAG] else 1.0, **self._common(group),
        )


# --------------------------------------------------------------------------------------------------
# Factory for Trainer(optimizer_cls_and_kwargs=...) and hfx_optimizer
# --------------------------------------------------------------------------------------------------


def factory_signature(optimizer_cls: type) -> inspect.Signature:
    """``(self, model, *, target_modules="all-linear", <every keyword of optimizer_cls>)``: an explicit signature
    lets hfx forward TrainingArguments' lr, betas, eps and weight_decay to the factory (it forwards only the
    keywords a callable names)."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("target_modules", kw, default="all-linear"),
    ]
    params += [p.replace(kind=kw) for name, p in inspect.signature(optimizer_cls.__init__).parameters.items()
               if name not in ("self", "params")]
    return inspect.Signature(params)


class GaLore2Factory(ModelOptimizerFactory):
    """Builds :class:`GaLore2` from a model (``Factory()(model, **kwargs)``, transformers 5's factory protocol):
    ``target_modules`` Linear weights ("all-linear" = every Linear except the output head) are projected with the
    projection options (:data:`PROJECTION_KEYS`); embeddings, ``lm_head``, norms and biases run AdamW; HF's
    decay/no-decay split is kept. This is what ``hfx.optimizer("galore2", ...)`` returns.

    >>> opt = GaLore2Factory()(model, rank=64, lr=1e-3, weight_decay=0.01)  # doctest: +SKIP
    """

    optimizer_cls = GaLore2
    target_keys = PROJECTION_KEYS

    def __call__(self, model, **kwargs):
        return super().__call__(model, **kwargs)

    __call__.__signature__ = factory_signature(GaLore2)
