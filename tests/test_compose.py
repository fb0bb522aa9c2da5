"""Composition: hfx_* config fields, hfx.extend and hfx.optimizer on Trainer, SFTTrainer and DPOTrainer, proven
with the test-only plugin (an optimizer wrapping SGD, a factory optimizer, an attention wrapping SDPA)."""

from __future__ import annotations

import pickle

import pytest
import torch

import hfx
from hfx.testing import assert_matches_sdpa, fast_training_args, make_tiny_datasets, params_changed, snapshot_params

pytestmark = pytest.mark.floor


def unwrap(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it in AcceleratedOptimizer


@pytest.fixture
def model_path(tiny_model_dir):
    return str(tiny_model_dir("qwen2"))


def sft(model_path, tmp_path, trainer_kwargs=None, **config):
    from trl import SFTConfig, SFTTrainer

    args = fast_training_args(hfx.extend(SFTConfig), tmp_path, **config)
    return hfx.extend(SFTTrainer)(model=model_path, args=args, train_dataset=make_tiny_datasets()["language_modeling"],
                                  **(trainer_kwargs or {}))


def dpo(model_path, tmp_path, trainer_kwargs=None, **config):
    from trl import DPOConfig, DPOTrainer

    args = fast_training_args(hfx.extend(DPOConfig), tmp_path, **config)
    return hfx.extend(DPOTrainer)(model=model_path, args=args, train_dataset=make_tiny_datasets()["preference"],
                                  **(trainer_kwargs or {}))


def plain_trainer(model_path, tmp_path, cls=None, **kwargs):
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from hfx.testing import FAST_TRAINING_ARGS

    tok = AutoTokenizer.from_pretrained(model_path)
    data = make_tiny_datasets()["language_modeling"].map(lambda r: tok(r["text"]), remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path), **{**FAST_TRAINING_ARGS, "gradient_checkpointing": False})
    return (cls or Trainer)(model=AutoModelForCausalLM.from_pretrained(model_path), args=args, train_dataset=data,
                            data_collator=DataCollatorForLanguageModeling(tok, mlm=False), **kwargs)


def test_hfx_optimizer_field_on_sft(with_test_plugin, model_path, tmp_path):
    from hfx_test_targets import WrappedSGD

    trainer = sft(model_path, tmp_path, hfx_optimizer="test_sgd", hfx_optimizer_args='{"momentum": 0.9}')
    before = snapshot_params(trainer.model)
    trainer.train()
    opt = unwrap(trainer.optimizer)
    assert type(opt) is WrappedSGD
    assert opt.defaults["lr"] == trainer.args.learning_rate and opt.defaults["momentum"] == 0.9
    assert params_changed(before, trainer.model)
    assert trainer.args.hfx_optimizer_args == {"momentum": 0.9}  # the JSON string became a dict


def test_hfx_optimizer_field_on_dpo(with_test_plugin, model_path, tmp_path):
    from hfx_test_targets import WrappedSGD

    trainer = dpo(model_path, tmp_path, hfx_optimizer="test_sgd")
    before = snapshot_params(trainer.model)
    trainer.train()
    assert type(unwrap(trainer.optimizer)) is WrappedSGD
    assert params_changed(before, trainer.model)


def test_optimizer_cls_and_kwargs_on_dpo_which_lacks_the_argument(with_test_plugin, model_path, tmp_path):
    from hfx_test_targets import WrappedSGD

    trainer = dpo(model_path, tmp_path, {"optimizer_cls_and_kwargs": hfx.optimizer("test_sgd", lr=0.2)})
    trainer.train()
    opt = unwrap(trainer.optimizer)
    assert type(opt) is WrappedSGD and opt.defaults["lr"] == 0.2


def test_hfx_optimizer_on_plain_trainer(with_test_plugin, model_path, tmp_path):
    from hfx_test_targets import WrappedSGD
    from transformers import Trainer

    # not extended: Trainer's own optimizer_cls_and_kwargs path, lr taken from the args by hfx.optimizer(args=...)
    trainer = plain_trainer(model_path, tmp_path)
    trainer.optimizer_cls_and_kwargs = hfx.optimizer("test_sgd", args=trainer.args)
    trainer.train()
    assert type(unwrap(trainer.optimizer)) is WrappedSGD
    assert unwrap(trainer.optimizer).defaults["lr"] == trainer.args.learning_rate
    # extended, with the field passed to the constructor (plain TrainingArguments has no hfx fields)
    trainer = plain_trainer(model_path, tmp_path, cls=hfx.extend(Trainer), hfx_optimizer="test_sgd")
    before = snapshot_params(trainer.model)
    trainer.train()
    assert type(unwrap(trainer.optimizer)) is WrappedSGD and params_changed(before, trainer.model)


def test_factory_optimizer_gets_the_model(with_test_plugin, model_path, tmp_path):
    from hfx_test_targets import SGDFactory, WrappedSGD

    SGDFactory.calls.clear()
    trainer = sft(model_path, tmp_path, hfx_optimizer="test_factory")
    trainer.train()
    assert type(unwrap(trainer.optimizer)) is WrappedSGD
    assert SGDFactory.calls == [["model.embed_tokens.weight"]]


def test_hfx_attention_function(with_test_plugin, model_path, tmp_path):
    from hfx_test_targets import CALLS

    trainer = sft(model_path, tmp_path, hfx_attention="test_sdpa")
    assert trainer.model.config._attn_implementation == "hfx_test_sdpa"
    calls = CALLS["attention"]
    trainer.train()
    assert CALLS["attention"] > calls
    assert_matches_sdpa(trainer.model.eval())  # registered with its mask: padding is respected


def test_hfx_attention_apply_with_options(with_test_plugin, model_path, tmp_path):
    trainer = dpo(model_path, tmp_path, hfx_attention="test_apply", hfx_attention_args={"factor": 2.0})
    assert trainer.model.hfx_applied == {"factor": 2.0}
    with pytest.raises(ValueError, match="plain attention function and takes no options"):
        sft(model_path, tmp_path, hfx_attention="test_sdpa", hfx_attention_args={"factor": 2.0})


def test_bad_inputs_name_the_fix(with_test_plugin, model_path, tmp_path):
    with pytest.raises(ValueError, match=r"hfx_optimizer='nope'.*available: .*test_factory, test_sgd"):
        sft(model_path, tmp_path, hfx_optimizer="nope")
    with pytest.raises(ValueError, match=r"hfx_kernels must be one of auto, torch, triton"):
        sft(model_path, tmp_path, hfx_kernels="cuda")
    with pytest.raises(ValueError, match=r"hfx_optimizer_args must be a dict or a JSON object"):
        sft(model_path, tmp_path, hfx_optimizer_args="{momentum")
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"conflicts with the optimizer passed to the trainer"):
        sft(model_path, tmp_path, {"optimizers": (opt, None)}, hfx_optimizer="test_sgd")


def test_kernel_backend_field(with_test_plugin, model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HFX_KERNELS", "triton")
    assert hfx.kernel_backend() == "triton"
    sft(model_path, tmp_path, hfx_kernels="torch")
    assert hfx.kernel_backend() == "torch"  # the trainer's field wins over the environment
    sft(model_path, tmp_path)
    assert hfx.kernel_backend() == "triton"


def test_extend_is_cached_and_checks_its_argument():
    from transformers import Trainer, TrainingArguments

    assert hfx.extend(Trainer) is hfx.extend(Trainer) is hfx.extend(hfx.extend(Trainer))
    assert issubclass(hfx.extend(Trainer), Trainer)
    assert issubclass(hfx.extend(TrainingArguments), TrainingArguments)
    with pytest.raises(TypeError, match=r"takes a transformers\.Trainer subclass or a TrainingArguments dataclass"):
        hfx.extend(dict)


def test_extended_config_pickles(tmp_path):
    from trl import DPOConfig

    args = hfx.extend(DPOConfig)(output_dir=str(tmp_path), hfx_optimizer="mars", hfx_optimizer_args={"gamma": 0.1},
                                 beta=0.3, report_to="none", use_cpu=True, bf16=False)
    copy = pickle.loads(pickle.dumps(args))
    assert type(copy) is type(args)
    assert (copy.hfx_optimizer, copy.hfx_optimizer_args, copy.beta) == ("mars", {"gamma": 0.1}, 0.3)
    torch.save(args, tmp_path / "training_args.bin")  # what Trainer does on save


def test_optimizer_defaults_from_plugins_toml(with_test_plugin):
    (with_test_plugin / "plugins.toml").write_text("[testplugin]\nalpha = 2.0\n[testplugin.test_sgd]\nmomentum = 0.7\n")
    hfx.registry.reset()
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="x", learning_rate=0.3, weight_decay=0.01, report_to="none", use_cpu=True)
    _, kwargs = hfx.optimizer("test_sgd", args=args, lr=0.2)
    assert kwargs == {"lr": 0.2, "weight_decay": 0.01, "momentum": 0.7}  # explicit > plugins.toml > args
    _, kwargs = hfx.optimizer("test_factory", args=args)
    assert kwargs == {"lr": 0.3, "weight_decay": 0.01}  # read from the factory's __call__ signature


def test_only_user_set_adam_settings_are_forwarded(with_test_plugin):
    from transformers import TrainingArguments

    from hfx.compose import trainer_optimizer_defaults

    class Adamish(torch.optim.Adam):
        def __init__(self, params, lr=1e-3, betas=(0.95, 0.99), eps=1e-6, weight_decay=0.0):
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    untouched = TrainingArguments(output_dir="x", learning_rate=0.3, report_to="none", use_cpu=True)
    assert trainer_optimizer_defaults(Adamish, untouched) == {"lr": 0.3}  # the optimizer's own defaults stand
    changed = TrainingArguments(output_dir="x", adam_beta2=0.98, adam_epsilon=1e-7, weight_decay=0.1,
                                report_to="none", use_cpu=True)
    assert trainer_optimizer_defaults(Adamish, changed) == {"lr": 5e-5, "betas": (0.9, 0.98), "eps": 1e-7,
                                                            "weight_decay": 0.1}
