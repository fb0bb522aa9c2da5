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

This module holds both stages' configs, the critic trainer and the policy stage's data steps (turn states, candidate
sampling, critic ranking, turn-level pairs); the policy trains with ``hfx.extend(trl.DPOTrainer)`` and
:class:`SweetPolicyConfig`.

Example::

    >>> args = SweetCriticConfig(output_dir="critic", use_cpu=True)
    >>> args.beta, args.learning_rate, args.num_train_epochs, args.advantage_normalization
    (0.1, 2e-07, 4.0, 'turn_mean_sum')
"""

from __future__ import annotations

import contextlib
import random
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig

from hfx.compose import HfxArguments

from ._dpo_base import PairwiseTrainer, check_positive, reject_unused_dpo_options, reward_metrics, single_loss_type
from .losses import SWEET_NORMALIZATIONS, sweet_trajectory_score
from .trajectories import assistant_turn_ids, validate_trajectory

__all__ = [
    "SweetCriticConfig",
    "SweetCriticTrainer",
    "SweetPolicyConfig",
    "SweetRLConfig",
    "SweetRLTrainer",
    "TurnIdsCollator",
    "last_turn_mean_logps",
    "policy_pairs",
    "rank_candidates",
    "sample_candidates",
    "turn_states",
]

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
        # sweet_critic_loss, from the two scores (kept for the logged rewards)
        score_c, score_r = (sweet_trajectory_score(lp, ref, t, self.args.advantage_normalization)
                            for lp, ref, t in ((lp_c, ref_c, t_c), (lp_r, ref_r, t_r)))
        losses = -torch.nn.functional.logsigmoid(self.beta * (score_c - score_r))
        score_c, score_r = score_c.detach(), score_r.detach()
        agent = (t_c >= 0).to(lp_c.dtype)
        metrics = reward_metrics("chosen", "rejected", self.beta * score_c, self.beta * score_r,
                                 (lp_c.detach() * agent).sum(1), (lp_r.detach() * (t_r >= 0)).sum(1))
        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather(value.detach().float().reshape(-1)).mean().item())
        loss = losses.mean()
        if return_outputs:
            return loss, {}
        return loss


# --------------------------------------------------------------------------------------------------
# Policy stage: turn states, candidates, critic ranking, turn-level pairs
# --------------------------------------------------------------------------------------------------


@dataclass
class SweetPolicyConfig(HfxArguments, DPOConfig):
    r"""Configuration of the policy stage: turn-level DPO plus NLL on the chosen turn, a TRL ``DPOConfig`` for
    ``hfx.extend(DPOTrainer)`` with the official README's defaults (spec §8.3): ``beta=0.1``,
    ``learning_rate=2e-7``, 1 epoch, ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1.0, 0.01]`` (the
    ``nll_loss_coef``). TRL's NLL covers the chosen turn's tokens only (the official run also covers the history,
    which cancels in DPO but not in the NLL).

    >>> SweetPolicyConfig(output_dir="policy", use_cpu=True).loss_weights
    [1.0, 0.01]
    """

    learning_rate: float = field(default=2e-7, metadata={"help": "Official SWEET-RL policy: 2e-7."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Official SWEET-RL policy: 1 epoch."})
    beta: float = field(default=0.1, metadata={"help": "DPO β (official 0.1)."})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid", "sft"],
                                 metadata={"help": "DPO on turn pairs + NLL on the chosen turn."})
    loss_weights: list[float] | None = field(default_factory=lambda: [1.0, 0.01],
                                             metadata={"help": "Weights of the DPO and NLL terms (official 0.01)."})


def turn_states(trajectories: Sequence[Mapping[str, Any]], fraction: float = 0.1, seed: int = 0) -> list[dict]:
    """The turn states of offline trajectories: for every agent turn, the dialogue before it (ending with the user's
    message) with the task's ``hidden_info``; a random ``fraction`` of them (official ``data_fraction=0.1``: "DPO can
    easily overfit using turn-wise advantage if too many gradient steps")."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    states = []
    for i, row in enumerate(trajectories):
        validate_trajectory(row, where=f"trajectory {i}")
        messages = list(row["messages"])
        states += [{"task_id": row["task_id"], "history": messages[:t], "hidden_info": row["hidden_info"]}
                   for t, m in enumerate(messages) if m["role"] == "assistant"]
    rng = random.Random(seed)
    return rng.sample(states, max(1, round(fraction * len(states)))) if states else []


def sample_candidates(model, tokenizer, states: Sequence[Mapping[str, Any]], num_candidates: int = 16, *,
                      temperature: float = 1.0, max_new_tokens: int = 1024, batch_size: int = 16,
                      use_vllm: bool = False, vllm_kwargs: dict | None = None, seed: int = 0,
                      **generate_kwargs) -> list[list[str]]:
    """``num_candidates`` sampled next turns of the agent for each state's history (the agent never sees the
    hidden information): batched HF ``generate`` with a progress bar (:func:`hfx_trainers.selfplay.
    generate_completions`), or vLLM's offline engine with ``use_vllm=True`` (``model`` is then the agent's path)."""
    from .selfplay import generate_completions, vllm_completions

    histories = [list(s["history"]) for s in states]
    if use_vllm:
        if not isinstance(model, str):
            raise ValueError("use_vllm=True samples with vLLM from a saved model: pass the agent as a path")
        out = vllm_completions(model, tokenizer, histories, num_candidates, max_new_tokens, seed=seed,
                               vllm_kwargs=vllm_kwargs, temperature=temperature, **generate_kwargs)
    else:
        out = generate_completions(model, tokenizer, histories, num_candidates, max_new_tokens, batch_size,
                                   desc="SWEET-RL candidate turns", do_sample=True, temperature=temperature,
                                   **generate_kwargs)
    return [[c[-1]["content"] for c in row] for row in out]


def last_turn_mean_logps(model, tokenizer, conversations: Sequence[Sequence[Mapping[str, str]]],
                         batch_size: int = 16) -> torch.Tensor:
    """Mean token log-prob (N,) of each conversation's last assistant turn under ``model`` (its tokens from the
    chat template's generation markers, as the critic is trained)."""
    device = next(model.parameters()).device
    rows = []
    for conversation in conversations:
        ids, turns = assistant_turn_ids(tokenizer, conversation)
        last = max(turns)
        rows.append((ids, [t == last for t in turns]))
    means = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk], device=device)
            attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk], device=device)
            target = torch.tensor([m + [False] * (width - len(m)) for _, m in chunk], device=device)[:, 1:]
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
            means.append((logps * target).sum(1) / target.sum(1).clamp(min=1))
    finally:
        model.train(was_training)
    return torch.cat(means).cpu()


def rank_candidates(critic, reference, tokenizer, states: Sequence[Mapping[str, Any]],
                    candidates: Sequence[Sequence[str]], *, beta: float = 0.1,
                    hidden_info_template: str = SweetCriticConfig.hidden_info_template,
                    reference_sees_hidden_info: bool = True, batch_size: int = 16) -> list[list[float]]:
    """Score each candidate turn with the critic: β·(mean log π_critic(a | history, c) − mean log π_ref(a | ...)).

    With ``reference_sees_hidden_info=True`` (default) the reference is conditioned like the critic, so the score is
    the per-turn advantage the critic was trained to express; ``False`` reproduces the official ranking, where the
    second term is the sampling policy's log-prob without the hidden information."""
    def with_hidden(state, history):
        if not hidden_info_template:
            return list(history)
        return [{"role": "system", "content": hidden_info_template.format(hidden_info=state["hidden_info"])},
                *history]

    critic_convs, ref_convs = [], []
    for state, cands in zip(states, candidates, strict=True):
        for text in cands:
            turn = [*state["history"], {"role": "assistant", "content": text}]
            critic_convs.append(with_hidden(state, turn))
            ref_convs.append(with_hidden(state, turn) if reference_sees_hidden_info else turn)
    scores = beta * (last_turn_mean_logps(critic, tokenizer, critic_convs, batch_size)
                     - last_turn_mean_logps(reference, tokenizer, ref_convs, batch_size))
    out, k = [], 0
    for cands in candidates:
        out.append(scores[k:k + len(cands)].tolist())
        k += len(cands)
    return out


def policy_pairs(states: Sequence[Mapping[str, Any]], candidates: Sequence[Sequence[str]],
                 scores: Sequence[Sequence[float]], num_pairs: int = 4, seed: int = 0) -> list[dict]:
    """Turn-level DPO pairs (spec §8.1): per state, ``num_pairs`` pairs of a candidate from the upper half of the
    critic's ranking (chosen) and one from the lower half (rejected), the history as the prompt."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    rng = random.Random(seed)
    rows = []
    for state, cands, score in zip(states, candidates, scores, strict=True):
        if len(cands) < 2:
            raise ValueError("ranking needs at least 2 candidates per state (num_candidates >= 2)")
        order = sorted(range(len(cands)), key=lambda i: -score[i])
        upper, lower = order[:len(order) // 2], order[len(order) // 2:]
        for _ in range(num_pairs):
            win, lose = rng.choice(upper), rng.choice(lower)
            if score[win] == score[lose]:
                continue  # a tie carries no preference
            rows.append({"prompt": list(state["history"]),
                         "chosen": [{"role": "assistant", "content": cands[win]}],
                         "rejected": [{"role": "assistant", "content": cands[lose]}],
                         "task_id": state["task_id"]})
    return rows


# --------------------------------------------------------------------------------------------------
# The whole run: critic, candidates, ranking, policy
# --------------------------------------------------------------------------------------------------


@dataclass
class SweetRLConfig(HfxArguments, DPOConfig):
    r"""Configuration of :class:`SweetRLTrainer`: the shared training arguments (``output_dir``, batch size, device,
    precision, ...) of a ``DPOConfig``, each stage's own settings, and the pipeline's (spec §8.2–§8.3 defaults).

    Critic: ``critic_learning_rate=2e-7``, ``critic_epochs=4``, ``beta=0.1``, ``advantage_normalization``,
    ``hidden_info_template``, ``min_best_reward=1.0`` (tasks whose best attempt reaches it give critic pairs).
    Candidates: ``data_fraction=0.1`` of the turn states, ``num_candidates=16`` at ``candidate_temperature=1.0``,
    ``candidate_max_new_tokens`` (HF ``generate``, or vLLM with ``use_vllm``/``vllm_kwargs``); ranking with ``reference_sees_hidden_info=True`` (False: the official ranking).
    Policy: ``policy_learning_rate=2e-7``, ``policy_epochs=1``, ``num_pairs=4`` per state, ``nll_coef=0.01``.
    ``critic_overrides``/``policy_overrides`` (dict or JSON) set any other field of :class:`SweetCriticConfig` /
    :class:`SweetPolicyConfig`.

    >>> SweetRLConfig(output_dir="sweet", use_cpu=True).num_candidates
    16
    """

    beta: float = field(default=0.1, metadata={"help": "β of the critic's advantage and of the policy's DPO."})
    critic_learning_rate: float = field(default=2e-7, metadata={"help": "Critic learning rate (official 2e-7)."})
    critic_epochs: float = field(default=4.0, metadata={"help": "Critic epochs (official 4)."})
    advantage_normalization: str = field(
        default="turn_mean_sum", metadata={"help": "'turn_mean_sum' (paper) or 'trajectory_mean' (official)."}
    )
    hidden_info_template: str = field(default=SweetCriticConfig.hidden_info_template,
                                      metadata={"help": "System message with the training-time information."})
    min_best_reward: float = field(default=1.0, metadata={"help": "A task gives critic pairs when its best attempt "
                                                                  "has at least this reward."})
    data_fraction: float = field(default=0.1, metadata={"help": "Share of turn states given candidates (official "
                                                                "0.1)."})
    num_candidates: int = field(default=16, metadata={"help": "Candidate next turns per state (official 16)."})
    candidate_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of candidates."})
    candidate_max_new_tokens: int = field(default=1024, metadata={"help": "Longest candidate turn (official 1024)."})
    generation_batch_size: int = field(default=16, metadata={"help": "States per generate/scoring call."})
    use_vllm: bool = field(default=False, metadata={"help": "Sample candidates with vLLM's offline engine (pip install "
                                                            "vllm; the agent given as a path)."})
    vllm_kwargs: dict | str | None = field(default=None, metadata={"help": "Keyword arguments of vllm.LLM (dict or "
                                                                           "JSON)."})
    reference_sees_hidden_info: bool = field(
        default=True, metadata={"help": "Ranking: the reference term is conditioned on the hidden information like "
                                        "the critic (the trained advantage); False: the official ranking."}
    )
    num_pairs: int = field(default=4, metadata={"help": "Turn-level pairs per state (official 4)."})
    policy_learning_rate: float = field(default=2e-7, metadata={"help": "Policy learning rate (official 2e-7)."})
    policy_epochs: float = field(default=1.0, metadata={"help": "Policy epochs (official 1)."})
    nll_coef: float = field(default=0.01, metadata={"help": "NLL weight on the chosen turn (official 0.01)."})
    critic_overrides: dict | str | None = field(default=None, metadata={"help": "Other SweetCriticConfig fields."})
    policy_overrides: dict | str | None = field(default=None, metadata={"help": "Other SweetPolicyConfig fields."})

    def __post_init__(self):
        import json

        name = "SweetRLConfig"
        for key in ("critic_overrides", "policy_overrides", "vllm_kwargs"):
            value = getattr(self, key)
            if isinstance(value, str):
                setattr(self, key, json.loads(value))
            elif value is not None and not isinstance(value, dict):
                raise ValueError(f"{name}.{key} must be a dict or a JSON object, got {type(value).__name__}")
        for key in ("num_candidates", "num_pairs", "generation_batch_size", "candidate_max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{name}.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_candidates < 2:
            raise ValueError(f"{name}.num_candidates must be >= 2: pairs come from the upper and lower half of the "
                             "ranking")
        if not 0 < self.data_fraction <= 1:
            raise ValueError(f"{name}.data_fraction must be in (0, 1], got {self.data_fraction}")
        if self.advantage_normalization not in SWEET_NORMALIZATIONS:
            raise ValueError(f"{name}.advantage_normalization must be one of {SWEET_NORMALIZATIONS}")
        super().__post_init__()

    def stage_config(self, stage: str):
        """The :class:`SweetCriticConfig` or :class:`SweetPolicyConfig` of a stage, in ``output_dir/<stage>``."""
        import dataclasses
        import os

        from transformers import TrainingArguments

        cls = SweetCriticConfig if stage == "critic" else SweetPolicyConfig
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingArguments)
                  if f.init and f.name not in ("learning_rate", "num_train_epochs", "output_dir")}
        shared = {k: v for k, v in shared.items() if not k.startswith("_")}
        dpo = {f.name: getattr(self, f.name) for f in dataclasses.fields(DPOConfig)
               if f.init and f.name in ("max_length", "truncation_mode", "padding_free", "dataset_num_proc",
                                        "model_init_kwargs", "disable_dropout")}
        if stage == "critic":
            own = {"learning_rate": self.critic_learning_rate, "num_train_epochs": self.critic_epochs,
                   "beta": self.beta, "advantage_normalization": self.advantage_normalization,
                   "hidden_info_template": self.hidden_info_template, **(self.critic_overrides or {})}
        else:
            own = {"learning_rate": self.policy_learning_rate, "num_train_epochs": self.policy_epochs,
                   "beta": self.beta, "loss_weights": [1.0, self.nll_coef], **(self.policy_overrides or {})}
        return cls(output_dir=os.path.join(self.output_dir, stage), **{**shared, **dpo, **own})


class SweetRLTrainer:
    r"""SWEET-RL (arXiv 2503.15478), one round: critic on trajectory pairs → candidate turns from the agent →
    critic ranking → turn-level DPO of the agent. Outputs go to ``args.output_dir/critic`` and ``.../policy``.

    ``train_dataset`` holds offline trajectories (:mod:`hfx_trainers.trajectories`: ``task_id``, ``messages``,
    ``reward``, ``hidden_info``; several attempts per task), e.g. from
    :func:`~hfx_trainers.trajectories.collect_trajectories`. ``model`` is the agent: a local path or a model.
    ``critic_model`` (a path or a model sharing the agent's tokenizer; default: the agent, as in the paper where both
    start from the same instruct model) is the critic's starting point and, frozen, its reference.

    Example::

        >>> from hfx_trainers.trajectories import collect_trajectories
        >>> rows = collect_trajectories("path/to/agent", attempts=3)  # doctest: +SKIP
        >>> SweetRLTrainer("path/to/agent", SweetRLConfig("sweet-run"), rows).train()  # doctest: +SKIP

    Also available as ``hfx.SweetRLTrainer`` / ``hfx.SweetRLConfig``.
    """

    _name = "SWEET-RL"
    _paper = SweetCriticTrainer._paper

    def __init__(self, model, args: SweetRLConfig | None = None, train_dataset=None, processing_class=None,
                 peft_config=None, critic_model=None):
        from transformers import AutoTokenizer

        from .trajectories import validate_trajectories

        if args is None:
            args = SweetRLConfig("sweet-rl")
        if not isinstance(args, SweetRLConfig):
            raise TypeError(f"SweetRLTrainer needs a SweetRLConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("SweetRLTrainer needs train_dataset: offline trajectories (task_id, messages, reward, "
                             "hidden_info), e.g. hfx_trainers.trajectories.collect_trajectories(model)")
        self.trajectories = [dict(r) for r in train_dataset]
        validate_trajectories(self.trajectories)
        if args.use_vllm and not isinstance(model, str):
            raise ValueError("use_vllm=True samples candidates with vLLM from a saved model: pass the agent as a path")
        self.model, self.args, self.peft_config = model, args, peft_config
        self.critic_model = model if critic_model is None else critic_model
        if processing_class is None:
            if not isinstance(model, str):
                raise ValueError("pass processing_class (the tokenizer) when model is not a path")
            processing_class = AutoTokenizer.from_pretrained(model)
        self.processing_class = processing_class
        self.history: dict[str, Any] = {}

    @staticmethod
    def _copy(model):
        """A path stays a path (each stage loads its own copy); a model is deep-copied."""
        import copy

        return model if isinstance(model, str) else copy.deepcopy(model)

    @staticmethod
    def _loaded(model):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model) if isinstance(model, str) else SweetRLTrainer._copy(model)

    def train(self) -> dict[str, Any]:
        """Run the round; returns a summary (pair counts, losses) also kept in ``self.history``."""
        critic = self.train_critic()
        states, candidates, scores = self.rank_turns(critic)
        del critic
        self.train_policy(policy_pairs(states, candidates, scores, self.args.num_pairs, self.args.seed))
        return self.history

    def train_critic(self):
        """Stage 1: the critic on best-vs-worse trajectory pairs; saved to ``output_dir/critic``; returns it."""
        from datasets import Dataset

        from .trajectories import critic_pairs

        args = self.args
        pairs = critic_pairs(self.trajectories, args.min_best_reward)
        if not pairs:
            raise ValueError(f"no critic pairs: no task has an attempt with reward >= min_best_reward "
                             f"({args.min_best_reward}) and a worse attempt; collect more attempts per task or "
                             "lower min_best_reward")
        critic = SweetCriticTrainer(self._copy(self.critic_model), args=args.stage_config("critic"),
                                    train_dataset=Dataset.from_list(pairs), processing_class=self.processing_class,
                                    peft_config=self.peft_config)
        out = critic.train()
        critic.save_model(critic.args.output_dir)
        self.history.update(critic_pairs=len(pairs), critic_loss=out.training_loss,
                            critic_losses=[h["loss"] for h in critic.state.log_history if "loss" in h],
                            critic_dir=str(critic.args.output_dir))
        return critic.model

    def rank_turns(self, critic, scorer=None):
        """Stage 2: a ``data_fraction`` of the turn states, ``num_candidates`` sampled next turns each, and their
        critic scores; returns ``(states, candidates, scores)``. ``scorer(states, candidates) -> scores`` replaces
        the critic's ranking (e.g. an oracle, to measure how much the ranking limits the policy)."""
        args, tokenizer = self.args, self.processing_class
        agent = self._loaded(self.model)
        states = turn_states(self.trajectories, args.data_fraction, args.seed)
        candidates = sample_candidates(self.model if args.use_vllm else agent, tokenizer, states,
                                       args.num_candidates, temperature=args.candidate_temperature,
                                       max_new_tokens=args.candidate_max_new_tokens,
                                       batch_size=args.generation_batch_size, use_vllm=args.use_vllm,
                                       vllm_kwargs=args.vllm_kwargs, seed=args.seed)
        if scorer is not None:
            scores = scorer(states, candidates)
        else:
            # The trained advantage's reference is the critic's frozen start; the official ranking's is the agent.
            separate = self.critic_model != self.model and args.reference_sees_hidden_info  # a path or a module
            reference = self._loaded(self.critic_model) if separate else agent
            scores = rank_candidates(critic, reference, tokenizer, states, candidates, beta=args.beta,
                                     hidden_info_template=args.hidden_info_template,
                                     reference_sees_hidden_info=args.reference_sees_hidden_info,
                                     batch_size=args.generation_batch_size)
        self.history["turn_states"] = len(states)
        return states, candidates, scores

    def train_policy(self, turn_pairs: list[dict]):
        """Stage 3: turn-level DPO (+ NLL on the chosen turn) of the agent on ``turn_pairs`` (from
        :func:`policy_pairs`); saved to ``output_dir/policy`` and kept as ``self.policy_model``."""
        import trl
        from datasets import Dataset

        from hfx.compose import extend

        if not turn_pairs:
            raise ValueError("no policy pairs: every state's candidates tied; raise num_candidates or "
                             "candidate_temperature")
        policy = extend(trl.DPOTrainer)(model=self._copy(self.model), args=self.args.stage_config("policy"),
                                        train_dataset=Dataset.from_list(turn_pairs),
                                        processing_class=self.processing_class, peft_config=self.peft_config)
        out = policy.train()
        policy.save_model(policy.args.output_dir)
        self.policy_model = policy.model
        self.history.update(policy_pairs=len(turn_pairs), policy_loss=out.training_loss,
                            policy_losses=[h["loss"] for h in policy.state.log_history if "loss" in h],
                            policy_dir=str(policy.args.output_dir))
        return policy.model
