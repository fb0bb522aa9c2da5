"""SPIN — Self-Play Fine-Tuning (Chen et al., ICML 2024, arXiv 2401.01335; spec ``specs/trainers.md`` §2).

One SPIN *iteration* trains π_θ, starting from the current model π_t, to tell the ground-truth SFT answer ("real")
from π_t's own answer to the same prompt ("generated")::

    z = β·[(log π_θ(y|x) − log π_t(y|x)) − (log π_θ(y'|x) − log π_t(y'|x))],   ℓ = −log σ(z)  (or max(0, 1 − z))

This module holds the per-iteration trainer: :class:`SPINConfig` (a TRL ``DPOConfig``) and :class:`SPINTrainer`
(a TRL ``DPOTrainer``) whose loss is :func:`hfx_trainers.losses.spin_loss`, with chosen = real, rejected = generated
and the DPO reference model = the opponent π_t. Tokenisation, the collator, the reference model (a frozen copy of the
starting weights, the PEFT base with adapters disabled, or log-probs precomputed once with
``precompute_ref_log_probs=True``) are TRL's. Generating the synthetic answers and chaining iterations is the job of
the self-play driver.

Example::

    >>> from datasets import Dataset
    >>> ds = Dataset.from_dict({"prompt": ["2+3="], "real": [" 5"], "generated": [" 6"]})
    >>> args = SPINConfig(output_dir="spin-iter0", use_cpu=True)  # beta=0.1, loss_type="sigmoid", RMSprop, lr 5e-7
    >>> args.beta, args.loss_type, args.learning_rate
    (0.1, ['sigmoid'], 5e-07)
    >>> trainer = SPINTrainer(model="path/to/sft-model", args=args, train_dataset=ds)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, IterableDataset
from trl import DPOConfig

from hfx.compose import HfxArguments

from ._dpo_base import (
    PairwiseTrainer,
    check_positive,
    reject_unused_dpo_options,
    reward_metrics,
    single_loss_type,
)
from .losses import SPIN_LOSS_TYPES, implicit_reward, spin_loss

__all__ = ["SPIN_COLUMN_ALIASES", "SPINConfig", "SPINTrainer"]

# SPIN's own column names -> the DPO columns they fill.
SPIN_COLUMN_ALIASES = {"real": "chosen", "generated": "rejected"}

@dataclass
class SPINConfig(HfxArguments, DPOConfig):
    r"""Configuration of :class:`SPINTrainer`: a TRL ``DPOConfig`` with SPIN's defaults and the ``hfx_*`` fields.

    Defaults that differ from ``DPOConfig``, taken from the official SPIN scripts (spec §2.3):

    - ``beta=0.1`` (the paper's λ; the official run uses 5.0 at iteration 3),
    - ``learning_rate=5e-7`` (official iterations 0–1; 1e-7 for iterations 2–3),
    - ``optim="rmsprop"`` with the linear schedule (official). The official warm-up ratio 0.1 is not a default here:
      set ``warmup_steps=0.1`` (transformers ≥ 5) or ``warmup_ratio=0.1`` (transformers 4.x).

    Kept from TRL: ``max_length=1024`` (official), ``truncation_mode="keep_start"`` (official: ``keep_end``, which TRL
    deprecates), ``num_train_epochs=3`` (the official yaml; its scripts run 6 and stop early as needed).

    Parameters:
        loss_type (`str`, defaults to `"sigmoid"`):
            ``"sigmoid"`` (−log σ(z), the paper's logistic loss) or ``"hinge"`` (max(0, 1 − z)). A one-element list is
            accepted, as in ``DPOConfig``; after ``__post_init__`` the value is a one-element list, like TRL's.
        reference_free (`bool`, defaults to `False`):
            Drop the opponent terms, z = β·(log π_θ(y) − log π_θ(y')) (an official option).

    DPO options the SPIN objective does not use (``loss_weights``, ``ld_alpha``, ``f_divergence_type`` other than
    ``"reverse_kl"``, ``use_weighting``, ``label_smoothing``) are rejected rather than silently ignored.

    >>> SPINConfig(output_dir="out", loss_type="hinge", use_cpu=True).loss_type
    ['hinge']
    """

    learning_rate: float = field(
        default=5e-7, metadata={"help": "Initial learning rate; official SPIN: 5e-7 (iterations 0-1), 1e-7 (2-3)."}
    )
    optim: str = field(default="rmsprop", metadata={"help": "Optimizer; official SPIN uses RMSprop."})
    beta: float = field(
        default=0.1,
        metadata={"help": "SPIN's λ: scale of the log-ratio margin between real and generated answers (official 0.1)."},
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "SPIN loss: 'sigmoid' (logistic, default) or 'hinge'.", "choices": list(SPIN_LOSS_TYPES)},
    )
    reference_free: bool = field(
        default=False, metadata={"help": "Drop the opponent (π_t) log-probs from the margin."}
    )

    def __post_init__(self):
        self.loss_type = single_loss_type(
            "SPINConfig", self.loss_type, SPIN_LOSS_TYPES, "For other DPO losses use trl.DPOConfig/DPOTrainer."
        )
        check_positive("SPINConfig", "beta", self.beta, "official SPIN: 0.1")
        reject_unused_dpo_options(
            self, "SPINConfig", "the SPIN loss is spin_loss: sigmoid or hinge on the summed log-ratio margin"
        )
        super().__post_init__()


def _spin_hints(missing: list[str], have: set[str]) -> list[str]:
    hints = []
    if "rejected" in missing and "chosen" not in missing:
        hints.append(
            "the generated column holds the current model's (π_t's) own answers to the prompts: generate them "
            "with the model being trained (the SPIN self-play driver does this) before each iteration"
        )
    if "completion" in have and "chosen" in missing:
        hints.append("a prompt-completion (SFT) dataset's `completion` is the ground truth: rename it to `real`")
    if "messages" in have:
        hints.append("split conversational `messages` into `prompt` (the user turn) and `real` (the answer)")
    return hints


class SPINTrainer(PairwiseTrainer):
    r"""One SPIN iteration (arXiv 2401.01335): TRL's ``DPOTrainer`` with the loss :func:`~hfx_trainers.losses.spin_loss`.

    The train dataset holds ``prompt``, ``real`` (the ground-truth answer) and ``generated`` (the current model's own
    answer); DPO's names ``chosen``/``rejected`` are accepted for ``real``/``generated``. The opponent π_t is DPO's
    reference model: leave ``ref_model=None`` so that it is the starting weights (TRL's frozen copy, the PEFT base
    model, or log-probs precomputed once with ``precompute_ref_log_probs=True``, which keeps one model in memory).

    Logged metrics: ``rewards/real`` and ``rewards/generated`` (β·(log π_θ − log π_t) on each side),
    ``rewards/margins``, ``rewards/accuracies`` (share of pairs with z > 0), ``logps/real``, ``logps/generated``,
    ``entropy``, ``mean_token_accuracy`` (on the real answers) and ``num_tokens``.

    Example::

        >>> from hfx_trainers.spin import SPINConfig, SPINTrainer
        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"prompt": ["2+3="], "real": [" 5"], "generated": [" 6"]})
        >>> args = SPINConfig("out", beta=0.1, loss_type="hinge")  # doctest: +SKIP
        >>> trainer = SPINTrainer(model="path/to/model", args=args, train_dataset=ds)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP

    Also available as ``hfx.SPINTrainer`` / ``hfx.SPINConfig``.
    """

    _tag_names = ["trl", "spin", "hfx"]
    _name = "SPIN"
    _paper = {
        "title": "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models",
        "id": "2401.01335",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{chen2024self,
                title        = {{Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models}},
                author       = {Zixiang Chen and Yihe Deng and Huizhuo Yuan and Kaixuan Ji and Quanquan Gu},
                year         = 2024,
                booktitle    = {Forty-first International Conference on Machine Learning, {ICML} 2024},
            }"""),
    }

    config_class = SPINConfig
    column_aliases = SPIN_COLUMN_ALIASES
    describe_columns = {"prompt": "prompt", "chosen": "real (or chosen)", "rejected": "generated (or rejected)"}

    def column_hints(self, missing, have):
        return _spin_hints(missing, have)

    def __init__(self, model, ref_model=None, args: SPINConfig | None = None, data_collator=None,
                 train_dataset: Dataset | IterableDataset | None = None, eval_dataset=None, **kwargs: Any):
        super().__init__(model, ref_model, args, data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, **kwargs)
        self.spin_loss_type = self.args.loss_type[0]
        self.reference_free = self.args.reference_free

    def pair_loss(self, real_logps, generated_logps, inputs):
        if self.reference_free:
            opponent_real = opponent_generated = None
        else:  # the opponent π_t is DPO's reference model
            opponent_real, opponent_generated = (x.to(real_logps.device) for x in self.reference_logps(inputs))
        per_example = spin_loss(
            real_logps,
            generated_logps,
            opponent_real,
            opponent_generated,
            beta=self.beta,
            loss_type=self.spin_loss_type,
            reference_free=self.reference_free,
        )
        real_logps, generated_logps = real_logps.detach(), generated_logps.detach()
        if opponent_real is None:  # reference-free: the "rewards" are β·log π_θ
            real_rewards, generated_rewards = self.beta * real_logps, self.beta * generated_logps
        else:
            real_rewards = implicit_reward(real_logps, opponent_real, self.beta)
            generated_rewards = implicit_reward(generated_logps, opponent_generated, self.beta)
        metrics = reward_metrics("real", "generated", real_rewards, generated_rewards, real_logps, generated_logps)
        return per_example.mean(), metrics
