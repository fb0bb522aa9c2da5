"""SWEET-RL — Step-WisE Evaluation from Training-time information (Zhou et al., arXiv 2503.15478; spec
``specs/trainers.md`` §8).

A multi-turn agent is trained from offline trajectories in two DPO-family stages:

1. **critic** (:class:`SweetCriticTrainer`): a copy of the agent, with the training-time information (e.g. the
   reference answer) in its context, learns from pairs of whole trajectories of the same task (the best attempt vs
   each worse one) that the better one scores higher, where a trajectory's score is built from per-turn advantages
   ``A(o_t, a_t, c) = β · mean token log-ratio of the agent's turn under the critic vs its frozen copy``
   (:func:`~hfx_trainers.losses.sweet_critic_loss`);
2. **policy**: candidate next turns sampled from the agent are ranked by the critic and the agent is trained with
   turn-level DPO (+ an NLL term on the chosen turn).

This module holds the critic stage.

Example::

    >>> args = SweetCriticConfig(output_dir="critic", use_cpu=True)
    >>> args.beta, args.learning_rate, args.num_train_epochs, args.advantage_normalization
    (0.1, 2e-07, 4.0, 'turn_mean_sum')
"""

from __future__ import annotations

import contextlib
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig

from hfx.compose import HfxArguments

from ._dpo_base import PairwiseTrainer, check_positive, reject_unused_dpo_options, reward_metrics, single_loss_type
from .losses import SWEET_NORMALIZATIONS, sweet_critic_loss, sweet_trajectory_score
from .trajectories import assistant_turn_ids

__all__ = ["SweetCriticConfig", "SweetCriticTrainer", "TurnIdsCollator"]

TURN_COLUMNS = ("chosen_turn_ids", "rejected_turn_ids")


@dataclass
class SweetCriticConfig(HfxArguments, DPOConfig):
    r"""Configuration of :class:`SweetCriticTrainer` (a TRL ``DPOConfig``), with the official README's defaults
    (spec §8.3): ``beta=0.1``, ``learning_rate=2e-7``, 4 epochs.

    Parameters:
        advantage_normalization (`str`, defaults to `"turn_mean_sum"`):
            A trajectory's score: ``"turn_mean_sum"`` sums the per-turn mean log-ratios (the paper's per-turn
            advantages); ``"trajectory_mean"`` takes one mean over all the agent's tokens (the official code).
        hidden_info_template (`str`):
            How the training-time information enters the critic's context: a system message formatted with
            ``{hidden_info}`` (the official code prefixes the same sentence to the dialogue). Empty: no message.

    >>> SweetCriticConfig(output_dir="c", advantage_normalization="trajectory_mean", use_cpu=True).loss_type
    ['sigmoid']
    """

    learning_rate: float = field(default=2e-7, metadata={"help": "Official SWEET-RL critic: 2e-7."})
    num_train_epochs: float = field(default=4.0, metadata={"help": "Official SWEET-RL critic: 4 epochs."})
    beta: float = field(default=0.1, metadata={"help": "β of the per-turn advantage and the Bradley-Terry loss."})
    advantage_normalization: str = field(
        default="turn_mean_sum",
        metadata={"help": "Trajectory score: 'turn_mean_sum' (paper) or 'trajectory_mean' (official code).",
                  "choices": list(SWEET_NORMALIZATIONS)},
    )
    hidden_info_template: str = field(
        default="In light that the final answer is: {hidden_info}.",
        metadata={"help": "System message carrying the training-time information to the critic ({hidden_info})."},
    )

    def __post_init__(self):
        name = "SweetCriticConfig"
        self.loss_type = single_loss_type(name, self.loss_type, ("sigmoid",),
                                          "The critic's loss is sweet_critic_loss (Bradley-Terry on scores).")
        check_positive(name, "beta", self.beta, "official SWEET-RL: 0.1")
        if self.advantage_normalization not in SWEET_NORMALIZATIONS:
            raise ValueError(f"{name}.advantage_normalization must be one of {SWEET_NORMALIZATIONS}; got "
                             f"{self.advantage_normalization!r}")
        if self.precompute_ref_log_probs:
            raise ValueError(f"{name}.precompute_ref_log_probs: the critic needs the reference's per-token "
                             "log-probs at every step (TRL precomputes sums); leave it False")
        if self.hidden_info_template and "{hidden_info}" not in self.hidden_info_template:
            raise ValueError(f"{name}.hidden_info_template must contain '{{hidden_info}}', got "
                             f"{self.hidden_info_template!r}")
        reject_unused_dpo_options(self, name, "the critic's loss is sweet_critic_loss")
        super().__post_init__()


class TurnIdsCollator:
    """Wrap a preference collator: add ``turn_ids`` (2B, T), the agent turn of every token (−1 elsewhere), laid out
    like ``input_ids`` ([chosen…, rejected…], the same truncation and right padding), and make ``completion_mask``
    cover exactly the agent's tokens."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        rows = [[-1] * len(e["prompt_ids"]) + list(e[f"{side}_turn_ids"]) for side in ("chosen", "rejected")
                for e in examples]
        max_length = getattr(self.collator, "max_length", None)
        if max_length is not None:
            cut = slice(None, max_length) if self.collator.truncation_mode == "keep_start" else slice(-max_length, None)
            rows = [r[cut] for r in rows]
        width = batch["input_ids"].size(1)
        turn_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            turn_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        batch["turn_ids"] = turn_ids
        batch["completion_mask"] = (turn_ids >= 0).long()
        return batch

    def __getattr__(self, item):
        return getattr(self.collator, item)


class SweetCriticTrainer(PairwiseTrainer):
    r"""SWEET-RL's critic (arXiv 2503.15478): DPO-family training on pairs of multi-turn trajectories with the loss
    :func:`~hfx_trainers.losses.sweet_critic_loss`.

    The train dataset holds ``chosen`` and ``rejected`` (message lists of the same task: the better and the worse
    attempt) and ``hidden_info`` (the training-time information), e.g. the rows of
    :func:`hfx_trainers.trajectories.critic_pairs`. Every assistant message of a trajectory is an agent turn: its
    tokens are found from the chat template's ``{% generation %}`` markers (TRL's training templates for Llama 3,
    Qwen 2.5/3 and others are used when the tokenizer's template lacks them). The reference is the starting model
    (a frozen copy, or the PEFT base with adapters disabled).

    Logged: ``rewards/chosen``, ``rewards/rejected`` (β × trajectory score), ``rewards/margins``,
    ``rewards/accuracies``.

    Example::

        >>> from hfx_trainers.trajectories import collect_trajectories, critic_pairs
        >>> pairs = critic_pairs(collect_trajectories("path/to/agent", attempts=3))  # doctest: +SKIP
        >>> SweetCriticTrainer(model="path/to/agent", args=SweetCriticConfig("critic"),
        ...                    train_dataset=Dataset.from_list(pairs)).train()  # doctest: +SKIP
    """

    _tag_names = ["trl", "sweet-rl", "hfx"]
    _name = "SWEET-RL critic"
    _paper = {
        "title": "SWEET-RL: Training Multi-Turn LLM Agents on Collaborative Reasoning Tasks",
        "id": "2503.15478",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{zhou2025sweet,
                title        = {{SWEET-RL: Training Multi-Turn LLM Agents on Collaborative Reasoning Tasks}},
                author       = {Yifei Zhou and Song Jiang and Yuandong Tian and Jason Weston and Sergey Levine and
                                Sainbayar Sukhbaatar and Xian Li},
                year         = 2025,
                journal      = {arXiv preprint arXiv:2503.15478},
            }"""),
    }

    config_class = SweetCriticConfig
    describe_columns = {"chosen": "chosen (the better trajectory's messages)",
                        "rejected": "rejected (the worse trajectory's messages)",
                        "hidden_info": "hidden_info (the training-time information, '' for none)"}

    def required_columns(self, args) -> list[str]:
        return ["hidden_info"]

    def column_hints(self, missing, have):
        if "messages" in have:
            return ["these look like trajectories: build pairs with hfx_trainers.trajectories.critic_pairs(rows)"]
        return []

    def __init__(self, model, ref_model=None, args: SweetCriticConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, **kwargs: Any):
        super().__init__(model, ref_model, args, data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, **kwargs)
        self.data_collator = TurnIdsCollator(self.data_collator)
        self._non_model_keys = self._non_model_keys | {"turn_ids"}

    # -- data ----------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        template = args.hidden_info_template

        def tokenize(row):
            prefix = [{"role": "system", "content": template.format(hidden_info=row["hidden_info"])}] if template \
                else []
            out = {"prompt_ids": []}
            for side in ("chosen", "rejected"):
                messages = row[side]
                if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
                    raise ValueError(f"{side} must be a trajectory's messages (a list of {{'role', 'content'}} "
                                     f"dicts), got {type(messages).__name__}")
                out[f"{side}_ids"], out[f"{side}_turn_ids"] = assistant_turn_ids(tokenizer, prefix + list(messages))
            return out

        return dataset.map(tokenize, remove_columns=list(dataset.column_names),
                           desc=f"Tokenizing {dataset_name} trajectories")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *(c for c in TURN_COLUMNS
                                                               if c not in self._signature_columns)]

    # -- loss ------------------------------------------------------------------------------------------

    def _token_logps(self, model, inputs, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs (2B, T−1) of every next token under ``model`` (the reference under no_grad)."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in self._non_model_keys}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        context = contextlib.nullcontext()
        if reference:
            context = contextlib.ExitStack()
            context.enter_context(torch.no_grad())
            if self.ref_model is None:  # PEFT: the base model with the adapter disabled
                from trl.trainer.utils import use_adapter

                unwrapped = self.accelerator.unwrap_model(self.model)
                context.enter_context(use_adapter(unwrapped, adapter_name="ref" if "ref" in getattr(
                    unwrapped, "peft_config", {}) else None))
        with context, self.accelerator.autocast():
            out = (self.ref_model or model)(**model_kwargs, labels=labels, fused_lm_head=True) if reference else \
                model(**model_kwargs, labels=labels, fused_lm_head=True)
        return out.log_probs[:, -(inputs["input_ids"].size(1) - 1):]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        logps = self._token_logps(model, inputs)
        ref_logps = self._token_logps(model, inputs, reference=True).to(logps.dtype)
        turn_ids = inputs["turn_ids"][:, 1:].to(logps.device)  # log-prob at position t scores token t + 1
        (lp_c, lp_r), (ref_c, ref_r), (t_c, t_r) = (x.chunk(2, dim=0) for x in (logps, ref_logps, turn_ids))
        losses = sweet_critic_loss(lp_c, ref_c, t_c, lp_r, ref_r, t_r, beta=self.beta,
                                   normalization=self.args.advantage_normalization)
        with torch.no_grad():
            score_c, score_r = (sweet_trajectory_score(lp.detach(), ref, t, self.args.advantage_normalization)
                                for lp, ref, t in ((lp_c, ref_c, t_c), (lp_r, ref_r, t_r)))
        agent = (t_c >= 0).to(lp_c.dtype)
        metrics = reward_metrics("chosen", "rejected", self.beta * score_c, self.beta * score_r,
                                 (lp_c.detach() * agent).sum(1), (lp_r.detach() * (t_r >= 0)).sum(1))
        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather(value.detach().float().reshape(-1)).mean().item())
        loss = losses.mean()
        if return_outputs:
            return loss, {}
        return loss
