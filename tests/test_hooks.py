"""A recording plugin proves every hookspec is called at its documented point."""

from __future__ import annotations

import inspect

import pytest

import hfx
import hfx.hookspecs
from hfx import hookimpl
from hfx.registry import load, reset

pytestmark = pytest.mark.floor


class Recorder:
    """Implements every hookspec and records (hook, moment) in call order."""

    def __init__(self):
        self.calls: list[str] = []

    @hookimpl
    def hfx_register(self, registry):
        self.calls.append("register")

    @hookimpl
    def hfx_configure_model(self, model, args, trainer):
        assert trainer.state.global_step == 0  # before any training step
        self.calls.append(f"configure_model:{type(model).__name__}")

    @hookimpl
    def hfx_trainer_callbacks(self, trainer, args):
        from transformers import TrainerCallback

        recorder = self

        class StepRecorder(TrainerCallback):
            def on_train_begin(self, *a, **k):
                recorder.calls.append("callback:on_train_begin")

            def on_step_end(self, *a, **k):
                recorder.calls.append("callback:on_step_end")

        self.calls.append("trainer_callbacks")
        return [StepRecorder()]

    @hookimpl
    def hfx_create_optimizer(self, model, args, trainer):
        self.calls.append("create_optimizer")
        return None  # pass: the next implementation (or Trainer's default) decides

    @hookimpl
    def hfx_post_train(self, trainer, output):
        self.calls.append(f"post_train:{output.global_step}")


class FirstOptimizer:
    @hookimpl(tryfirst=True)
    def hfx_create_optimizer(self, model, args, trainer):
        import torch

        return torch.optim.SGD(model.parameters(), lr=0.05)


def test_recorder_implements_every_hookspec():
    specs = {n for n, f in inspect.getmembers(hfx.hookspecs, inspect.isfunction) if n.startswith("hfx_")}
    assert specs == {n for n in dir(Recorder) if n.startswith("hfx_")}


def _train(tiny_model_dir, tmp_path, recorder, extra_plugins=()):
    from trl import SFTConfig, SFTTrainer

    from hfx.testing import fast_training_args, make_tiny_datasets

    reset(load(plugins=[("recorder", recorder), *extra_plugins]))
    trainer = hfx.extend(SFTTrainer)(
        model=str(tiny_model_dir("qwen2")),
        args=fast_training_args(SFTConfig, tmp_path),
        train_dataset=make_tiny_datasets()["language_modeling"],
    )
    trainer.train()
    return trainer


def test_every_hook_is_called_in_order(isolated, tiny_model_dir, tmp_path):
    rec = Recorder()
    trainer = _train(tiny_model_dir, tmp_path, rec)
    assert rec.calls == [
        "register",
        "configure_model:Qwen2ForCausalLM",
        "trainer_callbacks",
        "create_optimizer",
        "callback:on_train_begin",
        "callback:on_step_end",
        "callback:on_step_end",
        "post_train:2",
    ]
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW"  # every implementation passed: Trainer's default


def test_create_optimizer_is_first_result(isolated, tiny_model_dir, tmp_path):
    rec = Recorder()
    trainer = _train(tiny_model_dir, tmp_path, rec, [("first", FirstOptimizer())])
    optimizer = trainer.optimizer.optimizer  # unwrap accelerate's AcceleratedOptimizer
    assert type(optimizer).__name__ == "SGD" and optimizer.defaults["lr"] == 0.05
    assert "create_optimizer" not in rec.calls  # a result from the tryfirst plugin stops the call
    reset()
