"""SPPO — Self-Play Preference Optimization (Wu et al., ICLR 2025, arXiv 2405.00675; spec ``specs/trainers.md`` §3).

One SPPO *iteration* regresses the policy's log-ratio against the opponent π_t (the model at the start of the
iteration) onto η·(P − ½), where P is a response's estimated win rate against π_t and η = 1/β::

    ½·[(log π_θ(y_w)/π_t(y_w) − η(p_w − ½))² + (log π_θ(y_l)/π_t(y_l) − η(p_l − ½))²]

The dataset holds one (winner, loser) pair per prompt, picked from K samples of π_t, with their win rates:
``prompt, chosen, rejected, chosen_win_prob (p_w), rejected_win_prob (p_l)`` and, for ``loss_type="sppo_single"``,
``pair_win_prob`` (P(y_w ≻ y_l)). :func:`hfx_trainers.preference.select_pairs` builds these columns; the official
names ``chosen_probs_win``, ``chosen_probs_lose`` and ``chosen_probs`` are accepted too. π_t is DPO's reference
model: leave ``ref_model=None`` (a frozen copy of the starting weights, the PEFT base, or log-probs precomputed once
with ``precompute_ref_log_probs=True``).

Example::

    >>> args = SPPOConfig(output_dir="sppo-iter1", use_cpu=True)  # beta=0.001 (η=1000), RMSprop, lr 5e-7, 1 epoch
    >>> args.beta, args.loss_type, args.optim == "rmsprop", args.num_train_epochs
    (0.001, ['sppo'], True, 1.0)
    >>> from datasets import Dataset
    >>> ds = Dataset.from_dict({"prompt": ["2+3="], "chosen": ["5"], "rejected": ["6"],
    ...                         "chosen_win_prob": [0.9], "rejected_win_prob": [0.1]})
    >>> trainer = SPPOTrainer(model="path/to/model", args=args, train_dataset=ds)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from trl import DPOConfig

from hfx.compose import HfxArguments

from ._dpo_base import PairwiseTrainer, check_positive, reject_unused_dpo_options, reward_metrics, single_loss_type
from .losses import SPPO_LOSS_TYPES, implicit_reward, sppo_loss

__all__ = ["SPPO_COLUMN_ALIASES", "SPPOConfig", "SPPOTrainer", "sppo_required_columns"]

# The official SPPO dataset's column names -> ours (spec §3.2).
SPPO_COLUMN_ALIASES = {
    "chosen_probs_win": "chosen_win_prob",
    "chosen_probs_lose": "rejected_win_prob",
    "chosen_probs": "pair_win_prob",
}
WIN_PROB_COLUMNS = ("chosen_win_prob", "rejected_win_prob", "pair_win_prob")
_DESCRIBE = {
    "chosen_win_prob": "chosen_win_prob (p_w, official chosen_probs_win)",
    "rejected_win_prob": "rejected_win_prob (p_l, official chosen_probs_lose)",
    "pair_win_prob": "pair_win_prob (P(chosen ≻ rejected), official chosen_probs)",
}
_PAPER = {
    "title": "Self-Play Preference Optimization for Language Model Alignment",
    "id": "2405.00675",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @inproceedings{wu2025self,
            title        = {{Self-Play Preference Optimization for Language Model Alignment}},
            author       = {Yue Wu and Zhiqing Sun and Huizhuo Yuan and Kaixuan Ji and Yiming Yang and Quanquan Gu},
            year         = 2025,
            booktitle    = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
        }"""),
}


def sppo_required_columns(loss_type: str) -> list[str]:
    """The win-probability columns an SPPO loss variant reads."""
    return {"sppo": ["chosen_win_prob", "rejected_win_prob"], "sppo_single": ["pair_win_prob"]}.get(loss_type, [])


def win_prob_hints(missing: list[str], have: set[str]) -> list[str]:
    if any(c in missing for c in WIN_PROB_COLUMNS):
        return [
            "sample K answers per prompt with π_t, score them with a preference model and build the pairs with "
            "hfx_trainers.preference.select_pairs(...).to_columns(prompts, candidates) (the self-play driver does "
            "this), or use loss_type='sppo_hard' (hard labels, no probabilities)"
        ]
    return []


@dataclass
class SPPOConfig(HfxArguments, DPOConfig):
    r"""Configuration of :class:`SPPOTrainer`: a TRL ``DPOConfig`` with SPPO's defaults and the ``hfx_*`` fields.

    Defaults that differ from ``DPOConfig``, from the official SPPO pipeline (spec §3.3): ``beta=0.001`` (η = 1/β =
    1000), ``learning_rate=5e-7``, ``optim="rmsprop"``, ``num_train_epochs=1`` (the run scripts' ``--num 1``). The
    official warm-up ratio 0.1 is not a default: set ``warmup_steps=0.1`` (transformers ≥ 5) or ``warmup_ratio=0.1``
    (4.x).

    Parameters:
        loss_type (`str`, defaults to `"sppo"`):
            ``"sppo"`` (official: win rates p_w, p_l of both responses against π_t), ``"sppo_single"`` (one pairwise
            probability P(y_w ≻ y_l)) or ``"sppo_hard"`` (TRL's hard labels, twice the halved official form).

    >>> SPPOConfig(output_dir="out", loss_type="sppo_hard", use_cpu=True).loss_type
    ['sppo_hard']
    """

    learning_rate: float = field(default=5e-7, metadata={"help": "Initial learning rate (official SPPO: 5e-7)."})
    optim: str = field(default="rmsprop", metadata={"help": "Optimizer; official SPPO uses RMSprop."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs per iteration (official: 1)."})
    beta: float = field(default=0.001, metadata={"help": "1/η, the inverse step size (official 0.001, η = 1000)."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sppo"],
        metadata={"help": "SPPO loss: 'sppo' (default), 'sppo_single' or 'sppo_hard'.",
                  "choices": list(SPPO_LOSS_TYPES)},
    )

    def __post_init__(self):
        self.loss_type = single_loss_type(
            type(self).__name__, self.loss_type, SPPO_LOSS_TYPES, "For DPO losses use trl.DPOConfig/DPOTrainer."
        )
        check_positive(type(self).__name__, "beta", self.beta, "official SPPO: 0.001, i.e. η = 1000")
        reject_unused_dpo_options(self, type(self).__name__, "the SPPO loss regresses log-ratios onto η·(P − ½)")
        super().__post_init__()


class SPPOTrainer(PairwiseTrainer):
    r"""One SPPO iteration (arXiv 2405.00675): TRL's ``DPOTrainer`` with :func:`~hfx_trainers.losses.sppo_loss`.

    The train dataset holds ``prompt``, ``chosen``, ``rejected`` and the win probabilities the loss variant reads
    (``chosen_win_prob``/``rejected_win_prob`` for ``"sppo"``, ``pair_win_prob`` for ``"sppo_single"``, none for
    ``"sppo_hard"``). The opponent π_t is DPO's reference model, so leave ``ref_model=None``.

    Logged metrics: ``rewards/chosen`` and ``rewards/rejected`` (β·(log π_θ − log π_t), i.e. the log-ratio over η),
    their targets ``targets/chosen`` and ``targets/rejected`` (P − ½ on the same scale), ``rewards/margins``,
    ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``entropy``, ``mean_token_accuracy``.

    Example::

        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"prompt": ["2+3="], "chosen": ["5"], "rejected": ["6"],
        ...                         "chosen_win_prob": [0.9], "rejected_win_prob": [0.1]})
        >>> trainer = SPPOTrainer("path/to/model", args=SPPOConfig("out"), train_dataset=ds)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP

    Also available as ``hfx.SPPOTrainer`` / ``hfx.SPPOConfig``.
    """

    _tag_names = ["trl", "sppo", "hfx"]
    _name = "SPPO"
    _paper = _PAPER
    config_class = SPPOConfig
    column_aliases = SPPO_COLUMN_ALIASES
    scalar_columns = WIN_PROB_COLUMNS
    describe_columns = _DESCRIBE

    def required_columns(self, args) -> list[str]:
        return sppo_required_columns(args.loss_type[0])  # the config normalised it to a one-element list

    def column_hints(self, missing, have):
        return win_prob_hints(missing, have)

    def win_probs(self, inputs, like):
        """The probabilities the loss variant reads, on the log-probs' device."""
        loss_type = self.args.loss_type[0]
        if loss_type == "sppo":
            return inputs["chosen_win_prob"].to(like.device), inputs["rejected_win_prob"].to(like.device)
        if loss_type == "sppo_single":  # sppo_loss takes P(y_w ≻ y_l) as its chosen_win_prob
            return inputs["pair_win_prob"].to(like.device), None
        return None, None

    def _sppo_terms(self, chosen_logps, rejected_logps, opponent_chosen, opponent_rejected, inputs):
        """Per-example SPPO loss against the opponent π_t, and the log entries."""
        p_w, p_l = self.win_probs(inputs, chosen_logps)
        per_example = sppo_loss(chosen_logps, rejected_logps, opponent_chosen, opponent_rejected, p_w, p_l,
                                beta=self.beta, loss_type=self.args.loss_type[0])
        chosen_logps, rejected_logps = chosen_logps.detach(), rejected_logps.detach()
        metrics = reward_metrics(
            "chosen", "rejected",
            implicit_reward(chosen_logps, opponent_chosen, self.beta),
            implicit_reward(rejected_logps, opponent_rejected, self.beta),
            chosen_logps, rejected_logps,
        )
        # The regression targets on the rewards' scale, β·η(P − ½) = P − ½ (hard labels: P = 1 and 0).
        p_w = chosen_logps.new_ones(()) if p_w is None else p_w
        p_l = 1 - p_w if p_l is None else p_l
        metrics["targets/chosen"], metrics["targets/rejected"] = p_w - 0.5, p_l - 0.5
        return per_example, metrics

    def pair_loss(self, chosen_logps, rejected_logps, inputs):
        # π_t is DPO's reference model here
        opponent_chosen, opponent_rejected = (x.to(chosen_logps.device) for x in self.reference_logps(inputs))
        per_example, metrics = self._sppo_terms(chosen_logps, rejected_logps, opponent_chosen, opponent_rejected,
                                                inputs)
        return per_example.mean(), metrics
