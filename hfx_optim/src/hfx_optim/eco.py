"""ECO: error-compensating optimizers without master weights (ECO-SGDM and ECO-Adam).

Paper: Nikdan, Zandieh, Alistarh, Mirrokni, "ECO: Quantized Training without Full-Precision Master Weights",
arXiv `2601.22101 <https://arxiv.org/abs/2601.22101>`_ (Jan 2026). No official code exists; this is written from the
update rules of the hfx optimizer spec (§6.1: the memory-free Algorithms 2 and 3 as restated by F. L. Cesista,
including his decoupled weight-decay extension).

The weights are kept only quantized: after every step the update is applied to the quantized weight, the result is
quantized again, and the quantization error ``e`` is injected into the momentum, so that the following steps move the
weight by what rounding took away (error feedback without an error buffer). Notation: ``th`` the quantized weight,
``q`` the quantizer (:mod:`hfx_optim.quantize`), ``lr`` the learning rate of this step, ``wd`` the weight decay,
``decay = 1 - lr*wd``; ``t`` counts steps from 1::

    ECO-SGDM:  m~  = beta*m + (1-beta)*g
               th~ = decay*th - lr*m~
               th  = q(th~);   e = th~ - th
               m   = m~ + decay * (1/lr) * (1 - 1/beta) * e

    ECO-Adam:  m~  = b1*m + (1-b1)*g;   v = b2*v + (1-b2)*g^2
               D   = sqrt(v) / sqrt(1-b2^t) + eps
               th~ = decay*th - lr * (m~/(1-b1^t)) / D
               th  = q(th~);   e = th~ - th
               m   = m~ + decay * ((1-b1^t)/lr) * (1 - 1/b1) * D * e

The per-step math is in pure functions over lists of tensors (:func:`eco_adam_step`, :func:`eco_sgdm_step`, and
:func:`adamw_step`, :func:`sgdm_step` for the parameters that are not quantized). Two steps go through hfx-kernels'
dispatch (``HFX_KERNELS``; Triton on CUDA tensors, torch elsewhere), with the same results on both paths: the
requantize step ``th = q(th~); e = th~ - th`` (:func:`hfx_kernels.quantize.requantize`: scales, rounding, the held
weight and the error in one pass; stochastic rounding with Philox noise drawn in the kernel, which the torch path
reproduces bit for bit) and AdamW for the parameters ECO-Adam does not quantize (:func:`hfx_kernels.adamw.adamw_step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hfx_kernels.quantize import requantize, sr_noise

from ._common import (
    Steps,
    adamw_step,
    check_bool,
    finish_added_group,
    is_dtensor,
    local_part,
    param_name,
    params_with_grad,
    per_param,
    run_closure,
    sparse_grad_error,
    with_offsets,
    zeros_sharded_like,
)
from .projection import is_row_sharded
from .quantize import (
    SCALE_MODES,
    Quantized,
    format_bits,
    mix_seed,
    normalize_format,
    quantize,
    quantized_nbytes,
)
from .targets import TARGET_FLAG, ModelOptimizerFactory

__all__ = [
    "ECO",
    "ERROR_FEEDBACK_MODES",
    "VARIANTS",
    "ECOFactory",
    "ECOMemoryReport",
    "adamw_step",
    "eco_adam_step",
    "eco_memory_report",
    "eco_sgdm_step",
    "sgdm_step",
]

VARIANTS = ("adam", "sgdm")
ERROR_FEEDBACK_MODES = ("memory_free", "exact", "none")
QUANTIZABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# Pure update functions (lists of tensors in, tensors updated in place)
# --------------------------------------------------------------------------------------------------


def _optional(values: Sequence[Tensor | None] | None, n: int, what: str) -> Sequence[Tensor | None]:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} parameters")
    return values


def _requantize(p: Tensor, theta_tilde: Tensor, scale: Tensor, noise: Tensor | None, *, fmt: str, scale_mode: str,
                block_size: int, seed: int | None = None) -> Tensor:
    """Write q(th~) into ``p`` (in p's dtype) and its scales into ``scale``; return ``e = th~ - th`` (reusing the
    ``theta_tilde`` buffer). The error is taken against the value the model holds, so a bfloat16 parameter's own
    rounding of the grid value is compensated too. Rounds stochastically with ``noise`` (a tensor of p's shape) or
    with the Philox noise of ``seed`` (drawn in the kernel), to nearest with neither. One call of
    :func:`hfx_kernels.quantize.requantize` (Triton on CUDA, torch elsewhere; the same results on both)."""
    theta = theta_tilde.to(_compute_dtype(p)).contiguous()
    target = p if p.is_contiguous() else p.contiguous()
    new_scale = scale if scale.is_contiguous() else scale.contiguous()
    requantize(target, theta, new_scale, fmt=fmt, scale_mode=scale_mode, block_size=block_size, seed=seed,
               noise=None if noise is None else noise.contiguous())
    if target is not p:
        p.copy_(target)
    if new_scale is not scale:
        scale.copy_(new_scale)
    return theta


def eco_adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    scales: Sequence[Tensor],
    *,
    step: Steps,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    fmt: str = "int8",
    scale_mode: str = "block",
    block_size: int = 128,
    noises: Sequence[Tensor | None] | None = None,
    error_feedback: str = "memory_free",
    seeds: Sequence[int | None] | None = None,
) -> None:
    """One ECO-Adam step (in place) on 2-D parameters that hold quantized weights.

    ``exp_avgs``/``exp_avg_sqs`` are in the compute dtype (float32, float64 for float64 parameters) and hold m and
    v; ``scales[i]`` receives the new scales of ``params[i]``; ``step`` is t >= 1 (one int, or one per parameter);
    ``seeds[i]`` (an int in [0, 2^64)) turns on stochastic rounding for that parameter with the Philox noise
    ``tl.rand(seeds[i], flat index)`` (:func:`hfx_kernels.quantize.sr_noise`), drawn in the kernel; ``noises[i]``
    (uniform in [0, 1), shape of the parameter) supplies the noise as a tensor instead (give one or the other).
    ``error_feedback``: "memory_free" (the paper) or "none" (naive re-quantization, the ablation). At ``lr == 0``
    nothing is injected: ``1/lr`` is undefined and, with the weight not moving, there is no step to compensate
    (HF's linear warm-up runs its first step at lr = 0).
    """
    if error_feedback not in ("memory_free", "none"):
        raise ValueError(f"eco_adam_step: error_feedback must be 'memory_free' or 'none', got {error_feedback!r}")
    beta1, beta2 = betas
    n = len(params)
    decay = 1.0 - lr * weight_decay
    for p, g, m, v, s, u, seed, t in zip(params, grads, exp_avgs, exp_avg_sqs, scales, _optional(noises, n, "noises"),
                                         _optional(seeds, n, "seeds"), per_param(step, n), strict=True):
        g = g.to(m.dtype)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)  # m~
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1**t
        denom = v.sqrt().div_(math.sqrt(1.0 - beta2**t)).add_(eps)  # D
        theta = p.to(m.dtype).mul(decay).addcdiv_(m, denom, value=-lr / bias_correction1)  # th~ (a new tensor)
        e = _requantize(p, theta, s, u, fmt=fmt, scale_mode=scale_mode, block_size=block_size, seed=seed)
        if error_feedback == "memory_free" and lr > 0:
            m.addcmul_(denom, e, value=decay * bias_correction1 / lr * (1.0 - 1.0 / beta1))


def eco_sgdm_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    scales: Sequence[Tensor],
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    fmt: str = "int8",
    scale_mode: str = "block",
    block_size: int = 128,
    noises: Sequence[Tensor | None] | None = None,
    error_feedback: str = "memory_free",
    errors: Sequence[Tensor] | None = None,
    seeds: Sequence[int | None] | None = None,
) -> None:
    """One ECO-SGDM step (in place) on 2-D parameters that hold quantized weights; arguments as in
    :func:`eco_adam_step` (``momenta``: m, in the compute dtype; ``seeds``/``noises``: stochastic rounding).

    ``error_feedback="exact"`` keeps the previous error in ``errors[i]`` (one more buffer) and injects
    ``m = m~ + decay*(e_prev - e/beta)/lr``; at a constant lr this reproduces SGDM with master weights exactly:
    ``th + e`` equals the master weight after every step. At ``lr == 0`` nothing is injected and the stored error is
    reset (its pair term ``-e/(lr*beta)`` was never applied)."""
    if error_feedback not in ERROR_FEEDBACK_MODES:
        raise ValueError(f"eco_sgdm_step: error_feedback must be one of {ERROR_FEEDBACK_MODES}, got {error_feedback!r}")
    n = len(params)
    if error_feedback == "exact" and (errors is None or len(errors) != n):
        raise ValueError("eco_sgdm_step: error_feedback='exact' needs one error buffer per parameter (errors=[...])")
    decay = 1.0 - lr * weight_decay
    for p, g, m, s, u, seed, e_prev in zip(params, grads, momenta, scales, _optional(noises, n, "noises"),
                                           _optional(seeds, n, "seeds"), _optional(errors, n, "errors"), strict=True):
        m.mul_(beta).add_(g.to(m.dtype), alpha=1.0 - beta)  # m~
        theta = p.to(m.dtype).mul(decay).add_(m, alpha=-lr)  # th~
        e = _requantize(p, theta, s, u, fmt=fmt, scale_mode=scale_mode, block_size=block_size, seed=seed)
        if error_feedback == "memory_free" and lr > 0:
            m.add_(e, alpha=decay * (1.0 - 1.0 / beta) / lr)
        elif error_feedback == "exact":
            if lr > 0:
                m.add_(e_prev, alpha=decay / lr).add_(e, alpha=-decay / (lr * beta))
                e_prev.copy_(e)
            else:
                e_prev.zero_()




def sgdm_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    *,
    lr: float,
    beta: float,
    weight_decay: float,
) -> None:
    """SGD with EMA momentum ``m = beta*m + (1-beta)*g; p = (1-lr*wd)*p - lr*m`` for the parameters ECO-SGDM does not
    quantize. Without weight decay this takes the steps of ``torch.optim.SGD(lr=lr*(1-beta), momentum=beta)``."""
    for p, g, m in zip(params, grads, momenta, strict=True):
        m.mul_(beta).add_(g.to(m.dtype), alpha=1.0 - beta)
        w = p if p.dtype == m.dtype else p.to(m.dtype)
        if weight_decay != 0:
            w.mul_(1.0 - lr * weight_decay)
        w.add_(m, alpha=-lr)
        if w is not p:
            p.copy_(w)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check_nonneg(name: str, value: Any, hint: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not value >= 0.0 or math.isinf(value):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {value}; {hint}")
    return value


def _check_betas(betas: Any) -> tuple[float, float]:
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of floats, e.g. betas=(0.9, 0.999); got {betas!r}") from None
    if not 0.0 < beta1 < 1.0:
        raise ValueError(
            f"betas[0] must be in (0, 1) for ECO, got {beta1}: the error injection divides by beta1 (m = m~ + "
            "(1/lr)(1 - 1/beta1)e); pass e.g. betas=(0.9, 0.999)"
        )
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"betas[1] must be in [0, 1), got {beta2}; pass e.g. betas=(0.9, 0.999)")
    return beta1, beta2


def _resolve_format(weight_format: Any, bits: Any) -> tuple[str, int]:
    if bits is not None and (isinstance(bits, bool) or bits not in (4, 8)):
        raise ValueError(f"bits must be 8 or 4 (or None to follow weight_format), got {bits!r}")
    if weight_format is None:
        fmt = "int4" if bits == 4 else "int8"
    else:
        fmt = normalize_format(weight_format)
        if bits is not None and bits != format_bits(fmt):
            raise ValueError(
                f"bits={bits} contradicts weight_format={weight_format!r} ({format_bits(fmt)} bits); pass only one"
            )
    return fmt, format_bits(fmt)


def _normalize_variant(value: Any) -> str:
    name = str(value).lower().removeprefix("eco-").removeprefix("eco_")
    name = {"adamw": "adam", "sgd": "sgdm"}.get(name, name)
    if name not in VARIANTS:
        raise ValueError(f"unknown ECO variant {value!r}: use 'adam' (ECO-Adam) or 'sgdm' (ECO-SGDM)")
    return name


def _param_name(group: dict[str, Any], index: int) -> str:
    name = param_name(group, index)
    return f"#{index} of its param group" if name is None else repr(name)


def _scale_shape(shape: torch.Size, scale_mode: str, block_size: int) -> tuple[int, int]:
    rows, cols = shape
    return {"tensor": (1, 1), "row": (rows, 1), "block": (rows, math.ceil(cols / block_size))}[scale_mode]


def _compute_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------


class ECO(torch.optim.Optimizer):
    r"""ECO: an error-compensating optimizer without master weights (ECO-Adam or ECO-SGDM).

    Paper: Nikdan, Zandieh, Alistarh, Mirrokni, "ECO: Quantized Training without Full-Precision Master Weights",
    arXiv `2601.22101 <https://arxiv.org/abs/2601.22101>`_. Update rules in the module docstring (hfx spec §6.1).

    Example::

        import hfx
        from transformers import Trainer

        # targeted Linear weights held in INT8 (1x128 block scales); embeddings, lm_head, norms, biases on AdamW
        trainer = Trainer(model, args, train_dataset=ds, optimizer_cls_and_kwargs=hfx.optimizer("eco", bits=8))

        # or in an hfx trainer config (YAML: `hfx_optimizer: eco`)
        args = hfx.extend(SFTConfig)(output_dir="out", hfx_optimizer="eco",
                                     hfx_optimizer_args={"weight_format": "int4", "scale_mode": "row"})

        # or directly: every 2-D parameter of the list is quantized, the others run AdamW
        opt = hfx.ECO(model.parameters(), lr=1e-3, weight_format="fp8_e4m3")
        print(hfx_optim.eco_memory_report(model, opt))

    **How the weights are held.** The model keeps running in its own dtype (bfloat16, float16 or float32), and the
    optimizer keeps each quantized parameter exactly *on the quantization grid*: after every step the parameter holds
    ``q(th~)``, i.e. codes x scales, cast to its dtype, and ``state["scale"]`` holds the scales. There is no
    separate low-bit copy: the codes are a function of the parameter (:meth:`quantized_weights` recovers them exactly,
    e.g. to export an INT4 checkpoint), so a second copy would cost memory and bandwidth and could drift from the
    parameter. What is saved against AdamW with master weights is the fp32 master copy (4 B per parameter); a
    low-bit Linear that stores the codes (the paper's FP8 GEMM) would save the rest — :func:`eco_memory_report` gives
    both numbers. The forward pass sees exactly the quantized weights, and the gradient is taken with respect to them
    (straight-through), as the paper prescribes. The first step starts from the parameter as loaded (off the grid)
    and moves it onto the grid.

    **Which parameters are quantized** (group key ``quantize``): True/False force it for a group; None (default) means
    the group's ``hfx_target`` flag when it has one (groups from :func:`hfx_optim.targets.param_groups`, as
    :class:`ECOFactory`/``hfx.optimizer("eco")`` build them: targeted ``nn.Linear`` weights quantized; embeddings,
    ``lm_head``, norms and biases not), otherwise every 2-D parameter. Quantized parameters must be 2-D and
    float16/bfloat16/float32/float64; anything else is an error naming the parameter and the fix, never a silent
    fallback. The parameters that are not quantized run plain AdamW (ECO-Adam) or EMA-momentum SGD (ECO-SGDM) with
    the same hyper-parameters, moments in float32, result rounded to their dtype.

    Args (every one may be overridden per param group):
        params: parameters, or param groups (named parameters give error messages with names).
        lr: learning rate (1e-3). Through ``hfx.optimizer``/``hfx_optimizer``, Trainer's ``learning_rate``,
            ``adam_beta1/2``, ``adam_epsilon`` and ``weight_decay`` fill ``lr``, ``betas``, ``eps``, ``weight_decay``.
        betas: (beta1, beta2) = (0.9, 0.999); ECO-SGDM uses beta1 as its momentum. beta1 must be > 0 (the injection
            divides by it).
        eps: Adam's epsilon, outside the bias correction (1e-8).
        weight_decay: decoupled: ``th~ = (1 - lr*wd)*th - lr*update``, and the injected error is scaled by the same
            ``(1 - lr*wd)`` (Cesista's extension; it is what keeps the exact form exact with decay).
        variant: "adam" (ECO-Adam, default) or "sgdm" (ECO-SGDM: one moment, 5 B/param with FP8 weights).
        weight_format: "int8" (default), "int4" or "fp8_e4m3" (where torch has ``float8_e4m3fn``); ``bits=8``/``4``
            is a shorthand for int8/int4 (``bits=8`` with ``weight_format="fp8_e4m3"`` is consistent).
        scale_mode: "block" (default; 1 x ``block_size`` tiles along each row, so a fused kernel quantizes in one
            pass without a row-wide reduction), "row" (one scale per output row; the paper's FP8 setting) or
            "tensor" (one scale; the paper's INT4 setting). The scales are recomputed from the absmax of th~ every
            step (not delayed).
        block_size: tile width for "block" (128); a shorter last tile covers the rest of a row.
        stochastic_rounding: round th~ up or down at random with the probability that makes it unbiased (True).
            Summaries of the paper report that SR is needed to get near master-weight quality; it costs one uniform
            draw per element. False rounds to nearest (ties to even).
        seed: base seed of the SR noise (0). The noise of a parameter at step t is counter-based Philox, drawn in the
            requantize kernel: ``u[i] = tl.rand(mix_seed(state["sr_seed"], t), i)`` for the element at flat index
            ``i`` (:func:`hfx_kernels.quantize.sr_noise` gives it as a tensor, bit for bit), with
            ``state["sr_seed"] = mix_seed(seed, index of the parameter in the optimizer)``, so a resumed run draws
            the same noise (bit-identical), all DDP ranks draw the same, and so do the torch and Triton paths and
            every device.
        error_feedback: "memory_free" (default: the paper's ECO), "exact" (ECO-SGDM only: keeps the previous error,
            one more fp32 buffer, and reproduces master-weight SGDM exactly at a constant lr — a reference, it costs
            what master weights cost), or "none" (naive re-quantization without compensation, the ablation).
        quantize: see above (None).

    The injection divides by lr. At lr == 0 (the first step of HF's linear warm-up, or the end of a schedule
    decaying to 0) ECO injects nothing: there is no step for the error to be re-applied by. No floor on lr is used
    (the spec suggests considering one; it is not in the paper), so a tiny but positive lr injects a large
    ``e/lr`` into m, which the next step multiplies by a similar lr again.

    State per parameter (tensors and Python ints only, for ``torch.load(weights_only=True)``): ``step``, ``exp_avg``
    (m), ``exp_avg_sq`` (v; ECO-Adam), and for quantized parameters ``scale`` (float32, shape (1, 1), (rows, 1) or
    (rows, ceil(cols/block_size))), ``sr_seed`` (int) and ``error`` ("exact" only). Moments are float32 (float64 for
    float64 parameters) whatever the parameter's dtype, and :meth:`load_state_dict` keeps them so (torch's default
    would cast them to a bfloat16 parameter's dtype).

    Distributed: DDP works (every rank draws the same noise). FSDP2 row shards (DTensor ``Shard(0)``) work with
    ``scale_mode="row"`` or ``"block"``: each rank quantizes its own rows, with scales and moments sharded like the
    weight and the noise the whole tensor draws on those rows, so a sharded run steps like an unsharded one.
    ``scale_mode="tensor"`` (one scale across shards) and other layouts are refused.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        variant: str = "adam",
        weight_format: str | None = None,
        bits: int | None = None,
        scale_mode: str = "block",
        block_size: int = 128,
        stochastic_rounding: bool = True,
        seed: int = 0,
        error_feedback: str = "memory_free",
        quantize: bool | None = None,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, variant=variant, weight_format=weight_format,
            bits=bits, scale_mode=scale_mode, block_size=block_size, stochastic_rounding=stochastic_rounding,
            seed=seed, error_feedback=error_feedback, quantize=quantize,
        )
        self._validate_group(defaults)  # fail on bad defaults even if every group overrides them; normalise them
        super().__init__(params, defaults)

    # -- groups ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        """Check and normalise a param group in place; every error says how to fix it."""
        group["lr"] = _check_nonneg("lr", group["lr"], "pass a positive learning rate, e.g. lr=1e-3")
        group["eps"] = _check_nonneg("eps", group["eps"], "pass e.g. eps=1e-8")
        group["weight_decay"] = _check_nonneg("weight_decay", group["weight_decay"], "pass e.g. weight_decay=0.01")
        group["betas"] = _check_betas(group["betas"])
        group["variant"] = _normalize_variant(group["variant"])
        group["weight_format"], group["bits"] = _resolve_format(group["weight_format"], group["bits"])
        if group["scale_mode"] not in SCALE_MODES:
            raise ValueError(
                f"unknown scale_mode {group['scale_mode']!r}: use 'block' (1 x block_size tiles), 'row' or 'tensor'"
            )
        block_size = group["block_size"]
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive int (e.g. 128), got {block_size!r}")
        check_bool("stochastic_rounding", group["stochastic_rounding"])
        seed = group["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        if group["error_feedback"] not in ERROR_FEEDBACK_MODES:
            raise ValueError(
                f"unknown error_feedback {group['error_feedback']!r}: use 'memory_free' (the paper's ECO), 'exact' "
                "(ECO-SGDM only) or 'none' (naive re-quantization)"
            )
        if group["error_feedback"] == "exact" and group["variant"] != "sgdm":
            raise ValueError(
                "error_feedback='exact' is defined for ECO-SGDM only (its error term needs the next step's Adam "
                "denominator); use variant='sgdm', or error_feedback='memory_free' for ECO-Adam"
            )
        if group["quantize"] not in (None, True, False):
            raise ValueError(f"quantize must be None (auto), True or False, got {group['quantize']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # A group that sets only one of bits / weight_format must not inherit the other from the defaults.
        param_group = dict(param_group)
        if "bits" in param_group and "weight_format" not in param_group:
            param_group["weight_format"] = None
        if "weight_format" in param_group and "bits" not in param_group:
            param_group["bits"] = None
        super().add_param_group(param_group)
        finish_added_group(self.param_groups, self._finish_group)

    def _finish_group(self, group: dict[str, Any]) -> None:
        self._validate_group(group)
        for i, p in enumerate(group["params"]):
            if self._is_quantized(group, p):
                self._check_quantizable(group, i, p)

    @staticmethod
    def _is_quantized(group: dict[str, Any], p: Tensor) -> bool:
        if group["quantize"] is not None:
            return group["quantize"]
        if TARGET_FLAG in group:
            return bool(group[TARGET_FLAG])
        return p.ndim == 2

    @staticmethod
    def _check_quantizable(group: dict[str, Any], index: int, p: Tensor) -> None:
        name = _param_name(group, index)
        what = f"ECO cannot quantize parameter {name} (shape {tuple(p.shape)}, dtype {p.dtype})"
        exclude = (
            "leave it out of the quantized parameters: hfx.optimizer('eco', target_modules=...) quantizes only the "
            "targeted nn.Linear weights, or put it in a param group with quantize=False"
        )
        if p.ndim != 2:
            raise ValueError(f"{what}: only 2-D weights (rows, cols) get row/block scales. Fix: {exclude}.")
        if p.dtype not in QUANTIZABLE_DTYPES:
            raise ValueError(
                f"{what}: ECO keeps the weight on its quantization grid inside a float16/bfloat16/float32/float64 "
                f"parameter. Fix: load the model in bfloat16 or float32 (e.g. from_pretrained(..., "
                f"dtype=torch.bfloat16)), or {exclude}."
            )
        if is_dtensor(p) and not is_row_sharded(p):
            raise ValueError(
                f"{what}: a DTensor with placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; ECO "
                f"takes row shards on a 1-D mesh (Shard(0), FSDP2's fully_shard). Fix: shard it by rows, or {exclude}."
            )
        if is_dtensor(p) and group["scale_mode"] == "tensor":
            raise ValueError(
                f"{what}: it is row-sharded (FSDP2) and scale_mode='tensor' has one scale across all shards. Fix: "
                f"scale_mode='row' or 'block' (local to a row shard), or {exclude}."
            )

    # -- state ----------------------------------------------------------------------------------------------------
    def _new_state(self, group: dict[str, Any], p: Tensor, index: int, device=None) -> dict[str, Any]:
        device = p.device if device is None else device
        cdt = _compute_dtype(p)

        def moment() -> Tensor:  # zeros_like keeps an unquantized FSDP2 parameter's moments sharded like it
            if device != p.device:
                return torch.zeros(p.shape, dtype=cdt, device=device)
            return torch.zeros_like(p, dtype=cdt, memory_format=torch.contiguous_format)

        state: dict[str, Any] = {"step": 0, "exp_avg": moment()}
        if group["variant"] == "adam":
            state["exp_avg_sq"] = moment()
        if self._is_quantized(group, p):
            shape = _scale_shape(p.shape, group["scale_mode"], group["block_size"])
            on_p = device == p.device  # row scales of a row-sharded parameter are sharded with its rows
            state["scale"] = zeros_sharded_like(p, shape, cdt) if on_p else torch.zeros(shape, dtype=cdt, device=device)
            state["sr_seed"] = mix_seed(group["seed"], index)
            if group["error_feedback"] == "exact":
                state["error"] = moment()
        return state

    def _check_step(self) -> None:
        """Refuse what cannot be stepped before any state changes (an error leaves the optimizer as it was)."""
        for group, i, p in params_with_grad(self.param_groups):
            if p.grad.is_sparse:
                raise sparse_grad_error("ECO", f"parameter {_param_name(group, i)}, shape {tuple(p.shape)}")
            if self._is_quantized(group, p):
                try:
                    self._check_quantizable(group, i, p)  # FSDP2 swaps in DTensors after construction
                except ValueError as err:
                    raise RuntimeError(str(err)) from None

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step. Returns the closure's loss when a ``closure`` is given."""
        loss = run_closure(closure)
        self._check_step()
        for group, index in with_offsets(self.param_groups):
            self._step_group(group, index)
        return loss

    def _step_group(self, group: dict[str, Any], first_index: int) -> None:
        adam = group["variant"] == "adam"
        stochastic = group["stochastic_rounding"]
        q_p, q_g, q_m, q_v, q_s, q_seed, q_noise, q_t, q_e = [], [], [], [], [], [], [], [], []
        r_p, r_g, r_m, r_v, r_t = [], [], [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:  # lazily, from the actual parameter
                state.update(self._new_state(group, p, first_index + i))
            state["step"] += 1
            if not self._is_quantized(group, p):
                r_p.append(p)
                r_g.append(p.grad)
                r_m.append(state["exp_avg"])
                r_v.append(state.get("exp_avg_sq"))
                r_t.append(state["step"])
                continue
            self._match_state(group, p, state)
            # a row-sharded DTensor steps on its local rows, with the noise the whole tensor draws on those rows
            q_p.append(local_part(p))
            q_g.append(local_part(p.grad))
            q_m.append(local_part(state["exp_avg"]))
            q_v.append(local_part(state.get("exp_avg_sq")))
            q_s.append(local_part(state["scale"]))
            q_t.append(state["step"])
            q_e.append(local_part(state.get("error")))
            sharded = is_dtensor(p)
            q_seed.append(self._sr_seed(state) if stochastic and not sharded else None)
            q_noise.append(self._noise(p, state) if stochastic and sharded else None)

        lr, wd = float(group["lr"]), group["weight_decay"]
        quant = dict(fmt=group["weight_format"], scale_mode=group["scale_mode"], block_size=group["block_size"])
        if q_p and adam:
            eco_adam_step(q_p, q_g, q_m, q_v, q_s, step=q_t, lr=lr, betas=group["betas"], eps=group["eps"],
                          weight_decay=wd, seeds=q_seed, noises=q_noise, error_feedback=group["error_feedback"],
                          **quant)
        elif q_p:
            eco_sgdm_step(q_p, q_g, q_m, q_s, lr=lr, beta=group["betas"][0], weight_decay=wd, seeds=q_seed,
                          noises=q_noise, error_feedback=group["error_feedback"],
                          errors=q_e if group["error_feedback"] == "exact" else None, **quant)
        if r_p and adam:
            adamw_step(r_p, r_g, r_m, r_v, step=r_t, lr=lr, betas=group["betas"], eps=group["eps"], weight_decay=wd)
        elif r_p:
            sgdm_step(r_p, r_g, r_m, lr=lr, beta=group["betas"][0], weight_decay=wd)

    @staticmethod
    def _match_state(group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        """Follow a group edited after the first step (scale_mode/block_size/error_feedback)."""
        shape = _scale_shape(p.shape, group["scale_mode"], group["block_size"])
        if tuple(state["scale"].shape) != shape:
            state["scale"] = state["scale"].new_zeros(shape)
        if group["error_feedback"] == "exact" and "error" not in state:
            state["error"] = torch.zeros_like(state["exp_avg"])

    @staticmethod
    def _sr_seed(state: dict[str, Any]) -> int:
        """The Philox seed of the parameter's stochastic rounding at its current step."""
        return mix_seed(state["sr_seed"], state["step"])

    @staticmethod
    def _noise(p: Tensor, state: dict[str, Any]) -> Tensor:
        """The SR noise of the parameter at its current step, as the requantize kernel draws it; for a row-sharded
        DTensor, the local rows' part of the whole tensor's noise."""
        if not is_dtensor(p):
            return sr_noise(ECO._sr_seed(state), p.shape, device=p.device, dtype=_compute_dtype(p))
        local = p.to_local()
        first_row = p.__create_chunk_list__()[0].offsets[0]  # the shard's place in the whole tensor (what DCP saves)
        return sr_noise(ECO._sr_seed(state), local.shape, device=local.device, dtype=_compute_dtype(p),
                        offset=first_row * p.shape[1])

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but the state keeps its saved dtypes (float32 moments and
        scales of a bfloat16 parameter stay float32; torch would cast them to the parameter's dtype)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for saved_id, p in zip(saved_ids, params, strict=False):
            for key, value in saved_state.get(saved_id, {}).items():
                if isinstance(value, Tensor) and key != "step" and value.dtype != self.state[p][key].dtype:
                    self.state[p][key] = value.to(device=p.device)

    # -- inspection -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def quantized_weights(self) -> dict[str, Quantized]:
        """The quantized parameters that have stepped, as :class:`~hfx_optim.quantize.Quantized` codes + scales,
        keyed by parameter name (or ``"param<i>"``). Exact: ``dequantize(q, p.dtype)`` equals the parameter."""
        out: dict[str, Quantized] = {}
        for group, index in with_offsets(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                state = self.state.get(p, {})
                if self._is_quantized(group, p) and "scale" in state:
                    key = names[i] if names else f"param{index + i}"
                    out[key] = quantize(p.detach(), group["weight_format"], scale_mode=group["scale_mode"],
                                        block_size=group["block_size"], scale=state["scale"])
        return out


# --------------------------------------------------------------------------------------------------
# Factory (name-aware: Trainer(optimizer_cls_and_kwargs=...), hfx_optimizer="eco")
# --------------------------------------------------------------------------------------------------


class ECOFactory(ModelOptimizerFactory):
    """Builds :class:`ECO` from a model: the targeted ``nn.Linear`` weights (``target_modules``, default
    "all-linear", which leaves out ``lm_head``) are quantized; embeddings, ``lm_head``, norms and biases run AdamW
    (SGDM for ``variant="sgdm"``); HF's decay/no-decay split is kept.

    ``hfx.optimizer("eco", bits=8)`` returns ``(ECOFactory, {...})`` for ``Trainer(optimizer_cls_and_kwargs=...)``.
    The keyword arguments are spelled out (no ``**kwargs``) so that hfx forwards Trainer's ``learning_rate``,
    ``adam_beta1/2``, ``adam_epsilon`` and ``weight_decay``.

    >>> optimizer = ECOFactory()(model, lr=1e-3, weight_format="int4", scale_mode="row")  # doctest: +SKIP
    """

    optimizer_cls = ECO

    def __call__(
        self,
        model: nn.Module,
        *,
        target_modules: str | Iterable[str] = "all-linear",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        variant: str = "adam",
        weight_format: str | None = None,
        bits: int | None = None,
        scale_mode: str = "block",
        block_size: int = 128,
        stochastic_rounding: bool = True,
        seed: int = 0,
        error_feedback: str = "memory_free",
    ) -> ECO:
        return super().__call__(
            model, target_modules=target_modules, weight_decay=weight_decay, lr=lr, betas=betas, eps=eps,
            variant=variant, weight_format=weight_format, bits=bits, scale_mode=scale_mode, block_size=block_size,
            stochastic_rounding=stochastic_rounding, seed=seed, error_feedback=error_feedback,
        )


# --------------------------------------------------------------------------------------------------
# Memory report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ECOMemoryReport:
    """Bytes of weights + optimizer state: ECO as it runs, ECO with the quantized weights stored at their format's
    width (what a low-bit Linear would hold), and AdamW with fp32 master weights on the same model.

    ``adamw_*`` is the mixed-precision baseline: the weights as the model holds them, plus an fp32 master copy of every
    optimized parameter not already in float32 or wider (an fp32 model *is* its own master), plus fp32 ``exp_avg`` and
    ``exp_avg_sq`` (float64 for float64 parameters) of every optimized parameter. Gradients and activations are the same
    for both and are not counted."""

    params: int  # elements of all model (and optimizer) parameters
    optimized_params: int  # elements the optimizer updates
    quantized_params: int  # elements ECO holds on a quantization grid
    weight_bytes: int  # parameters as held (their dtype)
    state_bytes: int  # ECO's state tensors: moments, scales, exact-mode errors
    packed_weight_bytes: int  # quantized parameters at their format's width (scales are in state), the rest as held
    adamw_weight_bytes: int  # weights as held + fp32 master copies
    adamw_state_bytes: int  # fp32 exp_avg + exp_avg_sq
    projected: bool  # some state did not exist yet (no step taken) and was counted from its would-be shapes

    @property
    def eco_bytes(self) -> int:
        return self.weight_bytes + self.state_bytes

    @property
    def eco_packed_bytes(self) -> int:
        return self.packed_weight_bytes + self.state_bytes

    @property
    def adamw_bytes(self) -> int:
        return self.adamw_weight_bytes + self.adamw_state_bytes

    @property
    def saved_bytes(self) -> int:
        return self.adamw_bytes - self.eco_bytes

    @property
    def ratio(self) -> float:
        """ECO as it runs / AdamW with fp32 master weights."""
        return self.eco_bytes / self.adamw_bytes if self.adamw_bytes else float("nan")

    @property
    def packed_ratio(self) -> float:
        return self.eco_packed_bytes / self.adamw_bytes if self.adamw_bytes else float("nan")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("eco_bytes", "eco_packed_bytes", "adamw_bytes", "saved_bytes", "ratio", "packed_ratio"):
            out[key] = getattr(self, key)
        return out

    def __str__(self) -> str:
        n = max(self.params, 1)
        rows = [
            ("ECO (as run)", self.weight_bytes, self.state_bytes),
            ("ECO (weights packed)", self.packed_weight_bytes, self.state_bytes),
            ("AdamW + fp32 master", self.adamw_weight_bytes, self.adamw_state_bytes),
        ]
        lines = [f"{'':22} {'weights':>12} {'state':>12} {'total':>12} {'B/param':>8} {'vs AdamW':>8}"]
        for label, w, s in rows:
            lines.append(f"{label:22} {w:>12,} {s:>12,} {w + s:>12,} {(w + s) / n:>8.2f} "
                         f"{(w + s) / max(self.adamw_bytes, 1):>8.3f}")
        lines.append(f"{self.params:,} parameters, {self.quantized_params:,} quantized"
                     + (" (state projected: no step taken yet)" if self.projected else ""))
        return "\n".join(lines)


def eco_memory_report(model: nn.Module, optimizer: ECO) -> ECOMemoryReport:
    """Measure the bytes of weights + optimizer state of ``optimizer`` (an :class:`ECO`, possibly wrapped by
    accelerate) on ``model``, against AdamW with fp32 master weights (see :class:`ECOMemoryReport`).

    State is summed over the tensors actually in ``optimizer.state``; parameters that have not stepped yet are
    counted from the shapes their state will have (``projected=True``).

    >>> print(eco_memory_report(model, optimizer))  # doctest: +SKIP
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if not isinstance(optimizer, ECO):
        raise TypeError(f"eco_memory_report needs an hfx_optim.ECO optimizer, got {type(optimizer).__name__}")
    all_params: dict[int, Tensor] = {id(p): p for p in model.parameters()}
    optimized: dict[int, tuple[dict[str, Any], Tensor, int]] = {}
    for group, index in with_offsets(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            optimized[id(p)] = (group, p, index + i)
            all_params.setdefault(id(p), p)

    weight = packed = state_bytes = adamw_extra = adamw_state = quantized = optimized_elems = 0
    projected = False
    for key, p in all_params.items():
        held = p.numel() * p.element_size()
        weight += held
        if key not in optimized:
            packed += held
            continue
        group, p, idx = optimized[key]
        optimized_elems += p.numel()
        state = optimizer.state.get(p)
        if not state or "step" not in state:
            state = optimizer._new_state(group, p, idx, device="meta")
            projected = True
        state_bytes += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
        if ECO._is_quantized(group, p):
            quantized += p.numel()
            packed += quantized_nbytes(tuple(p.shape), group["weight_format"], group["scale_mode"],
                                       group["block_size"])[0]
        else:
            packed += held
        width = max(4, p.element_size())
        adamw_extra += 0 if p.element_size() >= 4 else 4 * p.numel()
        adamw_state += 2 * width * p.numel()
    return ECOMemoryReport(
        params=sum(p.numel() for p in all_params.values()), optimized_params=optimized_elems,
        quantized_params=quantized, weight_bytes=weight, state_bytes=state_bytes, packed_weight_bytes=packed,
        adamw_weight_bytes=weight + adamw_extra, adamw_state_bytes=adamw_state, projected=projected,
    )

