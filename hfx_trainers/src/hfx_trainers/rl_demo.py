"""``hfx demo`` rows for the RL trainers (RPG, DRPO), and the toy recipe the benchmark reuses: online RL on the toy
arithmetic task from its warm start, with the task's binary reward, against TRL's ``GRPOTrainer`` as the baseline.

The recipe is toy-scale, not the papers' (their learning rates and β are tuned for 7B models over hundreds of steps
with 8-16 rollouts of thousands of tokens): AdamW at a constant learning rate, 8 completions of at most
:data:`TOY_RL` ``max_completion_length`` tokens per prompt at temperature 1, 8 prompts per step.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

# Shared by every method (GRPO baseline included), so that only the loss differs.
TOY_RL = {
    "max_steps": 600,  # the benchmark's run length; hfx demo passes its own --steps
    "learning_rate": 1e-4,
    "optim": "adamw_torch",
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "num_generations": 8,
    "per_device_train_batch_size": 64,
    "max_completion_length": 8,
    "temperature": 1.0,
}
# Per-method settings on the toy task; GRPO is TRL's defaults (DAPO token-mean loss, group-std advantages, no KL).
# RPG keeps its official recipe's dynamic sampling (groups whose answers are all right or all wrong are replaced).
TOY_HPARAMS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "rpg": {"beta": 1e-4, "dynamic_sampling": True},
    "drpo": {},
}
_CLASSES = {
    "grpo": ("trl", "GRPOConfig", "GRPOTrainer"),
    "rpg": ("hfx_trainers.rpg", "RPGConfig", "RPGTrainer"),
    "drpo": ("hfx_trainers.drpo", "DRPOConfig", "DRPOTrainer"),
}


def toy_trainer(algorithm: str, task: Any, model_path: str | Path, output_dir: str | Path, steps: int,
                seed: int = 0, **overrides: Any):
    """A ``algorithm`` trainer (``"grpo"``, ``"rpg"`` or ``"drpo"``) on ``task``'s train prompts with its reward,
    configured with :data:`TOY_RL` and :data:`TOY_HPARAMS` (``overrides`` update the config)."""
    from importlib import import_module

    module, config_name, trainer_name = _CLASSES[algorithm]
    module = import_module(module)
    config = getattr(module, config_name)(
        output_dir=str(output_dir), seed=seed, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, **{**TOY_RL, **TOY_HPARAMS[algorithm], "max_steps": steps, **overrides},
    )
    return getattr(module, trainer_name)(
        model=str(model_path), reward_funcs=task.reward_fn, args=config,
        train_dataset=task.dataset("train", format="prompt"),
    )


def mean_completion_length(trainer) -> float:
    """Mean completion length (tokens) over the run's logged steps."""
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return sum(lengths) / len(lengths) if lengths else math.nan


def demo(algorithm: str, ctx) -> dict:
    """One ``hfx demo`` row: ``ctx.steps`` RL steps from the warm start, then the task metric."""
    if not hasattr(ctx.task, "reward_fn") or not hasattr(ctx.task, "answer"):
        print(f"hfx demo: {algorithm} needs a task with a verifiable reward (arithmetic); skipped")
        return {"metric_after": math.nan}
    trainer = toy_trainer(algorithm, ctx.task, ctx.model_path, ctx.output_dir, ctx.steps, seed=ctx.seed)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"metric_after": ctx.task.evaluate(trainer.model, trainer.processing_class), "losses": losses}


rpg, drpo = (partial(demo, name) for name in ("rpg", "drpo"))
