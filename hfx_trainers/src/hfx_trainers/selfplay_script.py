"""``hfx spin|sppo|rspo|inpo`` and ``examples/{spin,sppo,rspo,inpo}.py``: a whole self-play run from the command line.

    hfx sppo                                             # toy arithmetic task, toy warm start, toy preference oracle
    hfx sppo --config examples/sppo.yaml --num_iterations 2
    hfx rspo --model_name_or_path ./my-sft --dataset_name ./prompts.jsonl --preference_model ./my-reward-model \\
             --regularizer '{"forward_kl_importance": 1, "reverse_kl": 5}' --output_dir rspo-run

Arguments (TRL-style: a YAML ``--config``, then flags) are those of :class:`SelfPlayScriptArguments`,
:class:`~hfx_trainers.selfplay.SelfPlayArguments`, the algorithm's config (``SPPOConfig``, ... with the ``hfx_*``
fields) and TRL's ``ModelConfig`` (``--model_name_or_path``, ``--use_peft``, ``--lora_r``, ...). Without a model the
run starts from the toy warm start; on a toy task the task metric is reported before and after every iteration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hfx.compose import extend
from hfx.registry import import_string
from hfx.scripts import TOY_PREFIX, model_or_warm_start

__all__ = ["ALGORITHMS", "SelfPlayScript", "SelfPlayScriptArguments", "inpo", "rspo", "spin", "sppo"]

ALGORITHMS = ("spin", "sppo", "rspo", "inpo")


@dataclass
class SelfPlayScriptArguments:
    dataset_name: str = field(
        default="toy:arithmetic",
        metadata={"help": "'toy:<task>' (a built-in hfx.toy task) or a local path/file for datasets.load_dataset. "
                          "It needs a `prompt` column; SPIN also the answer in `real`, `completion` or `chosen`."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split holding the prompts."})
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    preference_model: str | None = field(
        default=None,
        metadata={"help": "SPPO/RSPO/INPO: 'toy' (the toy task's oracle; default on toy tasks), 'pairrm', a local "
                          "reward-model path (AutoModelForSequenceClassification), or 'module:function', a reward "
                          "function f(prompts, completions) -> list[float] compared Bradley-Terry style."},
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "RSPO/INPO: the fixed π_ref (default: the starting model)."}
    )
    warm_start_steps: int | None = field(
        default=None, metadata={"help": "Without --model_name_or_path: steps of the toy warm start."}
    )


def load_prompts(script_args: SelfPlayScriptArguments):
    """The prompt dataset, and the toy task when the dataset is one (for its oracle and metric)."""
    name = script_args.dataset_name
    if name.startswith(TOY_PREFIX):
        from hfx.toy import get_task

        task = get_task(name[len(TOY_PREFIX):])
        dataset = task.dataset(script_args.dataset_train_split, format=task.sft_format)
    else:
        from datasets import load_dataset

        task = None
        dataset = load_dataset(name, script_args.dataset_config, split=script_args.dataset_train_split)
    if script_args.num_prompts is not None:
        dataset = dataset.select(range(min(script_args.num_prompts, len(dataset))))
    return dataset, task


def build_preference_model(spec: str | None, task: Any):
    """A preference model from its command-line form (see ``--preference_model``)."""
    from . import preference

    if spec is None or spec == "toy":
        if task is None or not hasattr(task, "prefer"):
            raise ValueError("--preference_model is required unless the dataset is a toy task with an oracle: give "
                             "'pairrm', a reward-model path or 'module:function'")
        return preference.from_pairwise(task.prefer)
    if spec == "pairrm":
        return preference.pairrm()
    if ":" in spec and not spec.startswith((".", "/")):
        return preference.from_reward_fn(import_string(spec))
    return preference.from_reward_model(spec)


class SelfPlayScript:
    """TRL's script protocol (``make_parser()``, ``main(...)``) for one self-play algorithm."""

    def __init__(self, algorithm: str):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown self-play algorithm {algorithm!r}; choose from {ALGORITHMS}")
        self.algorithm = algorithm

    def config_class(self):
        return extend(import_string(f"hfx_trainers.{self.algorithm}:{self.algorithm.upper()}Config"))

    def make_parser(self):
        from trl import ModelConfig, TrlParser

        from .selfplay import SelfPlayArguments

        return TrlParser((SelfPlayScriptArguments, SelfPlayArguments, self.config_class(), ModelConfig),
                         prog=f"hfx {self.algorithm}")

    def main(self, script_args, selfplay_args, training_args, model_args) -> dict:
        """Run the self-play loop; print and return the per-iteration history."""
        from trl import get_peft_config

        from .selfplay import SelfPlayDriver

        prompts, task = load_prompts(script_args)
        model_path = model_or_warm_start(model_args.model_name_or_path, task, script_args.warm_start_steps)
        init = {"revision": model_args.model_revision, "dtype": model_args.dtype,
                "attn_implementation": model_args.attn_implementation}
        init = {**{k: v for k, v in init.items() if v is not None}, **(training_args.model_init_kwargs or {})}
        training_args.model_init_kwargs = init or None
        driver = SelfPlayDriver(
            self.algorithm, model_path, training_args, prompts, selfplay_args,
            preference_model=None if self.algorithm == "spin" else build_preference_model(
                script_args.preference_model, task),
            ref_model=script_args.ref_model_name_or_path,
            peft_config=get_peft_config(model_args),
            eval_fn=None if task is None else task.evaluate,
        )
        final = driver.run()
        summary = {"algorithm": self.algorithm, "final_model": str(final),
                   "iterations": [{k: h[k] for k in ("iteration", "num_pairs", "train_loss", "eval_before",
                                                     "eval_after")} for h in driver.history]}
        print(json.dumps(summary, indent=2))
        return summary


spin, sppo, rspo, inpo = (SelfPlayScript(name) for name in ALGORITHMS)
