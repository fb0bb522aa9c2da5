"""DRPO — Decoupled Reward Policy Optimization (Li et al., ICLR 2026, arXiv 2510.04474; spec ``specs/trainers.md`` §7).

Online RL with binary verifiable rewards that shortens reasoning without giving up accuracy: the score of a
completion is its mean token log-prob s_θ(y); per prompt, correct completions are pushed up with weights from the
closed-form length-reward distribution (shorter correct answers weigh more, self-normalised over the group's
positives), wrong ones are pushed down together through τ·log-mean-exp, and a penalty with the detached coefficient
max(β·(KL − δ), 0) keeps π_θ within KL δ of the rollout policy π_old. Length shaping never touches the negatives
— the point of "decoupling" — so a long correct answer is never penalised below a wrong one.

:class:`DRPOConfig` is a TRL ``GRPOConfig`` and :class:`DRPOTrainer` a ``GRPOTrainer`` (generation, reward
functions, vLLM, fused LM head); the loss is :func:`hfx_trainers.losses.drpo_loss`.

**Groups.** The loss is computed per prompt group, so the trainer keeps groups intact: every completion of a prompt
is on the same process and in the same micro-batch (``per_device_train_batch_size`` must be a multiple of
``num_generations``; batches are shuffled group by group). The official code instead all-gathers the scores with a
differentiable gather and regroups per micro-batch; with intact groups no gather is needed and the loss is the same.

Example::

    >>> args = DRPOConfig(output_dir="drpo-out", use_cpu=True)
    >>> args.tau, args.lam, args.delta, args.beta, args.temperature
    (10.0, 0.1, 0.0001, 1000.0, 0.6)
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from trl import GRPOConfig

from hfx.compose import HfxArguments

from ._rl_base import GroupRLArguments, GroupRLTrainer, check_rl_arguments
from .losses import binary_rewards, drpo_loss

__all__ = ["DRPOConfig", "DRPOTrainer"]

DRPO_KL_ESTIMATORS = ("k1", "k3")


@dataclass
class DRPOConfig(GroupRLArguments, HfxArguments, GRPOConfig):
    r"""Configuration of :class:`DRPOTrainer`: a TRL ``GRPOConfig`` with DRPO's fields and defaults.

    Defaults from the official scripts (``scripts/train/run_drpo_1.5b_8k.sh``; spec §7.3): τ = 10, λ = 0.1,
    δ = 1e-4, β = 1e3, k1 KL, ``learning_rate=2e-6``, ``temperature=0.6``, 8 generations per prompt, no reference
    model. The official maximum response length is 8192 (``max_completion_length`` keeps TRL's 512 here; the length
    reward divides by ``length_normalizer``, default ``max_completion_length``).

    Parameters:
        tau (`float`, defaults to `10.0`):
            Temperature of the negatives' log-mean-exp (large τ: plain mean; small τ: the hardest negative).
        lam (`float`, defaults to `0.1`):
            λ, the KL strength of the length-reward distribution: positive weights ∝ exp(−|y|/(λ·L)); ``inf`` gives
            uniform weights (DisCO).
        delta (`float`, defaults to `1e-4`):
            δ, the trust region KL(π_old‖π_θ) ≤ δ (GRPOConfig's ``delta`` ratio cap is not used by DRPO).
        beta (`float`, defaults to `1e3`):
            β, the penalty coefficient: the loss adds SG(max(β·(KL − δ), 0))·KL (not GRPO's π_ref KL).
        kl_estimator (`str`, defaults to `"k1"`):
            ``"k1"``: KL = token mean of log π_old − log π_θ (official ``ppo_kl_type=kl``); ``"k3"``: of
            exp(log π_old − log π_θ) − (log π_old − log π_θ) − 1 (``low_var_kl``).
        length_normalizer (`int` or `None`):
            L in the length reward 1 − |y|/L (None: ``max_completion_length``, as the official code).
        reward_threshold (`float` or `None`):
            DRPO needs binary rewards; with a threshold, reward >= threshold counts as correct. Without one,
            rewards other than 0/1 are an error.

    >>> DRPOConfig(output_dir="out", lam=float("inf"), use_cpu=True).lam  # DisCO-logL's uniform positive weights
    inf
    """

    learning_rate: float = field(default=2e-6, metadata={"help": "Official DRPO: 2e-6 (1.5B), 1e-6 (7B)."})
    temperature: float = field(default=0.6, metadata={"help": "Rollout temperature (official DRPO: 0.6)."})
    tau: float = field(default=10.0, metadata={"help": "τ of the negatives' log-mean-exp (official 10)."})
    lam: float = field(default=0.1, metadata={"help": "λ of the length-reward weights (official 0.1; inf: uniform)."})
    delta: float = field(default=1e-4, metadata={"help": "δ, the KL(π_old‖π_θ) trust region (official 1e-4)."})
    beta: float = field(default=1e3, metadata={"help": "β, the KL penalty coefficient (official 1e3)."})
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator: 'k1' (official) or 'k3'.",
                                                      "choices": list(DRPO_KL_ESTIMATORS)})
    length_normalizer: int | None = field(
        default=None, metadata={"help": "L in the length reward 1 - |y|/L (default: max_completion_length)."}
    )
    reward_threshold: float | None = field(
        default=None, metadata={"help": "Binarise rewards: reward >= threshold is correct (default: rewards must be "
                                        "exactly 0 or 1)."}
    )

    def __post_init__(self):
        name = "DRPOConfig"
        for option, value in (("tau", self.tau), ("lam", self.lam)):
            if not value > 0:
                raise ValueError(f"{name}.{option} must be > 0, got {value!r}")
        if not (self.delta >= 0 and self.beta >= 0):
            raise ValueError(f"{name}.delta and {name}.beta must be >= 0; got {self.delta!r}, {self.beta!r}")
        if self.kl_estimator not in DRPO_KL_ESTIMATORS:
            raise ValueError(f"{name}.kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.length_normalizer is not None and self.length_normalizer <= 0:
            raise ValueError(f"{name}.length_normalizer must be positive, got {self.length_normalizer!r}")
        if self.overlong_buffer_length is not None:
            raise ValueError(
                f"{name}.overlong_buffer_length adds a length penalty to the reward, but DRPO's rewards must stay "
                "binary and its length reward already favours short correct answers (lam); use "
                "mask_truncated_completions=True to drop truncated completions instead"
            )
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"{name}: DRPO's loss is computed per prompt group, so a micro-batch must hold whole groups: "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}); e.g. per_device_train_batch_size={self.num_generations}"
            )
        if self.sync_ref_model:
            raise ValueError(f"{name}.sync_ref_model: DRPO has no reference model (its KL is to π_old)")
        super().__post_init__()
        check_rl_arguments(self, name)


class DRPOTrainer(GroupRLTrainer):
    r"""DRPO (arXiv 2510.04474): TRL's ``GRPOTrainer`` with the loss :func:`~hfx_trainers.losses.drpo_loss`.

    The train dataset has a ``prompt`` column and any columns the reward functions read; rewards must be binary
    (or set ``reward_threshold``). Groups stay intact (see the module docstring). Logged metrics besides GRPO's:
    ``objective`` (mean J_q), ``kl`` and ``kl/coef`` (the detached penalty coefficient), ``positives`` (share of
    correct completions), ``entropy``.

    Example::

        >>> from hfx import toy
        >>> from hfx_trainers.drpo import DRPOConfig, DRPOTrainer
        >>> args = DRPOConfig("drpo-out", per_device_train_batch_size=8, num_generations=8)  # doctest: +SKIP
        >>> trainer = DRPOTrainer(model=str(toy.warm_start()), reward_funcs=toy.reward_fn, args=args,
        ...                       train_dataset=toy.ArithmeticTask().dataset("train", format="prompt"))  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP

    Also available as ``hfx.DRPOTrainer`` / ``hfx.DRPOConfig``.
    """

    _tag_names = ["trl", "drpo", "hfx"]
    _name = "DRPO"
    _paper = {
        "title": "DRPO: Efficient Reasoning via Decoupled Reward Policy Optimization",
        "id": "2510.04474",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{li2025drpo,
                title        = {{DRPO: Efficient Reasoning via Decoupled Reward Policy Optimization}},
                author       = {Gang Li and Yan Chen and Ming Lin and Tianbao Yang},
                year         = 2025,
                journal      = {arXiv preprint arXiv:2510.04474},
            }"""),
    }

    config_class = DRPOConfig
    keeps_groups_intact = True

    def rl_loss(self, per_token_logps, mask, inputs):
        args = self.args
        mask = mask.to(per_token_logps.dtype)
        lengths = mask.sum(dim=1)
        scores = (per_token_logps * mask).sum(dim=1) / lengths.clamp(min=1)
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old  # exactly on-policy: KL is 0 (with its gradient)
        log_ratio = old - per_token_logps
        per_token_kl = log_ratio if args.kl_estimator == "k1" else log_ratio.exp() - log_ratio - 1
        kl = (per_token_kl * mask).sum() / mask.sum().clamp(min=1)
        options = dict(tau=args.tau, lam=args.lam, max_length=args.length_normalizer or args.max_completion_length,
                       reward_threshold=args.reward_threshold)
        rewards, group_ids = inputs["rewards"], inputs["group_ids"]
        loss = drpo_loss(scores, rewards, lengths, group_ids, kl=kl, delta=args.delta, beta=args.beta, **options)
        coef = (args.beta * (kl.detach() - args.delta)).clamp(min=0)
        positives = binary_rewards(rewards, args.reward_threshold).float().mean()
        return loss, {
            "objective": -self._global_mean(loss.detach() - coef * kl.detach()),
            "kl": self._global_mean(kl),
            "kl/coef": self._global_mean(coef),
            "positives": self._global_mean(positives),
        }
