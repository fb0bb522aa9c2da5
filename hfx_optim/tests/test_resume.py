"""Every hfx-optim optimizer resumes through Trainer: checkpoint at step 2 + `resume_from_checkpoint` gives the same
parameters after 4 steps as an uninterrupted run (Trainer loads optimizer.pt with `weights_only=True`)."""

from __future__ import annotations

import pytest
import torch

import hfx
from hfx.registry import get_registry
from hfx.testing import fast_training_args, make_tiny_datasets, shared_tiny_model_dir

OPTIMIZERS = sorted(c.name for c in get_registry().contributions("optimizer") if c.plugin == "optim")
# The tiny model's matrices are 32 wide: low-rank methods need a small rank; a refresh every 2 steps puts one
# right after the resume point, so the projector's seed/state must have been restored too.
ARGS = {"galore2": {"rank": 4, "update_proj_gap": 2}, "fira": {"rank": 4, "update_proj_gap": 2},
        "frugal": {"update_gap": 2}}


def run(optimizer: str, output_dir, resume_from=None):
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    steps = []

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    args = fast_training_args(hfx.extend(SFTConfig), output_dir, max_steps=4, learning_rate=1e-2, save_strategy="steps",
                              save_steps=2, hfx_optimizer=optimizer, lr_scheduler_type="constant",
                              hfx_optimizer_args=ARGS.get(optimizer, {}))
    trainer = hfx.extend(SFTTrainer)(model=str(shared_tiny_model_dir("qwen2")), args=args,
                                     train_dataset=make_tiny_datasets()["language_modeling"], callbacks=[CountSteps()])
    trainer.train(resume_from_checkpoint=resume_from)
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, steps


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_equals_uninterrupted(optimizer, tmp_path):
    straight, steps = run(optimizer, tmp_path / "straight")
    resumed, resumed_steps = run(optimizer, tmp_path / "resumed", resume_from=str(tmp_path / "straight" / "checkpoint-2"))
    assert (steps, resumed_steps) == ([1, 2, 3, 4], [3, 4])  # really resumed, not retrained from scratch
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
