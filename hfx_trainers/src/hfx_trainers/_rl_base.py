"""The GRPO-family base of the RL trainers (RPG, DRPO; spec ``specs/trainers.md`` §1.2, §10.4).

:class:`GroupRLTrainer` is TRL's ``GRPOTrainer`` — its sampler, generation (HF ``generate`` or vLLM), reward
functions, advantages and fused LM head — with:

* ``rewards`` (the weighted sum of the reward functions, per completion) and ``group_ids`` (the prompt each
  completion answers) carried into the loss's inputs, and a clear error when a reward function returns NaN/inf;
* ``_compute_loss`` reduced to TRL's per-token log-probs handed to :meth:`GroupRLTrainer.rl_loss`, the one method
  a trainer writes;
* optional group-preserving batching (``keeps_groups_intact``): a prompt's completions stay on one process and in
  one micro-batch, shuffled at group granularity, for losses computed per group (DRPO);
* the DAPO extras: dynamic sampling (drop groups whose rewards all agree, refill with fresh prompts) and overlong
  reward shaping (TRL's soft overlong punishment as one more reward function).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from hfx.compose import HfxTrainerMixin

from ._dpo_base import resolve_args

_RIGHT_PADDED = {"completion_ids": "pad", "completion_mask": 0, "old_per_token_logps": 0.0,
                 "ref_per_token_logps": 0.0, "sampling_per_token_logps": 0.0, "tool_mask": 1,
                 "importance_sampling_ratio": 1.0}
_LEFT_PADDED = {"prompt_ids": "pad", "prompt_mask": 0}


@dataclass
class GroupRLArguments:
    """Fields shared by the RL configs (mixed in before ``GRPOConfig``)."""

    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "DAPO dynamic sampling: drop groups whose rewards all agree (zero advantage) and refill the "
                          "batch with groups of fresh prompts."},
    )
    dynamic_sampling_max_rounds: int = field(
        default=20,
        metadata={"help": "Most extra generation rounds per batch for dynamic sampling (official RPG: 20); if groups "
                          "are still short, zero-variance groups fill the rest."},
    )
    overlong_buffer_length: int | None = field(
        default=None,
        metadata={"help": "DAPO overlong shaping: completions longer than max_completion_length minus this buffer get "
                          "a linear penalty reaching -overlong_penalty at max_completion_length (official RPG: 512)."},
    )
    overlong_penalty: float = field(
        default=1.0, metadata={"help": "Weight of the overlong penalty reward (official RPG: 1.0)."}
    )


def check_rl_arguments(args, name: str) -> None:
    # num_generations >= 2 is GRPOConfig's own check
    if args.dynamic_sampling_max_rounds < 0:
        raise ValueError(f"{name}.dynamic_sampling_max_rounds must be >= 0, got {args.dynamic_sampling_max_rounds}")
    if args.overlong_buffer_length is not None and not 0 < args.overlong_buffer_length < args.max_completion_length:
        raise ValueError(
            f"{name}.overlong_buffer_length must lie in (0, max_completion_length={args.max_completion_length}); "
            f"got {args.overlong_buffer_length}"
        )
    unused = {"top_entropy_quantile": args.top_entropy_quantile != 1.0,
              "off_policy_mask_threshold": args.off_policy_mask_threshold is not None}
    bad = [k for k, v in unused.items() if v]
    if bad:
        raise ValueError(f"{name} does not use {', '.join(bad)} (GRPO loss options); leave them at their defaults")


@contextlib.contextmanager
def trl_beta(args, value: float):
    """Let TRL see ``beta=value`` while it builds the trainer: TRL's ``beta`` decides whether a π_ref model is
    loaded, while our configs use ``beta`` for the method's own coefficient."""
    own = args.beta
    args.beta = value
    try:
        yield
    finally:
        args.beta = own


def _pad_to(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - x.size(1)
    if extra <= 0:
        return x
    pad = x.new_full((x.size(0), extra), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def cat_rollouts(batches: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Concatenate scored rollout batches (TRL's ``_generate_and_score_completions`` outputs) row-wise, padding
    prompts on the left and completions on the right to a common width."""
    out = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        if key == "num_items_in_batch":
            continue  # recomputed by the caller
        if key in _LEFT_PADDED or key in _RIGHT_PADDED:
            left = key in _LEFT_PADDED
            fill = (_LEFT_PADDED if left else _RIGHT_PADDED)[key]
            fill = pad_token_id if fill == "pad" else fill
            width = max(v.size(1) for v in values)
            out[key] = torch.cat([_pad_to(v, width, fill, left) for v in values])
        elif isinstance(values[0], torch.Tensor) and values[0].ndim == 1:
            out[key] = torch.cat(values)
        else:
            raise NotImplementedError(
                f"dynamic sampling cannot merge the rollout field {key!r} (multimodal or tool rollouts); "
                "set dynamic_sampling=False"
            )
    return out


def take_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    return {k: (v[rows] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()}


def group_std_nonzero(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group: do its rewards differ (a non-zero advantage somewhere)?"""
    grouped = rewards.view(-1, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


class GroupRLTrainer(HfxTrainerMixin, GRPOTrainer):
    """``GRPOTrainer`` with a pluggable loss (:meth:`rl_loss`) over per-token log-probs, raw rewards and groups.

    Subclasses set ``config_class`` and ``keeps_groups_intact``, write :meth:`rl_loss`, and may override
    :meth:`reference_beta` (TRL's π_ref coefficient: non-zero only when the method needs π_ref's log-probs).
    """

    config_class: type = None
    keeps_groups_intact: bool = False

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None, **kwargs: Any):
        args = resolve_args(self, model, args)
        if reward_funcs is None and kwargs.get("environment_factory") is None:
            raise ValueError(
                f"{type(self).__name__} needs reward_funcs: a function (prompts, completions, **columns) -> list of floats, a "
                "reward-model path, or a list of them (e.g. hfx.toy.reward_fn for the toy arithmetic task)"
            )
        if kwargs.get("environment_factory") is None:
            for split, dataset in (("train", train_dataset), ("eval", eval_dataset)):
                self._check_prompt_column(dataset, split)
        with trl_beta(args, self.reference_beta(args)):
            super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, **kwargs)
        if args.overlong_buffer_length is not None:
            from trl.rewards import get_soft_overlong_punishment

            self.reward_funcs.append(get_soft_overlong_punishment(args.max_completion_length,
                                                                  args.overlong_buffer_length))
            self.reward_func_names.append("overlong_penalty")
            self.reward_processing_classes.append(None)
            self.reward_weights = torch.cat([self.reward_weights, torch.tensor([float(args.overlong_penalty)])])
        self._scored_rewards = None

    @staticmethod
    def _check_prompt_column(dataset, split: str) -> None:
        if dataset is None:
            return
        datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
        for ds in datasets:
            columns = getattr(ds, "column_names", None)
            if columns is None:
                columns = list(next(iter(ds)).keys())
            if "prompt" not in columns:
                hint = ""
                if "messages" in columns:
                    hint = " Split conversational `messages` into `prompt` (the turns before the answer)."
                elif "question" in columns or "problem" in columns:
                    hint = " Rename the question column to `prompt` (dataset.rename_column('question', 'prompt'))."
                raise ValueError(f"the {split} dataset needs a `prompt` column (the text or chat turns to complete); "
                                 f"got columns {columns}.{hint}")

    # -- what subclasses define ----------------------------------------------------------------

    def reference_beta(self, args) -> float:
        """The ``beta`` TRL sees: non-zero makes it load π_ref and put its log-probs in ``ref_per_token_logps``."""
        return 0.0

    def rl_loss(self, per_token_logps: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch loss (before gradient-accumulation scaling) and detached metrics to log."""
        raise NotImplementedError

    # -- rollouts --------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        bad = ~torch.isfinite(rewards_per_func)
        if torch.isinf(rewards_per_func).any() or bad.all(dim=1).any():
            func = int(bad.any(dim=0).nonzero()[0])
            raise ValueError(
                f"the reward function {self.reward_func_names[func]!r} returned NaN, None or inf for some completions; "
                "a reward function must return one finite number per completion"
            )
        self._scored_rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        return rewards_per_func

    def _score(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super()._generate_and_score_completions(inputs)
        rank = self.accelerator.process_index
        batch["rewards"] = self._scored_rewards[rank * len(inputs):(rank + 1) * len(inputs)]
        return batch

    def _group_size(self) -> int:
        return self.num_generations if self.model.training else self.num_generations_eval

    def _generate_and_score_completions(self, inputs):
        group_size = self._group_size()
        if self.keeps_groups_intact:
            prompts = [str(x.get("prompt")) for x in inputs]
            for start in range(0, len(prompts), group_size):
                if len(set(prompts[start:start + group_size])) != 1:
                    raise RuntimeError(
                        f"{type(self).__name__}: a prompt group was split across processes or batches; keep "
                        "per_device_train_batch_size a multiple of num_generations"
                    )
        batch = self._score(inputs)
        if self.args.dynamic_sampling and self.model.training:
            batch = self._dynamic_sampling(batch, len(inputs) // group_size, group_size)
        batch["group_ids"] = torch.arange(len(batch["rewards"]), device=batch["rewards"].device) // group_size
        return batch

    def _dynamic_sampling(self, batch, n_groups: int, group_size: int):
        """DAPO dynamic sampling: keep groups with differing rewards, refill from fresh prompts, then truncate."""
        pool = [batch]
        generator = torch.Generator().manual_seed(
            hash((self.args.seed, self.state.global_step, self._step, self.accelerator.process_index)) % 2**31)
        rounds = 0
        for rounds in range(self.args.dynamic_sampling_max_rounds + 1):
            kept = sum(int(group_std_nonzero(b["rewards"], group_size).sum()) for b in pool)
            short = torch.tensor(float(max(n_groups - kept, 0)), device=self.accelerator.device)
            if self.accelerator.gather(short.reshape(1)).max() == 0 or rounds == self.args.dynamic_sampling_max_rounds:
                break  # every process stops together: scoring gathers rewards across processes
            rows = torch.randint(len(self.train_dataset), (n_groups,), generator=generator).tolist()
            pool.append(self._score([self.train_dataset[r] for r in rows for _ in range(group_size)]))
        merged = cat_rollouts(pool, self._tokenizer.pad_token_id)
        informative = group_std_nonzero(merged["rewards"], group_size)
        order = torch.cat([informative.nonzero()[:, 0], (~informative).nonzero()[:, 0]])[:n_groups]
        rows = (order[:, None] * group_size + torch.arange(group_size, device=order.device)).reshape(-1)
        merged = take_rows(merged, rows)
        mask = merged["completion_mask"] * merged.get("tool_mask", 1)
        merged["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()
        mode = "train"
        self._metrics[mode]["dynamic_sampling/rounds"].append(float(rounds))
        self._metrics[mode]["dynamic_sampling/informative_groups"].append(
            float(informative[order].float().mean()))
        return merged

    def _prepare_inputs(self, generation_batch):
        if not (self.keeps_groups_intact and self.model.training):
            return super()._prepare_inputs(generation_batch)
        # TRL shuffles rows, which scatters a group across micro-batches: shuffle whole groups instead.
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            n_rows = len(batch["rewards"])
            groups = torch.randperm(n_rows // self.num_generations)
            rows = (groups[:, None] * self.num_generations + torch.arange(self.num_generations)).reshape(-1)
            batch = take_rows(batch, rows.to(batch["rewards"].device))
            self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # -- loss --------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
        )
        loss, metrics = self.rl_loss(per_token_logps, mask, inputs)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss / accumulation
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        metrics["entropy"] = self._masked_global_mean(entropies, mask)
        for key, value in metrics.items():
            self._metrics[mode][key].append(float(value))
        return loss

    def _masked_global_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Token mean over every process's micro-batch."""
        totals = torch.stack([(values.detach() * mask).sum(), mask.sum().to(values.dtype)])
        totals = self.accelerator.reduce(totals, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1)).item()

    def _global_mean(self, values: torch.Tensor) -> float:
        return self.accelerator.gather(values.detach().float().reshape(-1)).mean().item()
