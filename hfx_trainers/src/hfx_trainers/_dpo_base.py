"""The DPO-family base of the self-play trainers (SPIN, SPPO, RSPO, INPO; spec ``specs/trainers.md`` §10.3).

:class:`PairwiseTrainer` is TRL's ``DPOTrainer`` (its tokenisation, collator, fused LM head, PEFT, reference model and
``precompute_ref_log_probs``) with three additions:

* per-example float columns (win probabilities, anchor log-probs) survive tokenisation and reach ``_compute_loss``
  as tensors (:class:`ScalarColumnsCollator`);
* for losses that need the opponent π_t *besides* DPO's reference π_ref (RSPO, INPO), π_t's summed log-probs are
  precomputed once from the starting weights into ``opp_chosen_logps``/``opp_rejected_logps``, so only the policy
  stays in memory while training;
* ``_compute_loss`` computes the policy's summed log-probs of the chosen and rejected completions and hands them to
  :meth:`PairwiseTrainer.pair_loss`, the one method a trainer writes.

Config helpers (:func:`single_loss_type`, :func:`reject_unused_dpo_options`) keep the configs' checks alike.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from trl import DPOTrainer

from hfx.compose import HfxTrainerMixin

OPPONENT_COLUMNS = ("opp_chosen_logps", "opp_rejected_logps")
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


# --------------------------------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------------------------------


def single_loss_type(config_name: str, loss_type: Any, valid: Sequence[str], other: str) -> list[str]:
    """Validate a ``loss_type`` given as a string or a one-element list; return TRL's one-element list form."""
    if isinstance(loss_type, (list, tuple)):
        if len(loss_type) != 1:
            raise ValueError(
                f"{config_name}.loss_type takes one loss, one of {', '.join(map(repr, valid))}; got "
                f"{list(loss_type)!r} (combining losses is a DPOConfig feature {config_name} does not use)"
            )
        loss_type = loss_type[0]
    if loss_type not in valid:
        raise ValueError(f"{config_name}.loss_type must be one of {', '.join(map(repr, valid))}; got {loss_type!r}. "
                         f"{other}")
    return [loss_type]


def check_positive(config_name: str, name: str, value: Any, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{config_name}.{name} must be a positive number ({hint}); got {value!r}")


def reject_unused_dpo_options(config, config_name: str, loss_description: str) -> None:
    """Refuse DPO options the pairwise loss ignores, rather than silently dropping them."""
    unused = {
        "loss_weights": config.loss_weights is not None,
        "ld_alpha": config.ld_alpha is not None,
        "f_divergence_type": config.f_divergence_type != "reverse_kl",
        "use_weighting": bool(config.use_weighting),
        "label_smoothing": bool(config.label_smoothing),
    }
    bad = [name for name, is_set in unused.items() if is_set]
    if bad:
        raise ValueError(
            f"{config_name} does not use {', '.join(bad)} ({loss_description}); leave them at their defaults or use "
            "trl.DPOConfig for DPO variants"
        )


def resolve_args(trainer, model, args):
    """``args`` checked to be the trainer's ``config_class``, or a default one named after the model (as TRL does)."""
    cls = trainer.config_class
    if args is None:
        model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
        return cls(f"{str(model_name).rstrip('/').split('/')[-1]}-{trainer._name}")
    if not isinstance(args, cls):
        raise TypeError(
            f"{type(trainer).__name__} needs a {cls.__name__} (it carries {trainer._name}'s loss and defaults), got "
            f"{type(args).__name__}; build one with {cls.__name__}(output_dir=..., ...)"
        )
    return args


# --------------------------------------------------------------------------------------------------
# Dataset columns
# --------------------------------------------------------------------------------------------------


def column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # an IterableDataset with unknown features
        names = list(next(iter(dataset)).keys())
    return list(names)


def _is_conversational(dataset, column: str) -> bool:
    return isinstance(next(iter(dataset))[column], list)


def prepare_pairwise_columns(
    dataset,
    name: str,
    trainer_name: str,
    aliases: Mapping[str, str],
    required: Sequence[str],
    describe: Mapping[str, str],
    hints=None,
):
    """Rename ``aliases`` (own name -> DPO/hfx name) and check that the columns a trainer needs are present.

    ``required`` lists the columns after renaming besides ``prompt``/``chosen``/``rejected``; ``describe`` gives the
    text naming each column in the error; ``hints(missing, have)`` returns extra advice for the error message.
    A conversational dataset may carry its prompt inside ``chosen``/``rejected`` (TRL extracts it).
    """
    if dataset is None:
        return None
    if isinstance(dataset, dict):  # DatasetDict, IterableDatasetDict or a plain dict of eval sets
        return type(dataset)({
            key: prepare_pairwise_columns(ds, f"{name}[{key!r}]", trainer_name, aliases, required, describe, hints)
            for key, ds in dataset.items()
        })
    if not isinstance(dataset, (Dataset, IterableDataset)):
        return dataset  # DPOTrainer reports the type error
    columns = column_names(dataset)
    renames = {}
    for own, target in aliases.items():
        if own in columns:
            if target in columns:
                raise ValueError(
                    f"{trainer_name}: the {name} dataset has both {own!r} and {target!r} columns; keep one "
                    f"(they mean the same: {target!r} = {own!r})"
                )
            renames[own] = target
    have = {renames.get(c, c) for c in columns}
    tokenised = {"prompt_ids", "chosen_ids", "rejected_ids"} <= have
    pair = [] if tokenised else ["chosen", "rejected"]
    missing = [c for c in (*pair, *required) if c not in have]
    if not tokenised and "prompt" not in have:
        chosen = next((k for k, v in renames.items() if v == "chosen"), "chosen")
        if "chosen" in missing or not _is_conversational(dataset, chosen):
            missing.insert(0, "prompt")
    if missing:
        extra = hints(missing, have) if hints is not None else []
        raise ValueError(
            f"{trainer_name}: the {name} dataset lacks the column(s) {', '.join(describe.get(m, m) for m in missing)}; "
            f"got columns {columns}." + (" Hint: " + "; ".join(extra) + "." if extra else "")
        )
    return dataset.rename_columns(renames) if renames else dataset


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------


class ScalarColumnsCollator:
    """Wrap a preference collator to also return per-example float columns as (B,) tensors.

    Only the ``names`` present in the examples are returned (anchor columns are added after the first precompute
    pass). Float64 values stay float64, as the official SPPO trainer keeps its probabilities.
    """

    def __init__(self, collator, names: Sequence[str]):
        self.collator = collator
        self.names = tuple(names)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        for name in self.names:
            if name in examples[0]:
                batch[name] = torch.tensor([example[name] for example in examples], dtype=torch.float64)
        return batch

    def __getattr__(self, item):  # pad_token_id, max_length, ... of the wrapped collator
        return getattr(self.collator, item)


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


class PairwiseTrainer(HfxTrainerMixin, DPOTrainer):
    """``DPOTrainer`` with a pluggable pairwise loss (:meth:`pair_loss`) and per-example float columns.

    Subclasses set:

    * ``config_class``: the config type the trainer requires;
    * ``column_aliases``: own column names -> the DPO/hfx names (e.g. SPIN's ``real`` -> ``chosen``);
    * ``scalar_columns``: every float column the loss may read (forwarded by the collator);
    * ``needs_opponent``: precompute π_t's log-probs into ``opp_*`` columns at construction;
    * ``required_columns(args)``, ``describe_columns``, ``column_hints``: the dataset check and its error message.
    """

    config_class: type = None
    column_aliases: Mapping[str, str] = {}
    scalar_columns: tuple[str, ...] = ()
    needs_opponent: bool = False
    describe_columns: Mapping[str, str] = {}

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 **kwargs: Any):
        name = type(self).__name__
        args = resolve_args(self, model, args)
        check = dict(trainer_name=name, aliases=self.column_aliases, required=self.required_columns(args),
                     describe=self.describe_columns, hints=self.column_hints)
        train_dataset = prepare_pairwise_columns(train_dataset, "train", **check)
        eval_dataset = prepare_pairwise_columns(eval_dataset, "eval", **check)
        names = (*self.scalar_columns, *(OPPONENT_COLUMNS if self.needs_opponent else ()))
        self._non_model_keys = frozenset({"completion_mask", *REFERENCE_COLUMNS, *names})  # TRL's precompute uses it
        super().__init__(model, ref_model, args, data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, **kwargs)
        self.data_collator = ScalarColumnsCollator(self.data_collator, names)
        if self.needs_opponent:
            self.train_dataset = self._add_opponent_logps(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._add_opponent_logps(v, f"eval[{k!r}]") for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._add_opponent_logps(self.eval_dataset, "eval")

    # -- what subclasses define ------------------------------------------------------------------

    def required_columns(self, args) -> list[str]:
        """Columns, besides prompt/chosen/rejected, the dataset must have for ``args``."""
        return []

    def column_hints(self, missing: list[str], have: set[str]) -> list[str]:
        return []

    def pair_loss(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, inputs: dict[str, Any]
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch loss from the policy's summed log-probs (B,) and the batch; returns (loss, metrics) where each
        metric is a detached tensor averaged over the batch (and processes) for the log."""
        raise NotImplementedError

    # -- anchors -------------------------------------------------------------------------------------

    def reference_logps(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """DPO's reference log-probs of chosen and rejected: precomputed columns, or TRL's ``compute_ref_log_probs``
        on the reference model (or the PEFT model with its adapter disabled)."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        reference = self.ref_model if self.ref_model is not None else self.model
        return self.compute_ref_log_probs(reference, inputs)

    def opponent_logps(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """π_t's log-probs of chosen and rejected, precomputed from the starting weights."""
        missing = [c for c in OPPONENT_COLUMNS if c not in inputs]
        if missing:
            raise KeyError(
                f"{type(self).__name__}: the batch lacks {missing}; π_t's log-probs are precomputed for the datasets "
                "given to the constructor, so pass eval datasets there rather than to evaluate()"
            )
        return inputs["opp_chosen_logps"], inputs["opp_rejected_logps"]

    def compute_ref_log_probs(self, model, inputs):
        # TRL's version forwards every batch key but its own to the model: drop the float columns.
        extra = self._non_model_keys - {"completion_mask", *REFERENCE_COLUMNS}
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k not in extra})

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [*self.scalar_columns, *(OPPONENT_COLUMNS if self.needs_opponent else ())]
        self._signature_columns = [*self._signature_columns, *(c for c in extra if c not in self._signature_columns)]

    def _policy_forward(self, model, inputs, **extra):
        """One forward of [chosen; rejected] with TRL's fused LM head; returns (outputs, summed chosen log-probs,
        summed rejected log-probs, shifted completion mask)."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in self._non_model_keys}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, **extra, labels=labels, fused_lm_head=True)
        per_token_logps = outputs.log_probs[:, -shift_mask.size(1):]  # prompt-learning PEFT prepends virtual tokens
        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)  # batch is [chosen..., rejected...]
        return outputs, chosen_logps, rejected_logps, shift_mask

    def _add_opponent_logps(self, dataset, name: str):
        """Add π_t's summed log-probs (the policy's, at its starting weights) as ``opp_*`` columns."""
        if dataset is None or set(OPPONENT_COLUMNS) <= set(column_names(dataset)):
            return dataset
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"{type(self).__name__} precomputes π_t's log-probs before training, which needs a map-style "
                f"Dataset; the {name} dataset is an IterableDataset (or add the columns {list(OPPONENT_COLUMNS)})"
            )
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
                       num_workers=self.args.dataloader_num_workers)
        )
        chosen, rejected = [], []
        model = self.model
        with torch.no_grad(), self.accelerator.autocast(), _eval_mode(model):
            for batch in tqdm(loader, desc=f"Computing π_t log-probs for the {name} dataset",
                              disable=bool(os.environ.get("TQDM_DISABLE", "")) or not self.accelerator.is_main_process):
                _, c, r, _ = self._policy_forward(model, batch)
                c, r = self.accelerator.gather_for_metrics((c.float(), r.float()))
                chosen.append(c.cpu())
                rejected.append(r.cpu())
        dataset = dataset.add_column("opp_chosen_logps", torch.cat(chosen).tolist())
        return dataset.add_column("opp_rejected_logps", torch.cat(rejected).tolist())

    # -- loss ------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        outputs, chosen_logps, rejected_logps, shift_mask = self._policy_forward(model, inputs, **extra)
        loss, metrics = self.pair_loss(chosen_logps, rejected_logps, inputs)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_token_metrics(mode, inputs, outputs, shift_mask)
        for key, value in metrics.items():
            value = value.detach().float().reshape(-1)
            self._metrics[mode][key].append(self.accelerator.gather(value).mean().item())
        if return_outputs:  # as DPOTrainer: the fused head has no logits, so recompute them for compute_metrics
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k not in self._non_model_keys})
            return loss, outputs
        return loss

    def _log_token_metrics(self, mode, inputs, outputs, shift_mask):
        gather = self.accelerator.gather_for_metrics
        seq_len = shift_mask.size(1)
        entropy_sum = gather((outputs.entropy[:, -seq_len:].detach() * shift_mask).sum()).sum()
        total_tokens = gather(shift_mask.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)
        if mode == "train":
            num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        chosen_mask = shift_mask.chunk(2, dim=0)[0].bool()
        chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
        correct = gather((chosen_top1 & chosen_mask).sum()).sum()
        chosen_tokens = gather(chosen_mask.sum()).sum()
        accuracy = (correct / chosen_tokens).item() if chosen_tokens > 0 else 0.0
        self._metrics[mode]["mean_token_accuracy"].append(accuracy)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def reward_metrics(chosen_name: str, rejected_name: str, chosen_rewards, rejected_rewards, chosen_logps,
                   rejected_logps) -> dict[str, torch.Tensor]:
    """DPO-style log entries: rewards per side, margins, accuracies and log-probs, under the trainer's names."""
    margins = chosen_rewards - rejected_rewards
    return {
        f"rewards/{chosen_name}": chosen_rewards,
        f"rewards/{rejected_name}": rejected_rewards,
        "rewards/margins": margins,
        "rewards/accuracies": (margins > 0).float(),
        f"logps/{chosen_name}": chosen_logps,
        f"logps/{rejected_name}": rejected_logps,
    }
