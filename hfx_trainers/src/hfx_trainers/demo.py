"""``hfx demo`` rows for the self-play trainers, and the toy recipe the benchmark reuses: 2 self-play iterations on
the toy arithmetic task from its warm start, reporting the task metric before and after.

The recipe is toy-scale, not the papers' (their β, η and learning rates are tuned for 7B models and a few thousand
steps): 1024 training prompts in 2 splits (512 per iteration), greedy/sampled answers of at most 5 tokens, one epoch
of AdamW at a constant 3e-5 per iteration, batch 32. The oracle ``task.prefer`` is the preference model of
SPPO/RSPO/INPO; SPIN's ground truth is the task's answer.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

# Per-algorithm hyper-parameters on the toy task (β = 1/η for SPPO/RSPO; η for INPO).
TOY_HPARAMS = {
    "spin": {"beta": 1.0},
    "sppo": {"beta": 0.5},
    "rspo": {"beta": 0.5, "reg_coef": 0.1},
    "inpo": {"eta": 0.1},
}
TOY_TRAIN = {"learning_rate": 3e-5, "optim": "adamw_torch", "lr_scheduler_type": "constant", "num_train_epochs": 1,
             "per_device_train_batch_size": 32, "max_length": 64}
TOY_SELFPLAY = {"num_iterations": 2, "max_new_tokens": 5, "prompt_splits": 2, "generation_batch_size": 128}
TOY_PROMPTS = 1024


def toy_run(algorithm: str, task: Any, model_path: str | Path, output_dir: str | Path, seed: int = 0,
            **overrides: Any):
    """Run :data:`TOY_SELFPLAY` iterations of ``algorithm`` on ``task`` (an ``hfx.toy.ArithmeticTask``); return the
    driver (its ``history`` holds ``eval_before``/``eval_after`` per iteration). ``overrides`` update the trainer
    config."""
    from importlib import import_module

    from .preference import from_pairwise
    from .selfplay import SelfPlayArguments, SelfPlayDriver

    config_cls = getattr(import_module(f"hfx_trainers.{algorithm}"), f"{algorithm.upper()}Config")
    args = config_cls(output_dir=str(output_dir), seed=seed, use_cpu=True, bf16=False, report_to="none",
                      save_strategy="no", logging_steps=1, disable_tqdm=True,
                      **{**TOY_TRAIN, **TOY_HPARAMS[algorithm], **overrides})
    prompts = task.dataset("train", format="prompt_completion")
    prompts = prompts.select(range(min(TOY_PROMPTS, len(prompts))))
    driver = SelfPlayDriver(
        algorithm, str(model_path), args, prompts,
        SelfPlayArguments(**TOY_SELFPLAY, generation_seed=seed, resume=False),
        preference_model=None if algorithm == "spin" else from_pairwise(task.prefer),
        eval_fn=task.evaluate,
    )
    driver.run()
    return driver


def demo(algorithm: str, ctx) -> dict:
    """One ``hfx demo`` row: the toy recipe (``ctx.steps`` is not used: each iteration trains one epoch)."""
    if not all(hasattr(ctx.task, name) for name in ("prefer", "answer")):
        print(f"hfx demo: {algorithm} needs a task with answers and a preference oracle (arithmetic); skipped")
        return {"metric_after": math.nan}
    driver = toy_run(algorithm, ctx.task, ctx.model_path, ctx.output_dir, seed=ctx.seed)
    losses = []
    for t in range(len(driver.history)):
        state = Path(driver.iteration_dir(t)) / "trainer_state.json"
        if state.is_file():
            losses += [h["loss"] for h in json.loads(state.read_text())["log_history"] if "loss" in h]
    return {"metric_before": driver.history[0]["eval_before"], "metric_after": driver.history[-1]["eval_after"],
            "losses": losses}


spin, sppo, rspo, inpo = (partial(demo, name) for name in TOY_HPARAMS)
