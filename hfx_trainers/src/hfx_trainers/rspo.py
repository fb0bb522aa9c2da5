"""RSPO — Regularized Self-Play Policy Optimization (Tang et al., arXiv 2503.00030; spec ``specs/trainers.md`` §4).

RSPO adds to SPPO's self-play loss a plug-in regularizer G toward a **fixed** reference π_ref (the initial model of
the whole run), while SPPO's log-ratio keeps the opponent π_t (the model at the start of the iteration)::

    L = mean_batch( SPPO(θ; π_t) ) + λ·G(θ; π_ref)

G is :func:`hfx_trainers.losses.rspo_regularizer`: reverse KL (default), reverse KL without entropy, forward KL by
importance weights, χ², smoothed χ², entropy, or a weighted combination (``{"forward_kl_importance": 1.0,
"reverse_kl": 5.0}``, the paper's best forward+reverse mix); the official ``loss_type`` strings
(``sppo_forward1reverse5``, ...) are accepted too.

Two anchors, one model in memory: π_t's log-probs are precomputed from the starting weights when the trainer is
built (``opp_chosen_logps``/``opp_rejected_logps``), and π_ref is DPO's reference model. Pass the initial model as
``ref_model`` with ``precompute_ref_log_probs=True`` (the self-play driver does); with ``ref_model=None``, π_ref is
the starting model, as the official code falls back to.

Example::

    >>> args = RSPOConfig(output_dir="rspo-iter1", regularizer={"forward_kl_importance": 1, "reverse_kl": 5},
    ...                   reg_coef=0.1, use_cpu=True)
    >>> args.regularizer_terms
    {'forward_kl_importance': 1.0, 'reverse_kl': 5.0}
    >>> trainer = RSPOTrainer("path/to/pi_t", ref_model="path/to/initial", args=args,
    ...                       train_dataset=pairs)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field

from ._dpo_base import check_positive
from .losses import resolve_rspo_regularizer, rspo_regularizer
from .sppo import SPPOConfig, SPPOTrainer

__all__ = ["RSPOConfig", "RSPOTrainer"]

_PAPER = {
    "title": "Game-Theoretic Regularized Self-Play Alignment of Large Language Models",
    "id": "2503.00030",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{tang2025game,
            title        = {{Game-Theoretic Regularized Self-Play Alignment of Large Language Models}},
            author       = {Xiaohang Tang and Sangwoong Yoon and Seongho Son and Huizhuo Yuan and Quanquan Gu and Ilija Bogunovic},
            year         = 2025,
            journal      = {arXiv preprint arXiv:2503.00030},
        }"""),
}


@dataclass
class RSPOConfig(SPPOConfig):
    r"""Configuration of :class:`RSPOTrainer`: :class:`~hfx_trainers.sppo.SPPOConfig` (β = 0.001, RMSprop, lr 5e-7,
    1 epoch) plus the regularizer.

    Parameters:
        regularizer (`str` or `dict`, defaults to `"reverse_kl"`):
            A kind of :data:`hfx_trainers.losses.RSPO_REGULARIZER_KINDS`, a ``{kind: coefficient}`` mapping (also as
            a JSON string on the command line) for a weighted combination, or an official ``loss_type`` string such
            as ``"sppo_forward1reverse5"``. ``"forward_kl_reference"`` (MLE on SFT responses) needs π_θ's
            log-probs of a reference response, which this trainer does not compute: use
            :func:`~hfx_trainers.losses.rspo_loss` in your own loop for it.
        reg_coef (`float`, defaults to `0.1`):
            λ, the regularizer's weight (official pipeline default 0.1; launchers use 0.01–1).
        regularizer_clip (`float`, defaults to `10.0`):
            The clip R of the log importance weight (forward KL) and of the χ² ratio.

    After ``__post_init__``, ``regularizer_terms`` holds the resolved ``{kind: coefficient}`` and
    ``regularizer_clip`` the clip in force (an official string may fix it).
    """

    regularizer: dict | str | None = field(
        default="reverse_kl",
        metadata={"help": "RSPO regularizer: a kind, a JSON {kind: coefficient} mapping, or an official loss_type."},
    )
    reg_coef: float = field(default=0.1, metadata={"help": "λ, the weight of the regularizer (official 0.1)."})
    regularizer_clip: float = field(
        default=10.0, metadata={"help": "Clip R of the log importance weight / χ² ratio (official 10)."}
    )

    def __post_init__(self):
        name = type(self).__name__
        if isinstance(self.regularizer, str) and self.regularizer.lstrip().startswith("{"):
            try:
                self.regularizer = json.loads(self.regularizer)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}.regularizer is not valid JSON ({e}): {self.regularizer!r}") from None
        terms, clip = resolve_rspo_regularizer(self.regularizer, self.regularizer_clip)
        if "forward_kl_reference" in terms:
            raise ValueError(
                f"{name}.regularizer 'forward_kl_reference' (official sppo_forward) needs π_θ's log-probs of SFT "
                "reference responses, which RSPOTrainer does not compute; use another kind (e.g. "
                "'forward_kl_importance', the sample-based forward KL) or hfx_trainers.losses.rspo_loss in your loop"
            )
        if isinstance(self.reg_coef, bool) or not isinstance(self.reg_coef, (int, float)) or self.reg_coef < 0:
            raise ValueError(f"{name}.reg_coef (λ) must be a number >= 0; got {self.reg_coef!r}")
        check_positive(name, "regularizer_clip", self.regularizer_clip, "official 10")
        self.regularizer_terms, self.regularizer_clip = terms, clip
        super().__post_init__()


class RSPOTrainer(SPPOTrainer):
    r"""One RSPO iteration (arXiv 2503.00030): SPPO against π_t plus λ·G against the fixed π_ref.

    Dataset columns as :class:`~hfx_trainers.sppo.SPPOTrainer` (``prompt``, ``chosen``, ``rejected`` and the win
    probabilities of the loss variant). π_t's log-probs are computed once from the starting weights when the trainer
    is built; π_ref is ``ref_model`` (with ``precompute_ref_log_probs=True`` only the policy stays in memory).

    Logged metrics: SPPO's (``rewards/*`` against π_t, ``targets/*``), plus ``loss/self_play`` (the SPPO part),
    ``loss/regularizer`` (G), and ``kl/chosen``, ``kl/rejected`` (log π_θ − log π_ref per side).

    Example::

        >>> trainer = RSPOTrainer("path/to/pi_t", ref_model="path/to/initial", train_dataset=pairs,
        ...                       args=RSPOConfig("out", precompute_ref_log_probs=True))  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP

    Also available as ``hfx.RSPOTrainer`` / ``hfx.RSPOConfig``.
    """

    _tag_names = ["trl", "rspo", "hfx"]
    _name = "RSPO"
    _paper = _PAPER
    config_class = RSPOConfig
    needs_opponent = True

    def pair_loss(self, chosen_logps, rejected_logps, inputs):
        device = chosen_logps.device
        opponent_chosen, opponent_rejected = (x.to(device) for x in self.opponent_logps(inputs))
        ref_chosen, ref_rejected = (x.to(device) for x in self.reference_logps(inputs))
        per_example, metrics = self._sppo_terms(chosen_logps, rejected_logps, opponent_chosen, opponent_rejected,
                                                inputs)
        regularizer = rspo_regularizer(chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                                       kind=self.args.regularizer_terms, clip=self.args.regularizer_clip)
        self_play = per_example.mean()
        metrics["loss/self_play"] = self_play.detach()
        metrics["loss/regularizer"] = regularizer.detach()
        metrics["kl/chosen"] = (chosen_logps - ref_chosen).detach()
        metrics["kl/rejected"] = (rejected_logps - ref_rejected).detach()
        return self_play + self.args.reg_coef * regularizer, metrics
