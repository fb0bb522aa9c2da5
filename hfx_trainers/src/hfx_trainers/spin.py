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

import torch
from datasets import Dataset, IterableDataset
from trl import DPOConfig, DPOTrainer

from hfx.compose import HfxArguments, HfxTrainerMixin

from .losses import SPIN_LOSS_TYPES, spin_loss

__all__ = ["SPIN_COLUMN_ALIASES", "SPINConfig", "SPINTrainer"]

# SPIN's own column names -> the DPO columns they fill.
SPIN_COLUMN_ALIASES = {"real": "chosen", "generated": "rejected"}

_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


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
        loss_type = self.loss_type
        if isinstance(loss_type, (list, tuple)):
            if len(loss_type) != 1:
                raise ValueError(
                    f"SPINConfig.loss_type takes one loss, 'sigmoid' or 'hinge'; got {list(loss_type)!r} "
                    "(combining losses is a DPOConfig feature SPIN does not use)"
                )
            loss_type = loss_type[0]
        if loss_type not in SPIN_LOSS_TYPES:
            raise ValueError(
                f"SPINConfig.loss_type must be one of {', '.join(map(repr, SPIN_LOSS_TYPES))}; got {loss_type!r}. "
                "For other DPO losses use trl.DPOConfig/DPOTrainer."
            )
        self.loss_type = loss_type
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ValueError(f"SPINConfig.beta must be a positive number (official SPIN: 0.1); got {self.beta!r}")
        unused = {
            "loss_weights": self.loss_weights is not None,
            "ld_alpha": self.ld_alpha is not None,
            "f_divergence_type": self.f_divergence_type != "reverse_kl",
            "use_weighting": bool(self.use_weighting),
            "label_smoothing": bool(self.label_smoothing),
        }
        bad = [name for name, is_set in unused.items() if is_set]
        if bad:
            raise ValueError(
                f"SPINConfig does not use {', '.join(bad)} (the SPIN loss is spin_loss: sigmoid or hinge on the "
                "summed log-ratio margin); leave them at their defaults or use trl.DPOConfig for DPO variants"
            )
        super().__post_init__()


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # an IterableDataset with unknown features
        names = list(next(iter(dataset)).keys())
    return list(names)


def _to_dpo_columns(dataset, name: str):
    """Rename SPIN's ``real``/``generated`` columns to DPO's ``chosen``/``rejected`` and check the columns."""
    if dataset is None:
        return None
    if isinstance(dataset, dict):  # DatasetDict, IterableDatasetDict or a plain dict of eval sets
        return type(dataset)({key: _to_dpo_columns(ds, f"{name}[{key!r}]") for key, ds in dataset.items()})
    if not isinstance(dataset, (Dataset, IterableDataset)):
        return dataset  # DPOTrainer reports the type error
    columns = _column_names(dataset)
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
        return dataset  # already tokenised by DPOTrainer
    renames = {}
    for spin_col, dpo_col in SPIN_COLUMN_ALIASES.items():
        if spin_col in columns:
            if dpo_col in columns:
                raise ValueError(
                    f"SPINTrainer: the {name} dataset has both {spin_col!r} and {dpo_col!r} columns; keep one "
                    f"(they mean the same: {dpo_col!r} = {spin_col!r})"
                )
            renames[spin_col] = dpo_col
    have = {renames.get(c, c) for c in columns}
    missing = [c for c in ("chosen", "rejected") if c not in have]
    implicit_prompt = "prompt" not in have and not missing and _is_conversational(dataset, renames)
    if "prompt" not in have and not implicit_prompt:
        missing.insert(0, "prompt")
    if missing:
        wanted = {"prompt": "prompt", "chosen": "real (or chosen)", "rejected": "generated (or rejected)"}
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
        raise ValueError(
            f"SPINTrainer: the {name} dataset lacks the column(s) {', '.join(wanted[m] for m in missing)}. SPIN "
            f"trains on prompt, real (the ground-truth answer; alias chosen) and generated (π_t's answer; alias "
            f"rejected); got columns {columns}." + (" Hint: " + "; ".join(hints) + "." if hints else "")
        )
    return dataset.rename_columns(renames) if renames else dataset


def _is_conversational(dataset, renames: dict[str, str]) -> bool:
    chosen_col = next((k for k, v in renames.items() if v == "chosen"), "chosen")
    return isinstance(next(iter(dataset))[chosen_col], list)


class SPINTrainer(HfxTrainerMixin, DPOTrainer):
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

    def __init__(
        self,
        model,
        ref_model=None,
        args: SPINConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        **kwargs: Any,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = SPINConfig(f"{str(model_name).rstrip('/').split('/')[-1]}-SPIN")
        elif not isinstance(args, SPINConfig):
            raise TypeError(
                f"SPINTrainer needs a SPINConfig (it carries SPIN's loss_type and defaults), got "
                f"{type(args).__name__}; build one with SPINConfig(output_dir=..., beta=..., ...)"
            )
        train_dataset = _to_dpo_columns(train_dataset, "train")
        eval_dataset = _to_dpo_columns(eval_dataset, "eval")
        super().__init__(
            model,
            ref_model,
            args,
            data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            **kwargs,
        )
        self.spin_loss_type = args.loss_type[0]
        self.reference_free = args.reference_free

    # ------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------

    def _opponent_logps(self, inputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """π_t's summed log-probs of the real and generated answers: precomputed columns, or TRL's
        ``compute_ref_log_probs`` on the reference model (or the PEFT model with its adapter disabled)."""
        if self.reference_free:
            return None, None
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        opponent = self.ref_model if self.ref_model is not None else self.model
        return self.compute_ref_log_probs(opponent, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        # TRL's fused LM head: per-token log-probs of the labels without materialising the logits
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = shift_mask.size(1)
        per_token_logps = outputs.log_probs[:, -seq_len:]  # prompt-learning PEFT prepends virtual tokens
        real_logps, generated_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)  # batch is [real..., generated...]

        opponent_real, opponent_generated = self._opponent_logps(inputs)
        if opponent_real is not None:
            opponent_real = opponent_real.to(real_logps.device)
            opponent_generated = opponent_generated.to(real_logps.device)
        per_example = spin_loss(
            real_logps,
            generated_logps,
            opponent_real,
            opponent_generated,
            beta=self.beta,
            loss_type=self.spin_loss_type,
            reference_free=self.reference_free,
        )
        loss = per_example.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        self._log_spin_metrics(mode, inputs, outputs, shift_mask, real_logps, generated_logps,
                               opponent_real, opponent_generated)

        if return_outputs:  # as DPOTrainer: the fused head has no logits, so recompute them for compute_metrics
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _log_spin_metrics(self, mode, inputs, outputs, shift_mask, real_logps, generated_logps,
                          opponent_real, opponent_generated):
        gather = self.accelerator.gather_for_metrics
        seq_len = shift_mask.size(1)

        entropy_sum = gather((outputs.entropy[:, -seq_len:].detach() * shift_mask).sum()).sum()
        total_tokens = gather(shift_mask.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)

        if mode == "train":
            num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        real_mask = shift_mask.chunk(2, dim=0)[0].bool()
        real_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
        correct = gather((real_top1 & real_mask).sum()).sum()
        real_tokens = gather(real_mask.sum()).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / real_tokens).item() if real_tokens > 0 else 0.0)

        real_logps, generated_logps = real_logps.detach(), generated_logps.detach()
        if opponent_real is None:  # reference-free: the "rewards" are β·log π_θ
            real_rewards, generated_rewards = self.beta * real_logps, self.beta * generated_logps
        else:
            real_rewards = self.beta * (real_logps - opponent_real)
            generated_rewards = self.beta * (generated_logps - opponent_generated)
        margins = real_rewards - generated_rewards
        metrics = {
            "rewards/real": real_rewards,
            "rewards/generated": generated_rewards,
            "rewards/margins": margins,
            "rewards/accuracies": (margins > 0).float(),
            "logps/real": real_logps,
            "logps/generated": generated_logps,
        }
        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather(value).mean().item())
