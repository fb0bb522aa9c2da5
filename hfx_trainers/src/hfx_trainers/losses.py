"""Pure loss functions of the hfx trainers: SPIN, SPPO, RSPO, INPO (self-play), RPG, DRPO (RL) and SWEET-RL.

The self-play functions take per-sequence **summed** response log-probs, tensors of shape ``(B,)`` (one entry per
prompt), and return per-example losses of shape ``(B,)`` unless their docstring says otherwise; the RL functions
(:func:`rpg_loss`, :func:`drpo_loss`) take per-token log-probs or per-completion scores and return the scalar loss. Nothing but torch is imported,
so the trainers call these functions and the tests assert the spec's vectors without a model
(``specs/trainers.md`` §2–§5).

Notation: ``π_θ`` the trained policy, ``π_t`` the *opponent* (the policy at the start of self-play iteration t),
``π_ref`` a fixed reference, ``y_w``/``y_l`` the chosen/rejected response, ``Δ_M = log M(y_w) − log M(y_l)``,
``σ`` the logistic sigmoid.

Papers:

* SPIN: Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models", arXiv 2401.01335.
* SPPO: Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675.
* RSPO: Tang et al., "Game-Theoretic Regularized Self-Play Alignment of Large Language Models", arXiv 2503.00030.
* INPO: Zhang et al., "Iterative Nash Policy Optimization", arXiv 2407.00617.
* RPG: Zhang et al., "On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning", arXiv 2505.17508.
* DRPO: Li et al., "DRPO: Efficient Reasoning via Decoupled Reward Policy Optimization", arXiv 2510.04474.
* SWEET-RL: Zhou et al., "SWEET-RL: Training Multi-Turn LLM Agents on Collaborative Reasoning Tasks", arXiv 2503.15478.

Half-precision inputs are computed in float32 (SPPO's targets are of size η/2 = 500 at the official β, far beyond
what bfloat16 resolves next to a log-ratio of order 1); float64 inputs, including float64 probabilities as the
official SPPO code builds them, make the result float64.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RPG_ESTIMATORS",
    "RPG_KL_KINDS",
    "RSPO_REGULARIZER_KINDS",
    "SPIN_LOSS_TYPES",
    "SPPO_LOSS_TYPES",
    "binary_rewards",
    "drpo_loss",
    "drpo_positive_weights",
    "implicit_reward",
    "inpo_loss",
    "resolve_rspo_regularizer",
    "rpg_kl_term",
    "rpg_loss",
    "rpg_terms",
    "rspo_loss",
    "rspo_regularizer",
    "spin_loss",
    "sppo_loss",
    "sweet_critic_loss",
    "sweet_policy_loss",
    "sweet_trajectory_score",
    "sweet_turn_advantage",
]

SPIN_LOSS_TYPES = ("sigmoid", "hinge")
SPPO_LOSS_TYPES = ("sppo", "sppo_single", "sppo_hard")
RSPO_REGULARIZER_KINDS = (
    "none",
    "reverse_kl",
    "reverse_kl_no_entropy",
    "forward_kl_importance",
    "forward_kl_reference",
    "chi_squared",
    "smoothed_chi_squared",
    "entropy",
)
_DEFAULT_CLIP = 10.0
_CLIPPED_KINDS = frozenset({"forward_kl_importance", "chi_squared", "smoothed_chi_squared"})

# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _check_logps(**named: Tensor) -> torch.dtype:
    """Check that the named log-prob tensors are floating 1-D tensors of one shape; return the dtype to compute in."""
    first_name, first_shape = None, None
    dtype = torch.float32
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B,), got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of log-probs, got dtype {value.dtype}")
        if value.ndim != 1:
            raise ValueError(
                f"{name} must have shape (B,): one summed log-prob per sequence; got shape {tuple(value.shape)}"
            )
        if first_shape is None:
            first_name, first_shape = name, value.shape
        elif value.shape != first_shape:
            raise ValueError(
                f"shape mismatch: {first_name} has shape {tuple(first_shape)} but {name} has shape "
                f"{tuple(value.shape)}; every log-prob argument must have the same shape (B,)"
            )
        dtype = torch.promote_types(dtype, value.dtype)
    return dtype


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_real(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _check_choice(name: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(repr(v) for v in valid)}")
    return value


def _as_probability(name: str, value, like: Tensor, loss_type: str) -> Tensor:
    """A per-example probability as a tensor on ``like``'s device, with ``like``'s shape."""
    if value is None:
        raise ValueError(f"loss_type={loss_type!r} needs {name} (a tensor of shape (B,) with values in [0, 1])")
    prob = torch.as_tensor(value, device=like.device)
    if not prob.is_floating_point():
        prob = prob.to(like.dtype)
    if prob.shape != like.shape:
        raise ValueError(
            f"shape mismatch: {name} has shape {tuple(prob.shape)} but the log-probs have shape {tuple(like.shape)}"
        )
    return prob


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def implicit_reward(policy_logps: Tensor, anchor_logps: Tensor, beta: float) -> Tensor:
    """The DPO-style implicit reward ``β·(log π_θ(y) − log π_anchor(y))`` per example, the quantity the trainers log as
    ``rewards/<side>`` (SPIN: anchor = π_t, spec §2.1).

    >>> implicit_reward(torch.tensor([-10.0, -12.0]), torch.tensor([-10.5, -12.5]), beta=0.1)
    tensor([0.0500, 0.0500])
    """
    dtype = _check_logps(policy_logps=policy_logps, anchor_logps=anchor_logps)
    beta = _check_positive("beta", beta)
    return beta * (policy_logps.to(dtype) - anchor_logps.to(dtype))


def _pair_margin(chosen: Tensor, rejected: Tensor, anchor_chosen: Tensor, anchor_rejected: Tensor) -> Tensor:
    """``(log π(y_w) − log A(y_w)) − (log π(y_l) − log A(y_l))``: the log-ratio margin against an anchor A."""
    return (chosen - anchor_chosen) - (rejected - anchor_rejected)


# --------------------------------------------------------------------------------------------------
# SPIN (arXiv 2401.01335)
# --------------------------------------------------------------------------------------------------


def spin_loss(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    opponent_real_logps: Tensor | None,
    opponent_generated_logps: Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    reference_free: bool = False,
) -> Tensor:
    """SPIN's per-example loss (Chen et al., arXiv 2401.01335; spec §2.1).

    With the real (ground-truth SFT) answer ``y``, the opponent's own generation ``y'`` and the opponent π_t::

        z = β·[(log π_θ(y) − log π_t(y)) − (log π_θ(y') − log π_t(y'))]
        "sigmoid" (default):  ℓ = log(1 + e^{−z}) = −log σ(z)
        "hinge":              ℓ = max(0, 1 − z)

    This is DPO with chosen = real, rejected = generated and reference = π_t. β is the paper's λ (official default
    0.1). ``reference_free=True`` drops the π_t terms (an official option); the opponent arguments may then be None.

    >>> spin_loss(torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -9.0]),
    ...           torch.tensor([-10.5, -12.5]), torch.tensor([-10.0, -9.5]))
    tensor([0.6210, 0.6931])
    """
    _check_choice("loss_type", loss_type, SPIN_LOSS_TYPES)
    beta = _check_positive("beta", beta)
    named = {"policy_real_logps": policy_real_logps, "policy_generated_logps": policy_generated_logps}
    if not reference_free or opponent_real_logps is not None or opponent_generated_logps is not None:
        named |= {"opponent_real_logps": opponent_real_logps, "opponent_generated_logps": opponent_generated_logps}
    dtype = _check_logps(**named)
    real, generated = policy_real_logps.to(dtype), policy_generated_logps.to(dtype)
    if reference_free:
        margin = real - generated
    else:
        margin = _pair_margin(real, generated, opponent_real_logps.to(dtype), opponent_generated_logps.to(dtype))
    z = beta * margin
    if loss_type == "sigmoid":
        return F.softplus(-z)  # = −log σ(z), without overflow for large |z|
    return torch.relu(1.0 - z)


# --------------------------------------------------------------------------------------------------
# SPPO (arXiv 2405.00675)
# --------------------------------------------------------------------------------------------------


def _sppo_targets(
    chosen_win_prob, rejected_win_prob, eta: float, loss_type: str, like: Tensor
) -> tuple[Tensor | float, Tensor | float]:
    """The regression targets of the chosen and rejected log-ratios, η·(P − ½) per side."""
    if loss_type == "sppo":
        p_w = _as_probability("chosen_win_prob", chosen_win_prob, like, loss_type)
        p_l = _as_probability("rejected_win_prob", rejected_win_prob, like, loss_type)
        return eta * (p_w - 0.5), eta * (p_l - 0.5)
    if loss_type == "sppo_single":
        # One pairwise probability p = P(y_w ≻ y_l); the loser's target mirrors the winner's (P(y_l ≻ y_w) = 1 − p).
        p = _as_probability("chosen_win_prob", chosen_win_prob, like, loss_type)
        target = eta * (p - 0.5)
        return target, -target
    return eta / 2, -eta / 2  # sppo_hard: hard labels P = 1 for the winner, 0 for the loser


def sppo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    opponent_chosen_logps: Tensor,
    opponent_rejected_logps: Tensor,
    chosen_win_prob: Tensor | Sequence[float] | None = None,
    rejected_win_prob: Tensor | Sequence[float] | None = None,
    beta: float = 0.001,
    loss_type: str = "sppo",
) -> Tensor:
    """SPPO's per-example squared loss on a (winner, loser) pair (Wu et al., arXiv 2405.00675; spec §3.1).

    SPPO regresses each log-ratio against the opponent π_t onto η·(P − ½), η = 1/β (official β = 0.001, η = 1000)::

        a = log π_θ(y_w) − log π_t(y_w),   b = log π_θ(y_l) − log π_t(y_l)
        "sppo" (default):  ½·[(a − η(p_w − ½))² + (b − η(p_l − ½))²]
                           p_w = chosen_win_prob   = P̂(y_w ≻ π_t)  (official column chosen_probs_win)
                           p_l = rejected_win_prob = P̂(y_l ≻ π_t)  (official column chosen_probs_lose)
        "sppo_single":     ½·[(a − η(p − ½))² + (b + η(p − ½))²]
                           p = chosen_win_prob = P(y_w ≻ y_l)        (official column chosen_probs)
        "sppo_hard":       (a − η/2)² + (b + η/2)²                    (TRL's sppo_hard: hard labels, no ½)

    "sppo_hard" follows TRL, so it is twice the official "sppo" with p_w = 1, p_l = 0; pass those probabilities to
    "sppo" for the halved form. Probabilities a variant does not use may be None. Float64 probabilities (as the
    official trainer builds them) give a float64 loss.

    >>> sppo_loss(torch.tensor([-20.0, -35.0]), torch.tensor([-30.0, -28.0]),
    ...           torch.tensor([-21.0, -36.5]), torch.tensor([-29.0, -27.0]),
    ...           torch.tensor([0.62, 0.70]), torch.tensor([0.38, 0.45]), beta=0.01)
    tensor([121.0000, 179.1250])
    """
    _check_choice("loss_type", loss_type, SPPO_LOSS_TYPES)
    eta = 1.0 / _check_positive("beta", beta)
    dtype = _check_logps(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        opponent_chosen_logps=opponent_chosen_logps,
        opponent_rejected_logps=opponent_rejected_logps,
    )
    chosen_logratio = policy_chosen_logps.to(dtype) - opponent_chosen_logps.to(dtype)
    rejected_logratio = policy_rejected_logps.to(dtype) - opponent_rejected_logps.to(dtype)
    chosen_target, rejected_target = _sppo_targets(
        chosen_win_prob, rejected_win_prob, eta, loss_type, like=chosen_logratio
    )
    squared_error = (chosen_logratio - chosen_target) ** 2 + (rejected_logratio - rejected_target) ** 2
    return squared_error if loss_type == "sppo_hard" else 0.5 * squared_error


# --------------------------------------------------------------------------------------------------
# RSPO (arXiv 2503.00030)
# --------------------------------------------------------------------------------------------------

# The official trainer's loss_type strings, for parity (spec §4.1): name -> (terms with coefficients, clip).
_RSPO_FIXED_ALIASES: dict[str, tuple[dict[str, float], float]] = {
    "sppo": ({"none": 1.0}, _DEFAULT_CLIP),
    "sppo_reversekl": ({"reverse_kl": 1.0}, _DEFAULT_CLIP),
    "sppo_reverseklnoent": ({"reverse_kl_no_entropy": 1.0}, _DEFAULT_CLIP),
    "sppo_forward": ({"forward_kl_reference": 1.0}, _DEFAULT_CLIP),
    "sppo_forwardreverse": ({"forward_kl_importance": 1.0, "reverse_kl": 1.0}, _DEFAULT_CLIP),
    "sppo_chisq10": ({"chi_squared": 1.0}, 10.0),
    "sppo_chisqsm1": ({"smoothed_chi_squared": 1.0}, 10.0),
    "sppo_entropy": ({"entropy": 1.0}, _DEFAULT_CLIP),
}
_NUMBER = r"(\d+(?:\.\d+)?)"
_RSPO_PATTERN_ALIASES = (
    # sppo_forwardimportance<R>: importance-weighted forward KL with the log-weight clipped at R
    (re.compile(rf"sppo_forwardimportance{_NUMBER}"), lambda r: ({"forward_kl_importance": 1.0}, float(r))),
    # sppo_forward1R<R>reverse<c>: forward (clip R) + c·reverse
    (
        re.compile(rf"sppo_forward1R{_NUMBER}reverse{_NUMBER}"),
        lambda r, c: ({"forward_kl_importance": 1.0, "reverse_kl": float(c)}, float(r)),
    ),
    # sppo_forward1reverse<c>: forward (clip 10) + c·reverse
    (
        re.compile(rf"sppo_forward1reverse{_NUMBER}"),
        lambda c: ({"forward_kl_importance": 1.0, "reverse_kl": float(c)}, 10.0),
    ),
)
_RSPO_ALIAS_FORMS = (
    *_RSPO_FIXED_ALIASES,
    "sppo_forwardimportance<R>",
    "sppo_forward1reverse<c>",
    "sppo_forward1R<R>reverse<c>",
)


def _kind_error(kind: str) -> ValueError:
    hint = ""
    if kind.startswith("sppo_forward_importance"):
        # One official launcher passes this spelling, which the official trainer itself rejects (spec §4.4).
        hint = (
            " (the official spelling has no underscore: 'sppo_forwardimportance<R>', e.g. 'sppo_forwardimportance10')"
        )
    return ValueError(
        f"unknown RSPO regularizer kind {kind!r}{hint}; valid: {', '.join(map(repr, RSPO_REGULARIZER_KINDS))}, "
        f"a mapping of those kinds to coefficients, or an official loss_type alias: "
        f"{', '.join(map(repr, _RSPO_ALIAS_FORMS))}"
    )


def resolve_rspo_regularizer(kind: str | Mapping[str, float], clip: float = _DEFAULT_CLIP) -> tuple[dict, float]:
    """Turn a regularizer ``kind`` into ``({term: coefficient}, clip)``.

    ``kind`` is one of :data:`RSPO_REGULARIZER_KINDS`, a mapping of those kinds to coefficients (a weighted
    combination, e.g. ``{"forward_kl_importance": 1.0, "reverse_kl": 5.0}``), or an official loss_type string. An
    official string that encodes a clip (``sppo_forwardimportance7``, ``sppo_forward1R5reverse5``, ``sppo_chisq10``)
    sets ``clip`` itself; a different explicit ``clip`` is an error rather than silently losing one of the two.

    >>> resolve_rspo_regularizer("sppo_forward1R5reverse50")
    ({'forward_kl_importance': 1.0, 'reverse_kl': 50.0}, 5.0)
    """
    clip = _check_positive("clip", clip)
    if isinstance(kind, Mapping):
        if not kind:
            raise ValueError("the RSPO regularizer mapping is empty; give at least one kind with its coefficient")
        terms = {}
        for name, coef in kind.items():
            if name not in RSPO_REGULARIZER_KINDS:
                raise ValueError(
                    f"unknown RSPO regularizer kind {name!r} in the mapping; valid keys: "
                    f"{', '.join(map(repr, RSPO_REGULARIZER_KINDS))}"
                )
            terms[name] = _check_real(f"the coefficient of {name!r}", coef)
        return terms, clip
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string or a mapping of kinds to coefficients, got {type(kind).__name__}")
    if kind in RSPO_REGULARIZER_KINDS:
        return {kind: 1.0}, clip
    if kind in _RSPO_FIXED_ALIASES:
        terms, alias_clip = _RSPO_FIXED_ALIASES[kind]
        terms = dict(terms)
    else:
        for pattern, build in _RSPO_PATTERN_ALIASES:
            match = pattern.fullmatch(kind)
            if match:
                terms, alias_clip = build(*match.groups())
                break
        else:
            raise _kind_error(kind)
    if _CLIPPED_KINDS.isdisjoint(terms):
        return terms, clip  # the clip plays no part
    if clip not in (_DEFAULT_CLIP, alias_clip):
        raise ValueError(
            f"kind {kind!r} fixes clip={alias_clip:g} but clip={clip:g} was given; use a canonical kind or a mapping "
            f"of kinds to coefficients to choose the clip freely"
        )
    return terms, alias_clip


class _RegularizerInputs(NamedTuple):
    """What the regularizer terms read: log-probs of the pair under π_θ and π_ref, SFT responses, the clip."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    reference_response: Tensor | None
    clip: float

    def sides(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        return (self.policy_chosen, self.ref_chosen), (self.policy_rejected, self.ref_rejected)


def _reverse_kl(x: _RegularizerInputs) -> Tensor:
    # Σ_s mean(d²): its gradient is that of 2·KL(π_θ‖π_ref) when the samples follow π_θ (no ½, as official)
    return sum(((policy - ref) ** 2).mean() for policy, ref in x.sides())


def _reverse_kl_no_entropy(x: _RegularizerInputs) -> Tensor:
    # −Σ_s mean(log π_θ·log π_ref): score-function gradient of the cross-entropy part of KL(π_θ‖π_ref) alone
    return -sum((policy * ref).mean() for policy, ref in x.sides())


def _forward_kl_importance(x: _RegularizerInputs) -> Tensor:
    # Σ_s mean(min(π_ref/π_θ, e^clip)): importance weights turn π_θ-samples into a gradient of KL(π_ref‖π_θ);
    # the clip bounds the weight where π_θ has left π_ref's support
    return sum(torch.exp(torch.clamp(ref - policy, max=x.clip)).mean() for policy, ref in x.sides())


def _forward_kl_reference(x: _RegularizerInputs) -> Tensor:
    # Forward KL by maximum likelihood on responses drawn from π_ref (the SFT data): −E_ref[log π_θ]
    if x.reference_response is None:
        raise ValueError(
            "kind 'forward_kl_reference' needs reference_response_logps: π_θ's log-probs of the SFT reference "
            "responses, shape (B,)"
        )
    return -x.reference_response.mean()


def _chi_squared(x: _RegularizerInputs) -> Tensor:
    # Σ_s mean(π_θ/π_ref), the ratio clipped at e^clip so that one runaway sample cannot dominate the batch
    return sum(torch.exp(torch.clamp(policy - ref, max=x.clip)).mean() for policy, ref in x.sides())


def _smoothed_chi_squared(x: _RegularizerInputs) -> Tensor:
    # Σ_s mean(u/(1+u)), u = clipped π_θ/π_ref; σ(log u) is the same number without forming u
    return sum(torch.sigmoid(torch.clamp(policy - ref, max=x.clip)).mean() for policy, ref in x.sides())


def _entropy(x: _RegularizerInputs) -> Tensor:
    # Σ_s mean((log π_θ)²): score-function gradient of the entropy part of KL(π_θ‖π_ref) (scaled like reverse_kl)
    return sum((policy**2).mean() for policy, _ in x.sides())


def _no_regularizer(x: _RegularizerInputs) -> Tensor:
    return x.policy_chosen.new_zeros(())


_RSPO_TERMS = {
    "none": _no_regularizer,
    "reverse_kl": _reverse_kl,
    "reverse_kl_no_entropy": _reverse_kl_no_entropy,
    "forward_kl_importance": _forward_kl_importance,
    "forward_kl_reference": _forward_kl_reference,
    "chi_squared": _chi_squared,
    "smoothed_chi_squared": _smoothed_chi_squared,
    "entropy": _entropy,
}


def rspo_regularizer(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    kind: str | Mapping[str, float] = "reverse_kl",
    clip: float = _DEFAULT_CLIP,
    *,
    reference_response_logps: Tensor | None = None,
) -> Tensor:
    """RSPO's regularizer G(θ), a **batch scalar** (Tang et al., arXiv 2503.00030; spec §4.1).

    With ``d = log π_θ(y) − log π_ref(y)`` on the winner (w) and the loser (l), every mean over the batch and each
    term summed over the two sides (``Σ_s`` = w + l)::

        "none":                   0
        "reverse_kl" (default):   Σ_s mean(d_s²)                       ∇ of 2·KL(π_θ‖π_ref)
        "reverse_kl_no_entropy":  −Σ_s mean(log π_θ(y_s)·log π_ref(y_s))
        "forward_kl_importance":  Σ_s mean(exp(min(−d_s, clip)))       E[min(π_ref/π_θ, e^clip)], KL(π_ref‖π_θ)
        "forward_kl_reference":   −mean(reference_response_logps)      MLE on SFT responses (one term, not per side)
        "chi_squared":            Σ_s mean(exp(min(d_s, clip)))        E[π_θ/π_ref]
        "smoothed_chi_squared":   Σ_s mean(u_s/(1 + u_s)),  u_s = exp(min(d_s, clip))
        "entropy":                Σ_s mean(log π_θ(y_s)²)

    ``kind`` may also be a mapping ``{kind: coefficient}`` for a weighted combination (each term with its own
    coefficient; ``clip`` is shared), or an official loss_type string (``sppo_reversekl``,
    ``sppo_forwardimportance7``, ``sppo_forward1reverse5``, ...; see :func:`resolve_rspo_regularizer`).
    ``reference_response_logps`` is π_θ's log-prob of an SFT reference response per prompt, needed only by
    "forward_kl_reference" (its sum-vs-mean convention is the caller's; see the spec's §4.4).

    >>> rspo_regularizer(torch.tensor([-20.0, -35.0]), torch.tensor([-30.0, -28.0]),
    ...                  torch.tensor([-21.5, -34.0]), torch.tensor([-29.0, -30.0]))
    tensor(4.1250)
    """
    terms, clip = resolve_rspo_regularizer(kind, clip)
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    if reference_response_logps is not None:
        named["reference_response_logps"] = reference_response_logps
    dtype = _check_logps(**named)
    inputs = _RegularizerInputs(
        policy_chosen_logps.to(dtype),
        policy_rejected_logps.to(dtype),
        ref_chosen_logps.to(dtype),
        ref_rejected_logps.to(dtype),
        None if reference_response_logps is None else reference_response_logps.to(dtype),
        clip,
    )
    return sum(coef * _RSPO_TERMS[name](inputs) for name, coef in terms.items())


def rspo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    opponent_chosen_logps: Tensor,
    opponent_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_win_prob: Tensor | Sequence[float] | None = None,
    rejected_win_prob: Tensor | Sequence[float] | None = None,
    beta: float = 0.001,
    reg_coef: float = 0.1,
    kind: str | Mapping[str, float] = "reverse_kl",
    clip: float = _DEFAULT_CLIP,
    loss_type: str = "sppo",
    *,
    reference_response_logps: Tensor | None = None,
) -> Tensor:
    """RSPO's total loss, a **batch scalar**: ``mean_batch(L_SPPO(θ; π_t)) + λ·G(θ; π_ref)`` (spec §4.1).

    The SPPO part is :func:`sppo_loss` against the opponent π_t (``loss_type``, ``beta`` = 1/η, the win
    probabilities); G is :func:`rspo_regularizer` against the fixed reference π_ref (``kind``, ``clip``); λ =
    ``reg_coef`` (default 0.1, the official pipeline's REG_COEF). Without a reference model the official code uses
    π_ref = π_t, so ``ref_*_logps=None`` falls back to the opponent's log-probs.

    >>> rspo_loss(torch.tensor([-20.0, -35.0]), torch.tensor([-30.0, -28.0]),
    ...           torch.tensor([-21.0, -36.5]), torch.tensor([-29.0, -27.0]),
    ...           torch.tensor([-21.5, -34.0]), torch.tensor([-29.0, -30.0]),
    ...           torch.tensor([0.62, 0.70]), torch.tensor([0.38, 0.45]), beta=0.01, reg_coef=0.5)
    tensor(152.1250)
    """
    if reg_coef is None or _check_real("reg_coef", reg_coef) < 0:
        raise ValueError(f"reg_coef (λ) must be >= 0, got {reg_coef!r}")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (π_ref = π_t)")
    if ref_chosen_logps is None:
        ref_chosen_logps, ref_rejected_logps = opponent_chosen_logps, opponent_rejected_logps
    self_play = sppo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        opponent_chosen_logps,
        opponent_rejected_logps,
        chosen_win_prob,
        rejected_win_prob,
        beta=beta,
        loss_type=loss_type,
    )
    regularizer = rspo_regularizer(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        kind=kind,
        clip=clip,
        reference_response_logps=reference_response_logps,
    )
    return self_play.mean() + float(reg_coef) * regularizer


# --------------------------------------------------------------------------------------------------
# INPO (arXiv 2407.00617)
# --------------------------------------------------------------------------------------------------


def inpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    opponent_chosen_logps: Tensor,
    opponent_rejected_logps: Tensor,
    eta: float = 0.005,
    tau: float | None = None,
) -> Tensor:
    """INPO's per-example squared loss (Zhang et al., arXiv 2407.00617; spec §5.1).

    Online mirror descent toward π_{t+1} ∝ π_ref^{τ/η}·π_t^{1−τ/η}·exp(P(y ≻ π_t)/η), fitted on labelled pairs::

        h = Δ_θ − (τ/η)·Δ_ref − (1 − τ/η)·Δ_t
        ℓ = (h − 1/(2η))²

    ``eta`` = η (the run scripts' 0.005), ``tau`` = τ, the KL strength toward π_ref, with 0 ≤ τ ≤ η; it defaults to
    η/3 (the run scripts' ``ratio`` = τ/η = 1/3). τ = η is online IPO against π_ref (π_t drops out); τ = 0 is
    pure no-regret learning against π_t.

    >>> inpo_loss(torch.tensor([-20.0, -35.0]), torch.tensor([-30.0, -28.0]),
    ...           torch.tensor([-21.5, -34.0]), torch.tensor([-29.0, -30.0]),
    ...           torch.tensor([-21.0, -36.5]), torch.tensor([-29.0, -27.0]), eta=0.1, tau=0.05)
    tensor([ 7.5625, 27.5625])
    """
    eta = _check_positive("eta", eta)
    tau = eta / 3 if tau is None else _check_real("tau", tau)
    if tau < 0:
        raise ValueError(f"tau must be >= 0 (the KL strength toward π_ref), got {tau!r}; tau=0 means no pull to π_ref")
    if tau > eta:
        raise ValueError(
            f"tau ({tau:g}) must not exceed eta ({eta:g}): τ/η is π_ref's exponent in the INPO update "
            f"π_ref^(τ/η)·π_t^(1−τ/η) and must lie in [0, 1]; set tau <= eta (tau=eta is online IPO against π_ref, "
            f"the default tau=None is eta/3) or raise eta"
        )
    dtype = _check_logps(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        opponent_chosen_logps=opponent_chosen_logps,
        opponent_rejected_logps=opponent_rejected_logps,
    )
    ratio = tau / eta
    policy_delta = policy_chosen_logps.to(dtype) - policy_rejected_logps.to(dtype)
    ref_delta = ref_chosen_logps.to(dtype) - ref_rejected_logps.to(dtype)
    opponent_delta = opponent_chosen_logps.to(dtype) - opponent_rejected_logps.to(dtype)
    h = policy_delta - ratio * ref_delta - (1.0 - ratio) * opponent_delta
    return (h - 1.0 / (2.0 * eta)) ** 2


# --------------------------------------------------------------------------------------------------
# RPG (arXiv 2505.17508)
# --------------------------------------------------------------------------------------------------

RPG_KL_KINDS = ("fkl", "rkl", "ufkl", "urkl")
RPG_ESTIMATORS = ("differentiable", "reinforce")
RPG_LEVELS = ("token", "sequence")
_LOG_RATIO_GUARD = 20.0  # |log w| cap before exp: an overflow guard only (e^20 ≈ 5e8 is far outside any clip range)


def _check_token_tensors(mask: Tensor, **named: Tensor) -> torch.dtype:
    """Check that the named per-token tensors share ``mask``'s shape (B, T); return the float dtype to compute in."""
    dtype = torch.float32
    for name, value in named.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor of shape (B, T)")
        if value.shape != mask.shape:
            raise ValueError(
                f"shape mismatch: {name} has shape {tuple(value.shape)} but mask has shape {tuple(mask.shape)}; "
                "pass per-token log-probs of the completions, shape (B, T), with their (B, T) mask"
            )
        dtype = torch.promote_types(dtype, value.dtype)
    return dtype


def _rpg_log_ratios(logps: Tensor, ref_logps: Tensor, old_logps: Tensor | None) -> tuple[Tensor, Tensor]:
    """(log w, log ρ) with w = π_θ/π_old and ρ = π_ref/π_old; ρ ≡ 1 when the reference is π_old itself."""
    old = ref_logps if old_logps is None else old_logps
    log_w = (logps - old).clamp(-_LOG_RATIO_GUARD, _LOG_RATIO_GUARD)
    log_rho = (ref_logps - old).clamp(-_LOG_RATIO_GUARD, _LOG_RATIO_GUARD)
    return log_w, log_rho


def _rpg_kl_value(log_w: Tensor, log_rho: Tensor, kind: str) -> Tensor:
    # E_{π_old}[term] is the divergence D (table in spec §6.1, generalised to a reference π_ref ≠ π_old by ρ).
    w, rho = log_w.exp(), log_rho.exp()
    if kind == "fkl":  # KL(π_ref‖π_θ)
        return rho * (log_rho - log_w)
    if kind == "rkl":  # KL(π_θ‖π_ref)
        return w * (log_w - log_rho)
    if kind == "ufkl":  # UKL(π_ref‖π_θ): KL plus the mass correction Σπ_θ − Σπ_ref
        return rho * (log_rho - log_w) + w - rho
    return w * (log_w - log_rho) - w + rho  # urkl: UKL(π_θ‖π_ref)


def _rpg_kl_slope(log_w: Tensor, log_rho: Tensor, kind: str) -> Tensor:
    # d term / d log π_θ: the per-sample weight of ∇log π_θ in ∇D (REINFORCE form of the same gradient).
    w, rho = log_w.exp(), log_rho.exp()
    if kind == "fkl":
        return -rho
    if kind == "rkl":
        return w * (log_w - log_rho + 1.0)
    if kind == "ufkl":
        return w - rho
    return w * (log_w - log_rho)  # urkl


def rpg_kl_term(logps: Tensor, ref_logps: Tensor, kind: str = "ufkl", old_logps: Tensor | None = None) -> Tensor:
    """RPG's per-sample KL surrogate (Zhang et al., arXiv 2505.17508, Table 1; spec §6.1), elementwise.

    Samples come from π_old; ``w = π_θ/π_old``. With the paper's iterative reference (``old_logps=None``: the
    reference *is* π_old, ``ref_logps`` holds π_old's log-probs) the terms are::

        fkl  −log w            (KL(π_old‖π_θ))         rkl   w·log w          (KL(π_θ‖π_old))
        ufkl w − log w − 1     (unnormalised forward)  urkl  w·(log w − 1) + 1 (unnormalised reverse)

    With a fixed reference π_ref ≠ π_old pass ``old_logps`` too; then ``ρ = π_ref/π_old`` enters as the importance
    weight of the reference side (fkl ``ρ·log(ρ/w)``, rkl ``w·log(w/ρ)``, ufkl ``ρ·log(ρ/w) + w − ρ``,
    urkl ``w·log(w/ρ) − w + ρ``). Each term's mean under π_old equals the divergence, and its gradient is the
    divergence's gradient. Works on any shape: per token (B, T) or per sequence (B,) summed log-probs.

    >>> round(rpg_kl_term(torch.tensor([-1.0]), torch.tensor([-1.2]), "ufkl").item(), 6)  # w = e^0.2
    0.021403
    """
    _check_choice("kind", kind, RPG_KL_KINDS)
    log_w, log_rho = _rpg_log_ratios(logps, ref_logps, old_logps)
    return _rpg_kl_value(log_w, log_rho, kind)


class RPGTerms(NamedTuple):
    """Per-token (or per-sequence) pieces of :func:`rpg_loss`, before the masked mean."""

    loss: Tensor  # the surrogate whose gradient is −∇J
    kl: Tensor  # the KL term's value (logged)
    ratio: Tensor  # w = π_θ/π_old (detached)
    clipped: Tensor  # bool: no gradient flows from the policy-gradient part (clip region)


def rpg_terms(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    *,
    kind: str = "ufkl",
    estimator: str = "differentiable",
    beta: float = 1e-4,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    clip_c: float = 3.0,
    ref_logps: Tensor | None = None,
) -> RPGTerms:
    """Elementwise RPG surrogate (see :func:`rpg_loss`); ``advantages`` broadcasts against ``logps``."""
    _check_choice("kind", kind, RPG_KL_KINDS)
    _check_choice("estimator", estimator, RPG_ESTIMATORS)
    beta = _check_real("beta", beta)
    if not (0 <= epsilon_low < 1 and epsilon_high >= 0):
        raise ValueError(f"need 0 <= epsilon_low < 1 and epsilon_high >= 0; got {epsilon_low!r}, {epsilon_high!r}")
    if not clip_c > 1:
        raise ValueError(f"clip_c (the dual-clip bound for negative advantages) must be > 1, got {clip_c!r}")
    low, high = 1.0 - epsilon_low, 1.0 + epsilon_high
    log_w, log_rho = _rpg_log_ratios(logps, old_logps if ref_logps is None else ref_logps,
                                     None if ref_logps is None else old_logps)
    w = log_w.exp()
    kl = _rpg_kl_value(log_w, log_rho, kind)
    if estimator == "differentiable":
        # Dual-clip PPO on the advantage, plus β times the KL term (spec §6.1, the official "fully differentiable"
        # scripts): for Â < 0 the loss is also capped at −c·Â.
        pg = torch.maximum(-w * advantages, -w.clamp(low, high) * advantages)
        pg = torch.where(advantages < 0, torch.minimum(pg, -clip_c * advantages), pg)
        clipped = torch.where(advantages < 0, (w <= low) | (w >= clip_c), w >= high)
        return RPGTerms(pg + beta * kl, kl.detach(), w.detach(), clipped)
    # REINFORCE with RPG-Style Clip (the paper's Algorithm 2): loss −SG(w·A + C)·log π_θ where C = −β·∂term/∂log π_θ
    # is taken at the clipped ratio w̄ and detached; A' = A + C/w picks the clip region like PPO's advantage sign.
    logps_sg, w_sg = logps.detach(), w.detach()
    c = (-beta * _rpg_kl_slope(log_w.clamp(math.log(low), math.log(high)), log_rho, kind)).detach()
    a_prime = advantages + c / w_sg
    live = torch.where(a_prime >= 0, w_sg < high, (w_sg > low) & (w_sg < clip_c))
    # Outside the live region the loss is a constant (App. F's values, so loss values match the spec's vectors).
    constant = torch.where(
        a_prime >= 0,
        -(advantages * high - c) * logps_sg,
        torch.where(w_sg <= low, -(advantages * low - c) * logps_sg, -(advantages * clip_c + c) * logps_sg),
    )
    loss = torch.where(live, -(w_sg * advantages + c) * logps, constant)
    return RPGTerms(loss, kl.detach(), w_sg, ~live)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def rpg_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    kind: str = "ufkl",
    estimator: str = "differentiable",
    beta: float = 1e-4,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    clip_c: float = 3.0,
    ref_logps: Tensor | None = None,
    level: str = "token",
) -> Tensor:
    """RPG's policy loss (Zhang et al., "On the Design of KL-Regularized Policy Gradient Algorithms for LLM
    Reasoning", arXiv 2505.17508; spec §6), the scalar mean over completion tokens.

    ``logps``/``old_logps`` (and ``ref_logps``) are per-token log-probs (B, T) of the sampled completions under
    π_θ, the rollout policy π_old (and a fixed reference); ``advantages`` is (B,) or (B, T) (RPG: reward minus the
    group mean); ``mask`` (B, T) marks completion tokens. ``w = π_θ/π_old``.

    * ``estimator="differentiable"``: dual-clip PPO on Â plus ``β·`` :func:`rpg_kl_term` — for Â ≥ 0
      ``max(−wÂ, −clip(w, 1−ε_low, 1+ε_high)Â)``, for Â < 0 that value capped at ``−c·Â``.
    * ``estimator="reinforce"``: REINFORCE with RPG-Style Clip (Algorithm 2): gradient ``−SG(w·Â + C)·∇log π_θ``
      with the KL weight ``C`` computed at the clipped ratio; no gradient when A' = Â + C/w ≥ 0 and
      w ≥ 1+ε_high, or A' < 0 and w ≤ 1−ε_low or w ≥ c.

    The KL reference is π_old (``ref_logps=None``, the paper's iterative reference) or a fixed π_ref. Both
    estimators have the same gradient where nothing is clipped. ``level="token"`` uses per-token ratios (the official
    code); ``"sequence"`` uses whole-response ratios w = Π_t w_t, the paper's derivation, and averages over sequences.

    >>> lp, old = torch.tensor([[-1.0, -2.0, -0.5, -1.5]]), torch.tensor([[-1.2, -1.8, -0.5, -1.0]])
    >>> adv, mask = torch.tensor([[1.0, 1.0, -1.0, -1.0]]), torch.ones(1, 4)
    >>> round(rpg_loss(lp, old, adv, mask, kind="fkl", beta=0.1, clip_c=10.0).item(), 6)  # spec §6.6
    -0.047533
    """
    _check_choice("level", level, RPG_LEVELS)
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        raise ValueError("mask must be a (B, T) tensor marking the completion tokens")
    anchors = {"old_logps": old_logps} if ref_logps is None else {"old_logps": old_logps, "ref_logps": ref_logps}
    dtype = _check_token_tensors(mask, logps=logps, **anchors)
    mask = mask.to(dtype)
    advantages = torch.as_tensor(advantages, device=logps.device).to(dtype)
    if advantages.shape not in (mask.shape[:1], mask.shape):
        raise ValueError(f"advantages must have shape (B,) or (B, T) = {tuple(mask.shape)}; got "
                         f"{tuple(advantages.shape)}")
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(1)
    options = dict(kind=kind, estimator=estimator, beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                   clip_c=clip_c)

    def cast(x):
        return None if x is None else x.to(dtype)

    if level == "token":
        terms = rpg_terms(logps.to(dtype), old_logps.to(dtype), advantages, ref_logps=cast(ref_logps), **options)
        return _masked_mean(terms.loss, mask)
    if advantages.shape[1] != 1:
        raise ValueError("level='sequence' needs one advantage per sequence, shape (B,)")

    def summed(x):
        return None if x is None else (x.to(dtype) * mask).sum(dim=1)

    terms = rpg_terms(summed(logps), summed(old_logps), advantages[:, 0], ref_logps=summed(ref_logps), **options)
    return terms.loss.mean()


# --------------------------------------------------------------------------------------------------
# DRPO (arXiv 2510.04474)
# --------------------------------------------------------------------------------------------------


def binary_rewards(rewards: Tensor, threshold: float | None = None) -> Tensor:
    """Rewards as booleans: exactly 0/1 values, or ``reward >= threshold`` when a threshold is given."""
    rewards = torch.as_tensor(rewards)
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; a reward function must return a finite number per completion")
    if threshold is not None:
        return rewards >= threshold
    if not ((rewards == 0) | (rewards == 1)).all():
        bad = rewards[(rewards != 0) & (rewards != 1)].unique()[:5].tolist()
        raise ValueError(
            f"DRPO needs binary rewards (1 = correct, 0 = wrong), got values such as {bad}; pass reward_threshold "
            "(a reward >= threshold counts as correct) to binarise them"
        )
    return rewards == 1


def drpo_positive_weights(lengths: Tensor, positive: Tensor, *, lam: float, max_length: float) -> Tensor:
    """Self-normalised weights w̃_i ∝ exp((1 − |y_i|/L_max)/λ) over one group's positives (0 elsewhere):
    the KL-regularised length-reward distribution P* ∝ π_old⁺·exp(r_len/λ), estimated on π_old's samples."""
    logits = -lengths.to(torch.float64) / (lam * max_length)
    logits = logits.masked_fill(~positive, -math.inf)
    return torch.softmax(logits, dim=0) if positive.any() else torch.zeros_like(logits)


def drpo_loss(
    scores: Tensor,
    rewards: Tensor,
    lengths: Tensor,
    group_ids: Tensor,
    *,
    tau: float = 10.0,
    lam: float = 0.1,
    max_length: float,
    kl: Tensor | None = None,
    delta: float = 1e-4,
    beta: float = 1e3,
    reward_threshold: float | None = None,
) -> Tensor:
    """DRPO's loss (Li et al., "DRPO: Efficient Reasoning via Decoupled Reward Policy Optimization", arXiv 2510.04474;
    spec §7), a scalar whose *value* is the objective (the official code logs a placeholder whose gradient is right
    but value is not).

    ``scores`` (N,) are s_θ(y) = mean token log-prob of each completion under π_θ; ``rewards`` (N,) binary;
    ``lengths`` (N,) completion lengths |y|; ``group_ids`` (N,) the prompt each completion answers. Per group q
    with positives P and negatives N::

        J_q = Σ_{i∈P} w̃_i·s_i − τ·log( (1/|N|)·Σ_{j∈N} exp(s_j/τ) ),   w̃ = drpo_positive_weights(|y|, λ, L_max)
        loss = −(1/#groups)·Σ_q J_q  +  SG(max(β·(KL − δ), 0))·KL

    Groups without a positive or without a negative contribute 0 but count in #groups. ``kl`` is a scalar
    KL(π_old‖π_θ) estimate (masked token mean of log π_old − log π_θ), or None for no trust-region penalty.
    λ = inf gives uniform positive weights (DisCO-logL).

    >>> s = torch.tensor([-0.30, -0.45, -0.60, -0.20, -0.5, -0.7, -0.4, -0.9])
    >>> r = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0])
    >>> lengths = torch.tensor([1000, 3000, 2000, 4000, 100, 200, 300, 400])
    >>> round(drpo_loss(s, r, lengths, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), max_length=8192).item(), 6)
    -0.042995
    """
    tau = _check_positive("tau", tau)
    if not (isinstance(lam, numbers.Real) and lam > 0):
        raise ValueError(f"lam (the length-reward KL strength λ) must be > 0 (inf = no length shaping), got {lam!r}")
    max_length = _check_positive("max_length", max_length)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape (N,): one mean log-prob per completion; got {tuple(scores.shape)}")
    for name, value in (("rewards", rewards), ("lengths", lengths), ("group_ids", group_ids)):
        if torch.as_tensor(value).shape != scores.shape:
            raise ValueError(f"shape mismatch: {name} has shape {tuple(torch.as_tensor(value).shape)}, scores "
                             f"{tuple(scores.shape)}")
    positive = binary_rewards(rewards, reward_threshold).to(scores.device)
    lengths = torch.as_tensor(lengths, device=scores.device)
    group_ids = torch.as_tensor(group_ids, device=scores.device)
    groups = group_ids.unique()
    objective = scores.new_zeros(())
    for group in groups:
        members = group_ids == group
        pos, neg = positive & members, ~positive & members
        if not pos.any() or not neg.any():
            continue
        weights = drpo_positive_weights(lengths[members], pos[members], lam=lam, max_length=max_length)
        positive_term = (weights.to(scores.dtype) * scores[members]).sum()
        negative_term = tau * (torch.logsumexp(scores[neg] / tau, dim=0) - math.log(int(neg.sum())))
        objective = objective + positive_term - negative_term
    loss = -objective / len(groups)
    if kl is not None:
        coef = (beta * (kl.detach() - delta)).clamp(min=0)
        loss = loss + coef * kl
    return loss


# --------------------------------------------------------------------------------------------------
# SWEET-RL (arXiv 2503.15478)
# --------------------------------------------------------------------------------------------------

SWEET_NORMALIZATIONS = ("turn_mean_sum", "trajectory_mean")


def _turn_table(token_logps: Tensor, ref_token_logps: Tensor, turn_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per (trajectory, turn): the summed log-ratio log π_ψ − log π_ref over the turn's tokens and the token count.

    ``turn_ids`` (B, T) holds the agent turn (0, 1, ...) each token belongs to, and a negative value for tokens
    that are not the agent's (prompt, user turns, padding)."""
    if turn_ids.shape != token_logps.shape or ref_token_logps.shape != token_logps.shape:
        raise ValueError(
            f"shape mismatch: token_logps {tuple(token_logps.shape)}, ref_token_logps "
            f"{tuple(ref_token_logps.shape)} and turn_ids {tuple(turn_ids.shape)} must all be (B, T)"
        )
    turn_ids = turn_ids.to(token_logps.device).long()
    agent = turn_ids >= 0
    n_turns = int(turn_ids.max().item()) + 1 if agent.any() else 1
    index = turn_ids.clamp(min=0)
    ratio = (token_logps - ref_token_logps).masked_fill(~agent, 0.0)
    sums = ratio.new_zeros(token_logps.size(0), n_turns).scatter_add(1, index, ratio)
    counts = ratio.new_zeros(token_logps.size(0), n_turns).scatter_add(1, index, agent.to(ratio.dtype))
    return sums, counts


def sweet_turn_advantage(token_logps: Tensor, ref_token_logps: Tensor, turn_ids: Tensor, beta: float = 0.1) -> Tensor:
    """SWEET-RL's per-turn advantage (Zhou et al., arXiv 2503.15478, §4; spec §8.1), shape (B, n_turns)::

        A(o_t, a_t, c) = β · mean_{tokens of a_t} [ log π_ψ(a_t^l | ·, c) − log π_ref(a_t^l | ·, c) ]

    ``token_logps``/``ref_token_logps`` (B, T) are the critic's and its frozen copy's token log-probs with the
    training-time information c in context; ``turn_ids`` (B, T) numbers the agent's turns (negative elsewhere).
    A turn a trajectory does not have gets 0.

    >>> lp = torch.tensor([[-1.0, -0.5, -0.2, -0.8, -0.4]]); ref = torch.tensor([[-1.2, -0.6, -0.3, -0.9, -0.5]])
    >>> sweet_turn_advantage(lp, ref, torch.tensor([[0, 0, 0, 1, 1]]), beta=1.0)
    tensor([[0.1333, 0.1000]])
    """
    beta = _check_positive("beta", beta)
    sums, counts = _turn_table(token_logps, ref_token_logps, turn_ids)
    return beta * sums / counts.clamp(min=1)


def sweet_critic_loss(
    chosen_token_logps: Tensor,
    chosen_ref_token_logps: Tensor,
    chosen_turn_ids: Tensor,
    rejected_token_logps: Tensor,
    rejected_ref_token_logps: Tensor,
    rejected_turn_ids: Tensor,
    beta: float = 0.1,
    normalization: str = "turn_mean_sum",
) -> Tensor:
    """SWEET-RL's critic loss per trajectory pair, shape (B,): Bradley–Terry on trajectory scores,
    ``−log σ(β·(score⁺ − score⁻))`` (spec §8.1).

    * ``normalization="turn_mean_sum"`` (the paper): score = Σ_turns mean_{tokens of the turn} (log π_ψ − log π_ref),
      i.e. the sum of the per-turn advantages :func:`sweet_turn_advantage` / β.
    * ``"trajectory_mean"`` (the official code, ``--mean_log_prob``): one mean of the log-ratio over all the agent's
      tokens of the trajectory (TRL's ``sigmoid_norm``).

    Inputs are (B, T) token log-probs of the critic and its frozen reference with the training-time information in
    context, and (B, T) turn ids (the agent turn of each token, negative for other tokens); chosen is the better
    trajectory of the pair.

    >>> chosen = (torch.tensor([[-1.0, -0.5, -0.2, -0.8, -0.4]]), torch.tensor([[-1.2, -0.6, -0.3, -0.9, -0.5]]),
    ...           torch.tensor([[0, 0, 0, 1, 1]]))                       # 2 agent turns: 3 + 2 tokens
    >>> rejected = (torch.tensor([[-1.5, -0.7, -0.9, -0.4, -0.6, -1.0]]),
    ...             torch.tensor([[-1.4, -0.6, -0.8, -0.5, -0.5, -0.9]]), torch.tensor([[0, 0, 1, 1, 1, 1]]))
    >>> round(sweet_critic_loss(*chosen, *rejected).item(), 6)                  # spec §8.6, paper form
    0.674164
    >>> round(sweet_critic_loss(*chosen, *rejected, normalization="trajectory_mean").item(), 6)  # official code
    0.683857
    """
    beta = _check_positive("beta", beta)
    margin = sweet_trajectory_score(chosen_token_logps, chosen_ref_token_logps, chosen_turn_ids, normalization) - \
        sweet_trajectory_score(rejected_token_logps, rejected_ref_token_logps, rejected_turn_ids, normalization)
    return -F.logsigmoid(beta * margin)


def sweet_trajectory_score(token_logps: Tensor, ref_token_logps: Tensor, turn_ids: Tensor,
                           normalization: str = "turn_mean_sum") -> Tensor:
    """A trajectory's critic score (B,) before β: the sum over agent turns of the turn's mean log-ratio
    (``"turn_mean_sum"``) or one mean over all agent tokens (``"trajectory_mean"``); see :func:`sweet_critic_loss`."""
    _check_choice("normalization", normalization, SWEET_NORMALIZATIONS)
    sums, counts = _turn_table(token_logps, ref_token_logps, turn_ids)
    if normalization == "trajectory_mean":
        return sums.sum(dim=1) / counts.sum(dim=1).clamp(min=1)
    return (sums / counts.clamp(min=1)).sum(dim=1)


def sweet_policy_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_nll: Tensor,
    beta: float = 0.1,
    nll_coef: float = 0.01,
) -> Tensor:
    """SWEET-RL's policy loss per turn-level pair (spec §8.1), shape (B,): DPO on the critic-ranked candidate turns
    plus an NLL term on the chosen turn::

        −log σ(β·[(log π(a⁺|o) − log π_ref(a⁺|o)) − (log π(a⁻|o) − log π_ref(a⁻|o))]) + nll_coef · NLL(a⁺)

    Log-probs are summed over the turn's tokens; ``chosen_nll`` is the chosen turn's mean token NLL. TRL's
    ``DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, nll_coef])`` trains this objective (its NLL is the mean
    over the batch's chosen tokens).

    >>> round(sweet_policy_loss(torch.tensor([-30.0]), torch.tensor([-42.0]), torch.tensor([-31.0]),
    ...                         torch.tensor([-40.0]), torch.tensor([0.85])).item(), 6)  # spec §8.6
    0.562855
    """
    beta = _check_positive("beta", beta)
    dtype = _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                         ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    margin = _pair_margin(policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype), ref_chosen_logps.to(dtype),
                          ref_rejected_logps.to(dtype))
    return -F.logsigmoid(beta * margin) + float(nll_coef) * torch.as_tensor(chosen_nll, dtype=dtype)
