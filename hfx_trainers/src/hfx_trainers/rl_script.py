"""``hfx rpg|drpo`` and ``examples/{rpg,drpo}.py``: online RL from the command line.

    hfx rpg                                              # toy arithmetic task, its reward, from the toy warm start
    hfx drpo --config examples/drpo.yaml --task_args '{"verbose_tail": 8}'   # the toy task with verbose answers
    hfx rpg --model_name_or_path ./my-sft --dataset_name ./math.jsonl --reward_funcs my_rewards:accuracy \\
            --kl_type rkl --estimator reinforce --output_dir rpg-run

Arguments (TRL-style: a YAML ``--config``, then flags) are those of :class:`RLScriptArguments`, the trainer's config
(``RPGConfig``/``DRPOConfig`` with the ``hfx_*`` fields) and TRL's ``ModelConfig`` (``--model_name_or_path``,
``--use_peft``, ...). Without a model the run starts from the toy warm start; on a toy task the task metric is
reported before and after training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hfx.compose import extend
from hfx.registry import import_string
from hfx.scripts import TOY_PREFIX, HfxScriptArguments, model_or_warm_start

__all__ = ["RLScript", "RLScriptArguments", "drpo", "rpg"]


@dataclass
class RLScriptArguments(HfxScriptArguments):
    """``hfx <method>``'s dataset arguments (a toy task by default, or a local dataset with a ``prompt`` column and
    the columns the reward functions read), plus the toy task's fields and the reward functions."""

    task_args: str | None = field(
        default=None, metadata={"help": "Toy task fields as JSON, e.g. '{\"verbose_tail\": 8}'."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions: 'module:function' import strings (f(prompts, completions, **columns) -> "
                          "list[float]) or local reward-model paths. Default on toy tasks: the task's reward."},
    )


class RLScript:
    """``make_parser()``/``main(...)`` of one RL trainer (``"rpg"`` or ``"drpo"``)."""

    def __init__(self, name: str):
        self.name = name

    def classes(self):
        module = import_string(f"hfx_trainers.{self.name}")
        upper = self.name.upper()
        return extend(getattr(module, f"{upper}Config")), extend(getattr(module, f"{upper}Trainer"))

    def make_parser(self):
        from trl import ModelConfig, TrlParser

        return TrlParser((RLScriptArguments, self.classes()[0], ModelConfig), prog=f"hfx {self.name}")

    def main(self, script_args: RLScriptArguments, training_args, model_args) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import get_peft_config

        from .rl_demo import mean_completion_length

        task, dataset = None, None
        name = script_args.dataset_name
        if name.startswith(TOY_PREFIX):
            from hfx.toy import get_task

            task = get_task(name[len(TOY_PREFIX):], **json.loads(script_args.task_args or "{}"))
            if not hasattr(task, "reward_fn"):
                raise ValueError(f"toy task {task.name!r} has no verifiable reward; use --dataset_name toy:arithmetic")
            dataset = task.dataset(script_args.dataset_train_split, format="prompt")
        else:
            if script_args.task_args:
                raise ValueError("--task_args sets fields of a toy task; the dataset is not one")
            if not script_args.reward_funcs:
                raise ValueError(f"hfx {self.name} needs --reward_funcs for a dataset that is not a toy task, e.g. "
                                 "--reward_funcs my_module:accuracy_reward")
            from datasets import load_dataset

            dataset = load_dataset(name, script_args.dataset_config, split=script_args.dataset_train_split)
        if script_args.reward_funcs:
            rewards = [import_string(r) if ":" in r else r for r in script_args.reward_funcs]
        else:
            rewards = [task.reward_fn]
        model_path = model_or_warm_start(model_args.model_name_or_path, task, script_args.warm_start_steps)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        before = None
        if task is not None:
            before = task.evaluate(AutoModelForCausalLM.from_pretrained(model_path).eval(), tokenizer)
        trainer = self.classes()[1](model=model_path, reward_funcs=rewards, args=training_args,
                                    train_dataset=dataset, processing_class=tokenizer,
                                    peft_config=get_peft_config(model_args))
        trainer.train()
        trainer.save_model(training_args.output_dir)
        summary = {"algorithm": self.name, "output_dir": training_args.output_dir,
                   "mean_completion_length": mean_completion_length(trainer)}
        if task is not None:
            summary.update(before=before, after=task.evaluate(trainer.model.eval(), tokenizer))
            print(f"hfx {self.name}: {task.name} eval {task.metric_name} {before:.3f} -> {summary['after']:.3f}; "
                  f"mean completion length {summary['mean_completion_length']:.2f} tokens")
        return summary


rpg, drpo = RLScript("rpg"), RLScript("drpo")
