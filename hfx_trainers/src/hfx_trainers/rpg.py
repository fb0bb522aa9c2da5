"""RPG — Regularized Policy Gradient (Zhang et al., ICLR 2026, arXiv 2505.17508; spec ``specs/trainers.md`` §6).

Online RL with verifiable rewards where the policy gradient and a KL regulariser are derived together, off-policy
from the rollout policy π_old with the importance weight ``w = π_θ/π_old``. Four divergences (forward/reverse KL,
normalised or unnormalised) and two estimators: a fully differentiable surrogate (dual-clip PPO + β·KL term) and
REINFORCE with RPG-Style Clip (the paper's Algorithm 2, which the released scripts never call). The KL reference
is π_old (the paper's iterative reference) or a fixed π_ref, optionally refreshed every K steps.

:class:`RPGConfig` is a TRL ``GRPOConfig`` and :class:`RPGTrainer` a ``GRPOTrainer``: generation (HF or vLLM),
reward functions and the fused LM head are TRL's; the loss is :func:`hfx_trainers.losses.rpg_terms`, with
mean-baseline advantages (reward − group mean, ``scale_rewards="none"``).

Example::

    >>> from hfx import toy
    >>> args = RPGConfig(output_dir="rpg-out", use_cpu=True)
    >>> args.kl_type, args.estimator, args.beta, args.clip_c, args.scale_rewards
    ('ufkl', 'differentiable', 0.0001, 10.0, 'none')
    >>> trainer = RPGTrainer(model=str(toy.warm_start()), reward_funcs=toy.reward_fn, args=args,
    ...                      train_dataset=toy.ArithmeticTask().dataset("train", format="prompt"))  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from trl import GRPOConfig

from hfx.compose import HfxArguments

from ._rl_base import GroupRLArguments, GroupRLTrainer, check_rl_arguments
from .losses import RPG_ESTIMATORS, RPG_KL_KINDS, RPG_LEVELS, rpg_terms

__all__ = ["RPGConfig", "RPGTrainer"]

RPG_REFERENCES = ("old", "ref")
RPG_AGGREGATIONS = ("bnpo", "dapo")
_DEFAULT_CLIP_C = {"differentiable": 10.0, "reinforce": 3.0}


@dataclass
class RPGConfig(GroupRLArguments, HfxArguments, GRPOConfig):
    r"""Configuration of :class:`RPGTrainer`: a TRL ``GRPOConfig`` with RPG's fields and defaults.

    Defaults from the official scripts (``recipe/rpg/7b/*.sh``, paper App. H; spec §6.3): ``learning_rate=1e-6``,
    AdamW with ``weight_decay=0.1``, 10 warm-up steps then constant, ``beta=1e-4``, ``epsilon=0.2`` /
    ``epsilon_high=0.28``, dual-clip ``clip_c=10`` (the REINFORCE function's default is 3: ``clip_c=None`` picks by
    estimator), ``temperature=1.0``, token-mean loss, mean-baseline advantages (``scale_rewards="none"``).

    Parameters:
        beta (`float`, defaults to `1e-4`):
            RPG's KL coefficient β (TRL's ``beta`` is the π_ref KL of GRPO; here it is RPG's regulariser).
        kl_type (`str`, defaults to `"ufkl"`):
            ``"fkl"``, ``"rkl"``, ``"ufkl"`` (unnormalised forward, the k3 form) or ``"urkl"``.
        estimator (`str`, defaults to `"differentiable"`):
            ``"differentiable"`` (dual-clip PPO + β·KL term, the official scripts) or ``"reinforce"`` (REINFORCE with
            RPG-Style Clip, the paper's Algorithm 2).
        kl_reference (`str`, defaults to `"old"`):
            ``"old"``: the KL is to the rollout policy π_old (the paper's iterative reference; no extra model).
            ``"ref"``: to a fixed π_ref (the starting model, loaded by TRL), refreshed every ``ref_refresh_steps``.
        ref_refresh_steps (`int` or `None`):
            With ``kl_reference="ref"``: copy the policy into π_ref every K optimizer steps (TRL's
            ``sync_ref_model`` with ``ref_model_mixup_alpha=1``).
        clip_c (`float` or `None`):
            The dual-clip bound c for negative advantages (None: 10 differentiable, 3 REINFORCE).
        importance_sampling_level (`str`, defaults to `"token"`):
            ``"token"``: per-token ratios (the official code). ``"sequence"``: whole-response ratios
            w = π_θ(y)/π_old(y), the paper's derivation, averaged over sequences (unlike GRPO/GSPO's length-normalised
            sequence ratio).
        loss_type (`str`, defaults to `"bnpo"`):
            Token-mean aggregation: ``"bnpo"`` over the micro-batch (verl's token-mean) or ``"dapo"`` over the
            generation batch's tokens.

    >>> RPGConfig(output_dir="out", estimator="reinforce", use_cpu=True).clip_c
    3.0
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "Official RPG: 1e-6 (5e-7 in the rf scripts)."})
    weight_decay: float = field(default=0.1, metadata={"help": "Official RPG: AdamW weight decay 0.1."})
    warmup_steps: int = field(default=10, metadata={"help": "Official RPG: 10 warm-up steps, then constant."})
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata={"help": "Official RPG: constant."})
    beta: float = field(default=1e-4, metadata={"help": "RPG's KL coefficient β (official 1e-4)."})
    kl_type: str = field(default="ufkl", metadata={"help": "KL form.", "choices": list(RPG_KL_KINDS)})
    estimator: str = field(default="differentiable", metadata={"help": "Gradient estimator.",
                                                               "choices": list(RPG_ESTIMATORS)})
    kl_reference: str = field(default="old", metadata={"help": "KL reference: 'old' (π_old, the paper's) or 'ref'.",
                                                       "choices": list(RPG_REFERENCES)})
    ref_refresh_steps: int | None = field(
        default=None, metadata={"help": "With kl_reference='ref': refresh π_ref from the policy every K steps."}
    )
    clip_c: float | None = field(default=None, metadata={"help": "Dual-clip bound c (None: 10, or 3 for REINFORCE)."})
    epsilon_high: float | None = field(default=0.28, metadata={"help": "Upper clip ε_high (official RPG: 0.28)."})
    scale_rewards: str = field(default="none", metadata={"help": "RPG: mean baseline, no std division ('none')."})
    loss_type: str = field(default="bnpo", metadata={"help": "Token-mean aggregation: 'bnpo' (micro-batch) or "
                                                             "'dapo' (generation batch)."})

    def __post_init__(self):
        name = "RPGConfig"
        for option, value, valid in (("kl_type", self.kl_type, RPG_KL_KINDS),
                                     ("estimator", self.estimator, RPG_ESTIMATORS),
                                     ("kl_reference", self.kl_reference, RPG_REFERENCES),
                                     ("importance_sampling_level", self.importance_sampling_level, RPG_LEVELS),
                                     ("loss_type", self.loss_type, RPG_AGGREGATIONS)):
            if value not in valid:
                raise ValueError(f"{name}.{option} must be one of {', '.join(map(repr, valid))}; got {value!r}")
        if not self.beta >= 0:
            raise ValueError(f"{name}.beta (RPG's KL coefficient) must be >= 0, got {self.beta!r}")
        if self.clip_c is None:
            self.clip_c = _DEFAULT_CLIP_C[self.estimator]
        if not self.clip_c > 1:
            raise ValueError(f"{name}.clip_c must be > 1 (the dual-clip bound for negative advantages), got "
                             f"{self.clip_c!r}")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.ref_refresh_steps is not None:
            if self.kl_reference != "ref":
                raise ValueError(
                    f"{name}.ref_refresh_steps refreshes a fixed reference: set kl_reference='ref' (with the default "
                    "kl_reference='old' the reference is π_old, refreshed at every generation)"
                )
            if self.ref_refresh_steps < 1:
                raise ValueError(f"{name}.ref_refresh_steps must be >= 1, got {self.ref_refresh_steps}")
            self.sync_ref_model, self.ref_model_mixup_alpha = True, 1.0
            self.ref_model_sync_steps = self.ref_refresh_steps
        if self.sync_ref_model and self.kl_reference != "ref":
            raise ValueError(f"{name}.sync_ref_model needs kl_reference='ref' (use ref_refresh_steps=K)")
        super().__post_init__()
        check_rl_arguments(self, name)


class RPGTrainer(GroupRLTrainer):
    r"""RPG (arXiv 2505.17508): TRL's ``GRPOTrainer`` with the loss :func:`~hfx_trainers.losses.rpg_terms`.

    The train dataset has a ``prompt`` column (text or chat turns) and any columns the reward functions read
    (e.g. ``answer``). Advantages are reward − group mean. Logged metrics besides GRPO's rollout metrics:
    ``kl`` (token mean of the KL term), ``clip_ratio`` (share of tokens without policy-gradient signal),
    ``ratio/mean`` (w), ``entropy``.

    Example::

        >>> from hfx import toy
        >>> from hfx_trainers.rpg import RPGConfig, RPGTrainer
        >>> args = RPGConfig("rpg-out", kl_type="rkl", estimator="reinforce")  # doctest: +SKIP
        >>> trainer = RPGTrainer(model=str(toy.warm_start()), reward_funcs=toy.reward_fn, args=args,
        ...                      train_dataset=toy.ArithmeticTask().dataset("train", format="prompt"))  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP

    Also available as ``hfx.RPGTrainer`` / ``hfx.RPGConfig``.
    """

    _tag_names = ["trl", "rpg", "hfx"]
    _name = "RPG"
    _paper = {
        "title": "On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning",
        "id": "2505.17508",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{zhang2026design,
                title        = {{On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning}},
                author       = {Yifan Zhang and Yifeng Liu and Huizhuo Yuan and Yang Yuan and Quanquan Gu and
                                Andrew Chi-Chih Yao},
                year         = 2026,
                booktitle    = {The Fourteenth International Conference on Learning Representations, {ICLR} 2026},
            }"""),
    }

    config_class = RPGConfig

    def reference_beta(self, args) -> float:
        return args.beta if args.kl_reference == "ref" else 0.0

    def rl_loss(self, per_token_logps, mask, inputs):
        args = self.args
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old  # exactly on-policy: TRL skips computing π_old
        # TRL computes π_ref's log-probs only when β != 0; with β = 0 there is no KL term to need them
        ref = inputs.get("ref_per_token_logps") if args.kl_reference == "ref" else None
        advantages = inputs["advantages"].to(per_token_logps.dtype)
        mask = mask.to(per_token_logps.dtype)
        options = dict(kind=args.kl_type, estimator=args.estimator, beta=args.beta, epsilon_low=args.epsilon,
                       epsilon_high=args.epsilon_high, clip_c=args.clip_c)
        if args.importance_sampling_level == "sequence":
            def summed(x):
                return None if x is None else (x * mask).sum(dim=1)

            terms = rpg_terms(summed(per_token_logps), summed(old), advantages, ref_logps=summed(ref), **options)
            loss = terms.loss.mean()
            clipped, kl, ratio = (self._global_mean(x.float()) for x in (terms.clipped, terms.kl, terms.ratio))
        else:
            terms = rpg_terms(per_token_logps, old, advantages.unsqueeze(1), ref_logps=ref, **options)
            per_token = terms.loss
            if "importance_sampling_ratio" in inputs:  # TRL's vLLM-vs-trainer correction
                per_token = per_token * inputs["importance_sampling_ratio"]
            if args.loss_type == "bnpo":
                loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
            else:  # dapo: normalise by the generation batch's tokens, per accumulation window as TRL does
                normalizer = inputs["num_items_in_batch"].clamp(min=1) / self.accelerator.num_processes
                if self.model.training:  # the count spans steps_per_generation micro-batches
                    normalizer = normalizer / args.steps_per_generation
                loss = (per_token * mask).sum() / normalizer
            clipped, kl, ratio = (self._masked_global_mean(x.float(), mask) for x in
                                  (terms.clipped, terms.kl, terms.ratio))
        return loss, {"kl": kl, "clip_ratio": clipped, "ratio/mean": ratio}
