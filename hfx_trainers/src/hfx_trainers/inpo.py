"""INPO — Iterative Nash Policy Optimization (Zhang et al., ICLR 2025, arXiv 2407.00617; spec ``specs/trainers.md`` §5).

One INPO iteration fits online mirror descent on the preference game, π_{t+1} ∝ π_ref^{τ/η}·π_t^{1−τ/η}·
exp(P(y ≻ π_t)/η), with a squared loss on labelled (winner, loser) pairs sampled from π_t::

    h = Δ_θ − (τ/η)·Δ_ref − (1 − τ/η)·Δ_t,   ℓ = (h − 1/(2η))²,   Δ_M = log M(y_w) − log M(y_l)

Two anchors, one model in memory: π_t's log-probs are precomputed from the starting weights when the trainer is
built (``opp_chosen_logps``/``opp_rejected_logps``), π_ref (the initial SFT model) is DPO's reference: pass it as
``ref_model`` with ``precompute_ref_log_probs=True`` (the self-play driver does). With ``ref_model=None`` π_ref is
the starting model (then h = Δ_θ − Δ_t whatever τ).

Example::

    >>> args = INPOConfig(output_dir="inpo-iter1", use_cpu=True)  # eta=0.005, tau=eta/3, lr 5e-7, cosine
    >>> args.eta, round(args.tau, 6), args.lr_scheduler_type == "cosine"
    (0.005, 0.001667, True)
    >>> trainer = INPOTrainer("path/to/pi_t", ref_model="path/to/sft", args=args,
    ...                       train_dataset=pairs)  # doctest: +SKIP
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from trl import DPOConfig

from hfx.compose import HfxArguments

from ._dpo_base import PairwiseTrainer, check_positive, reject_unused_dpo_options, reward_metrics
from .losses import implicit_reward, inpo_loss

__all__ = ["INPOConfig", "INPOTrainer"]

_PAPER = {
    "title": "Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via No-Regret Learning",
    "id": "2407.00617",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @inproceedings{zhang2025iterative,
            title        = {{Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via No-Regret Learning}},
            author       = {Yuheng Zhang and Dian Yu and Baolin Peng and Linfeng Song and Ye Tian and Mingyue Huo and Nan Jiang and Haitao Mi and Dong Yu},
            year         = 2025,
            booktitle    = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
        }"""),
}
_DPO_BETA = DPOConfig.beta  # INPO has no β: a changed one is a mistake worth an error


@dataclass
class INPOConfig(HfxArguments, DPOConfig):
    r"""Configuration of :class:`INPOTrainer`: a TRL ``DPOConfig`` with INPO's defaults and the ``hfx_*`` fields.

    Defaults from the official run scripts (spec §5.3): ``eta=0.005``, ``tau = eta/3`` (their ``ratio`` 1/3),
    ``learning_rate=5e-7``, ``lr_scheduler_type="cosine"``, ``num_train_epochs=2`` (the script's default). INPO has
    no β: ``beta`` must stay at DPOConfig's default and is not used.

    Parameters:
        eta (`float`, defaults to `0.005`):
            η, the inverse mirror-descent step; the loss target is 1/(2η) (paper default 0.0075).
        tau (`float` or `None`, defaults to `None`):
            τ, the KL strength toward π_ref, 0 ≤ τ ≤ η; ``None`` is η/3. τ = η is online IPO against π_ref, τ = 0 is
            no-regret learning against π_t only.

    >>> INPOConfig(output_dir="out", eta=0.1, tau=0.2, use_cpu=True)
    Traceback (most recent call last):
    ...
    ValueError: INPOConfig.tau (0.2) must lie in [0, eta=0.1]: ...
    """

    learning_rate: float = field(default=5e-7, metadata={"help": "Initial learning rate (official INPO: 5e-7)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule (official INPO run scripts: cosine)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs per iteration (official default 2)."})
    eta: float = field(default=0.005, metadata={"help": "η: inverse step size; target 1/(2η) (official 0.005)."})
    tau: float | None = field(
        default=None, metadata={"help": "τ ∈ [0, η]: KL strength toward π_ref; default η/3 (official ratio 1/3)."}
    )

    def __post_init__(self):
        name = type(self).__name__
        check_positive(name, "eta", self.eta, "official INPO: 0.005")
        if self.tau is None:
            self.tau = self.eta / 3
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 <= self.tau <= self.eta:
            raise ValueError(
                f"{name}.tau ({self.tau!r}) must lie in [0, eta={self.eta:g}]: τ/η is π_ref's exponent in the INPO "
                "update π_ref^(τ/η)·π_t^(1−τ/η); tau=eta is online IPO against π_ref, None means eta/3"
            )
        if self.beta != _DPO_BETA:
            raise ValueError(f"{name} has no beta (INPO's scales are eta and tau); leave beta at its default")
        if self.loss_type not in (["sigmoid"], "sigmoid"):
            raise ValueError(f"{name}.loss_type is not used (the INPO loss is fixed); leave it at its default")
        reject_unused_dpo_options(self, name, "the INPO loss is a squared loss on h = Δ_θ − (τ/η)Δ_ref − (1−τ/η)Δ_t")
        super().__post_init__()


class INPOTrainer(PairwiseTrainer):
    r"""One INPO iteration (arXiv 2407.00617): TRL's ``DPOTrainer`` with :func:`~hfx_trainers.losses.inpo_loss`.

    The train dataset holds ``prompt``, ``chosen`` (the preferred sample of π_t) and ``rejected``. π_t's log-probs
    are computed once from the starting weights when the trainer is built; π_ref is ``ref_model`` (with
    ``precompute_ref_log_probs=True`` only the policy stays in memory while training).

    Logged metrics: ``h/mean`` (h, whose target is ``1/(2η)``), ``rewards/chosen`` and ``rewards/rejected``
    (η·(log π_θ − log π_t), so the target margin is ½), ``rewards/margins``, ``rewards/accuracies``, ``logps/*``,
    ``entropy``, ``mean_token_accuracy``.

    Example::

        >>> trainer = INPOTrainer("path/to/pi_t", ref_model="path/to/sft", train_dataset=pairs,
        ...                       args=INPOConfig("out", precompute_ref_log_probs=True))  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP

    Also available as ``hfx.INPOTrainer`` / ``hfx.INPOConfig``.
    """

    _tag_names = ["trl", "inpo", "hfx"]
    _name = "INPO"
    _paper = _PAPER
    config_class = INPOConfig
    needs_opponent = True

    def pair_loss(self, chosen_logps, rejected_logps, inputs):
        device = chosen_logps.device
        opponent_chosen, opponent_rejected = (x.to(device) for x in self.opponent_logps(inputs))
        ref_chosen, ref_rejected = (x.to(device) for x in self.reference_logps(inputs))
        eta, tau = self.args.eta, self.args.tau
        per_example = inpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, opponent_chosen,
                                opponent_rejected, eta=eta, tau=tau)
        chosen_logps, rejected_logps = chosen_logps.detach(), rejected_logps.detach()
        metrics = reward_metrics(
            "chosen", "rejected",
            implicit_reward(chosen_logps, opponent_chosen, eta),
            implicit_reward(rejected_logps, opponent_rejected, eta),
            chosen_logps, rejected_logps,
        )
        ratio = tau / eta
        metrics["h/mean"] = ((chosen_logps - rejected_logps) - ratio * (ref_chosen - ref_rejected)
                             - (1 - ratio) * (opponent_chosen - opponent_rejected))
        return per_example.mean(), metrics
