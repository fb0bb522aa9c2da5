"""``hfx sweet-rl`` and ``examples/sweet_rl.py``: a SWEET-RL round from the command line.

    hfx sweet-rl                                      # toy collaborator task: warm start, collect, critic, policy
    hfx sweet-rl --config examples/sweet_rl.yaml --attempts 3 --num_tasks 200
    hfx sweet-rl --model_name_or_path ./agent --trajectories ./offline.jsonl --output_dir sweet-run

Arguments (TRL-style: a YAML ``--config``, then flags) are those of :class:`SweetRLScriptArguments`,
:class:`~hfx_trainers.sweet_rl.SweetRLConfig` and TRL's ``ModelConfig``. Without ``--trajectories`` the agent (the toy
warm start by default) plays the toy collaborator task ``--attempts`` times per task to make them; on the toy task
the success rate is reported before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hfx.compose import extend

__all__ = ["SweetRLScriptArguments", "main", "make_parser"]


@dataclass
class SweetRLScriptArguments:
    trajectories: str | None = field(
        default=None, metadata={"help": "Offline trajectories (a JSON-lines file or a saved dataset) with task_id, "
                                        "messages, reward, hidden_info. Default: collect them on the toy task."}
    )
    num_tasks: int | None = field(default=None, metadata={"help": "Toy task: collect on the first N train tasks."})
    attempts: int = field(default=3, metadata={"help": "Toy task: attempts per task (official k = 3)."})
    collect_temperature: float = field(default=1.0, metadata={"help": "Toy task: sampling temperature."})
    warm_start_steps: int | None = field(default=None, metadata={"help": "Steps of the toy warm start."})


def make_parser():
    from trl import ModelConfig, TrlParser

    from .sweet_rl import SweetRLConfig

    return TrlParser((SweetRLScriptArguments, extend(SweetRLConfig), ModelConfig), prog="hfx sweet-rl")


def main(script_args: SweetRLScriptArguments, training_args, model_args) -> dict[str, Any]:
    from datasets import load_dataset, load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    from hfx.scripts import model_or_warm_start
    from hfx.toy import CollaboratorTask

    from .sweet_rl import SweetRLTrainer
    from .trajectories import collect_trajectories

    task = None if script_args.trajectories else CollaboratorTask()
    model_path = model_or_warm_start(model_args.model_name_or_path, task, script_args.warm_start_steps,
                                     missing="--model_name_or_path is required with --trajectories")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if task is None:
        path = script_args.trajectories
        rows = load_dataset("json", data_files=path, split="train") if path.endswith((".json", ".jsonl")) \
            else load_from_disk(path)
        before = None
    else:
        agent = AutoModelForCausalLM.from_pretrained(model_path)
        before = task.evaluate(agent, tokenizer)
        ids = task.task_ids("train")[:script_args.num_tasks]
        rows = collect_trajectories(agent, tokenizer, ids, make_env=task.env, max_turns=task.max_turns,
                                    attempts=script_args.attempts, temperature=script_args.collect_temperature,
                                    hidden_info=lambda t: f"{task.get(t).hidden['answer']}", seed=training_args.seed)
        del agent
    trainer = SweetRLTrainer(model_path, training_args, rows, processing_class=tokenizer,
                             peft_config=get_peft_config(model_args))
    summary = {"algorithm": "sweet-rl", **trainer.train()}
    if task is not None:
        summary.update(before=before, after=task.evaluate(trainer.policy_model, tokenizer),
                       trajectory_success=sum(r["reward"] for r in rows) / len(rows))
        print(f"hfx sweet-rl: {task.name} eval {task.metric_name} {before:.3f} -> {summary['after']:.3f} "
              f"({summary['critic_pairs']} critic pairs, {summary['policy_pairs']} turn pairs)")
    return summary
