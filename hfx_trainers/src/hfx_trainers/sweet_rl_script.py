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

__all__ = ["TOY_RECIPE", "SweetRLScriptArguments", "demo", "main", "make_parser"]

# The toy-scale recipe of examples/sweet_rl.yaml and `hfx demo` (measured in benchmarks/results/sweet_rl.md). The
# paper's (README): critic lr 2e-7 for 4 epochs, policy lr 2e-7 for 1 epoch, 16 candidates, 1024-token turns.
TOY_RECIPE = {
    "critic_learning_rate": 1e-4, "critic_epochs": 2, "policy_learning_rate": 3e-5, "policy_epochs": 1,
    "beta": 0.1, "data_fraction": 0.1, "num_candidates": 8, "num_pairs": 4, "candidate_max_new_tokens": 8,
    # NLL on the chosen turn: the paper's 0.01 lets turn-level DPO lower the chosen answers' likelihood on this tiny
    # model, so even a perfect ranking loses success (benchmarks/results/sweet_rl.md); 1.0 anchors it
    "nll_coef": 1.0,
    "per_device_train_batch_size": 16, "max_length": 256, "optim": "adamw_torch", "lr_scheduler_type": "constant",
    "use_cpu": True, "bf16": False, "report_to": "none", "save_strategy": "no", "logging_steps": 10,
}


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
    critic_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The critic's starting point (same tokenizer as the agent). Default: the agent."}
    )


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
                             peft_config=get_peft_config(model_args), critic_model=script_args.critic_model_name_or_path)
    summary = {"algorithm": "sweet-rl", **trainer.train()}
    if task is not None:
        summary.update(before=before, after=task.evaluate(trainer.policy_model, tokenizer),
                       trajectory_success=sum(r["reward"] for r in rows) / len(rows))
        print(f"hfx sweet-rl: {task.name} eval {task.metric_name} {before:.3f} -> {summary['after']:.3f} "
              f"({summary['critic_pairs']} critic pairs, {summary['policy_pairs']} turn pairs)")
    return summary


def demo(ctx) -> dict:
    """The ``hfx demo`` row (``hfx demo --task collaborator``): one SWEET-RL round with :data:`TOY_RECIPE` from the
    warm start (3 attempts on every train task); ``ctx.steps`` does not apply (a round is not step-based)."""
    import math

    from hfx.toy import CollaboratorTask

    if not isinstance(ctx.task, CollaboratorTask):
        print("hfx demo: sweet-rl needs the multi-turn collaborator task (hfx demo --task collaborator); skipped")
        return {"metric_after": math.nan}
    argv = ["--model_name_or_path", str(ctx.model_path), "--output_dir", str(ctx.output_dir), "--seed", str(ctx.seed)]
    for key, value in TOY_RECIPE.items():
        argv += [f"--{key}", str(value)]
    summary = main(*make_parser().parse_args_and_config(argv))
    return {"metric_before": summary["before"], "metric_after": summary["after"],
            "losses": summary["critic_losses"] + summary["policy_losses"]}
