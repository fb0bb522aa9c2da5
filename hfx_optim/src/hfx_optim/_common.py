"""Helpers shared by the hfx-optim optimizers: argument checks whose errors say how to fix them, parameters named in
messages, and the small loops every ``step()`` runs. A ``where`` argument is appended to the value in an error (FRUGAL
names the param group there)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from hfx_kernels._backend import is_dtensor  # one definition, shared with the kernels' dispatch

Steps = int | Sequence[int]
Group = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Per-step lists
# --------------------------------------------------------------------------------------------------


def per_param(step: Steps, n: int) -> Sequence[int]:
    """``step`` as one bias-correction step per parameter (one int stands for all ``n``)."""
    if isinstance(step, int):
        return [step] * n
    if len(step) != n:
        raise ValueError(f"step has {len(step)} entries for {n} parameters")
    return step


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """The closure's loss, computed with gradients enabled (a step runs under ``no_grad``); None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def params_with_grad(param_groups: Iterable[Group]) -> Iterator[tuple[Group, int, Tensor]]:
    """``(group, index in the group, parameter)`` for every parameter that has a gradient."""
    for group in param_groups:
        for i, p in enumerate(group["params"]):
            if p.grad is not None:
                yield group, i, p


def with_offsets(param_groups: Iterable[Group]) -> Iterator[tuple[Group, int]]:
    """``(group, position of its first parameter over all groups)``: per-parameter seeds that do not depend on which
    parameters have gradients."""
    index = 0
    for group in param_groups:
        yield group, index
        index += len(group["params"])


def finish_added_group(param_groups: list[Group], finish: Callable[[Group], None]) -> None:
    """``finish`` (check and complete) the group just appended; on ValueError remove it, so the optimizer stays as it
    was, and re-raise."""
    try:
        finish(param_groups[-1])
    except ValueError:
        param_groups.pop()
        raise


def adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step: Steps,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW in ``torch.optim.AdamW``'s form (decay before the update, eps outside the bias correction), in place, for
    the parameters an optimizer leaves to AdamW (MARS's 1-D ones, ECO's unquantized ones); moments may be wider than
    the parameter (float32 for bf16). One call of :func:`hfx_kernels.adamw.adamw_step`: Triton on CUDA, torch
    (torch's fused AdamW where the dtypes allow) elsewhere."""
    from hfx_kernels.adamw import adamw_step as kernel

    kernel(params, grads, exp_avgs, exp_avg_sqs, steps=list(per_param(step, len(params))), lr=lr, betas=betas, eps=eps,
           weight_decay=weight_decay, eps_mode="torch", decay_mode="before")


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


def check_number(name: str, value: Any, hint: str, *, minimum: float = 0.0) -> float:
    """A finite real ``>= minimum`` (not a bool), as a float."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}; {hint}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}; {hint}") from None
    if not (math.isfinite(value) and value >= minimum):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value}; {hint}")
    return value


def check_int(name: str, value: Any, hint: str, *, minimum: int, where: str = "") -> int:
    """An int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}{where}; {hint}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str], meaning: str = "", *, where: str = "") -> str:
    """One of ``choices``; ``meaning`` follows the list of choices in the error."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}{where}: use one of {', '.join(repr(c) for c in choices)}{meaning}")
    return value


def check_bool(name: str, value: Any, where: str = "") -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}{where}")
    return value


def check_beta_range(betas: tuple[float, float], *, name: str = "betas", example: str = "(0.9, 0.999)",
                     where: str = "") -> tuple[float, float]:
    """Both betas in [0, 1); the error suggests ``name=example``."""
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}[{i}] must be in [0, 1), got {beta}{where}; pass e.g. {name}={example}")
    return betas


def check_betas(betas: Any, *, name: str = "betas", example: str = "(0.9, 0.999)") -> tuple[float, float]:
    """``betas`` as a pair of floats in [0, 1); the errors suggest ``name=example``."""
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of floats in [0, 1), e.g. {name}={example}; got {betas!r}") from None
    return check_beta_range((beta1, beta2), name=name, example=example)


# --------------------------------------------------------------------------------------------------
# Parameters in messages
# --------------------------------------------------------------------------------------------------


def param_name(group: Group, i: int) -> str | None:
    """The name of ``group["params"][i]`` from a named param group (``param_names``), or None."""
    names = group.get("param_names")
    return names[i] if names and i < len(names) else None


def describe_param(group: Group, i: int, p: Tensor) -> str:
    """``parameter 'name' (shape 4×3)``, or ``parameter #i of its group (shape 4×3)`` without names."""
    name = param_name(group, i)
    shape = "×".join(map(str, p.shape)) or "scalar"
    return f"parameter {name!r} (shape {shape})" if name else f"parameter #{i} of its group (shape {shape})"


def sparse_grad_error(optimizer: str, what: str, advice: str = "") -> RuntimeError:
    return RuntimeError(f"{optimizer} does not support sparse gradients ({what}); use dense gradients, e.g. "
                        f"nn.Embedding(..., sparse=False){advice}")


def complex_param_error(optimizer: str, what: str) -> ValueError:
    return ValueError(f"{optimizer} does not support complex parameters ({what}); optimise torch.view_as_real(param) "
                      "instead")


def zeros_sharded_like(p: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
    """Zeros of ``shape`` for state that lives next to ``p``: a DTensor on ``p``'s mesh with ``p``'s placements when
    ``p`` is one (row shards: the same rows on every rank as ``p``'s), a plain tensor otherwise."""
    dtype = p.dtype if dtype is None else dtype
    if not is_dtensor(p):
        return torch.zeros(shape, dtype=dtype, device=p.device)
    import torch.distributed.tensor as dt

    return dt.zeros(shape, dtype=dtype, device_mesh=p.device_mesh, placements=p.placements)


def replicated_like(p: Tensor, t: Tensor) -> Tensor:
    """``t`` (the same on every rank, e.g. a subspace basis) as a replicated DTensor on ``p``'s mesh when ``p`` is a
    DTensor, so sharded state stays one kind of tensor; ``t`` itself otherwise."""
    if not is_dtensor(p):
        return t
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(t, p.device_mesh, [Replicate()], run_check=False)


def local_part(t: Tensor | None) -> Tensor | None:
    """A DTensor's local shard (what an optimizer steps on), the tensor itself otherwise (None stays None)."""
    return t.to_local() if t is not None and is_dtensor(t) else t
