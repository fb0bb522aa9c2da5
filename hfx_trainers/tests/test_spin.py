"""SPINConfig / SPINTrainer (hfx_trainers.spin): conformance (full fine-tune and LoRA), the logged loss against
spin_loss on log-probs computed here with plain forwards of the policy and of the opponent, the step-0 identity
(policy = opponent ⇒ sigmoid loss = log 2), hinge and reference-free variants, config and dataset errors, and the
registry/facade wiring.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import DPOConfig

import hfx
from hfx.registry import get_registry
from hfx.testing import (
    TrainerConformance,
    apply_offline_env,
    fast_training_args,
    make_tiny_datasets,
    shared_tiny_model_dir,
    tiny_model,
)
from hfx_trainers.losses import spin_loss
from hfx_trainers.spin import SPINConfig, SPINTrainer


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    apply_offline_env(monkeypatch)


def spin_dataset(n: int = 8, names=("real", "generated")) -> Dataset:
    """The tiny preference set with SPIN's column names: real = the right answer, generated = a wrong one."""
    return make_tiny_datasets(n)["preference"].rename_columns({"chosen": names[0], "rejected": names[1]})


def spin_args(output_dir, **overrides) -> SPINConfig:
    # AdamW in tests: SPIN's default RMSprop at the kit's lr 0.1 takes steps of ~1 per weight.
    return fast_training_args(SPINConfig, output_dir, **{"max_length": 64, "optim": "adamw_torch", **overrides})


# --------------------------------------------------------------------------------------------------
# Conformance: 2 steps on the tiny model change every trainable parameter
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
class TestSPINConformance(TrainerConformance):
    supports_peft = True

    def make_trainer(self, model_path, output_dir, peft_config=None):
        return SPINTrainer(
            model=str(model_path), args=spin_args(output_dir), train_dataset=spin_dataset(), peft_config=peft_config
        )


class TestSPINHingeConformance(TrainerConformance):
    """The hinge variant, on DPO's column names (chosen = real, rejected = generated)."""

    def make_trainer(self, model_path, output_dir, peft_config=None):
        args = spin_args(output_dir, loss_type="hinge")
        ds = spin_dataset(names=("chosen", "rejected"))
        return SPINTrainer(model=str(model_path), args=args, train_dataset=ds, peft_config=peft_config)


# --------------------------------------------------------------------------------------------------
# The logged loss is spin_loss on independently computed log-probs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_type", "precompute"), [("sigmoid", False), ("hinge", False), ("sigmoid", True)], ids=str
)
def test_logged_loss_is_spin_loss_of_policy_and_opponent(tmp_path, loss_type, precompute, summed_logps, logged):
    path = shared_tiny_model_dir("qwen2")
    opponent = tiny_model("qwen2", seed=1)  # different weights than the policy, so the margin is not 0
    args = spin_args(tmp_path, max_steps=1, loss_type=loss_type, beta=0.5, precompute_ref_log_probs=precompute)
    # 2 rows, batch 2: the one training step sees the whole set, whatever the sampler's order
    trainer = SPINTrainer(model=str(path), ref_model=opponent, args=args, train_dataset=spin_dataset(2))
    rows = trainer.train_dataset
    trainer.train()

    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    opponent = tiny_model("qwen2", seed=1)
    pol_real = summed_logps(policy, rows["prompt_ids"], rows["chosen_ids"])
    pol_gen = summed_logps(policy, rows["prompt_ids"], rows["rejected_ids"])
    opp_real = summed_logps(opponent, rows["prompt_ids"], rows["chosen_ids"])
    opp_gen = summed_logps(opponent, rows["prompt_ids"], rows["rejected_ids"])
    want = spin_loss(pol_real, pol_gen, opp_real, opp_gen, beta=0.5, loss_type=loss_type)

    # independent of spin_loss: the formula of spec §2.1
    z = 0.5 * ((pol_real - opp_real) - (pol_gen - opp_gen))
    by_hand = F.softplus(-z) if loss_type == "sigmoid" else torch.relu(1 - z)
    torch.testing.assert_close(want, by_hand)
    assert abs(z).max() > 1e-3, "the opponent should differ from the policy"

    assert logged(trainer, "loss") == pytest.approx(want.mean().item(), rel=1e-4, abs=1e-5)
    assert logged(trainer, "rewards/real") == pytest.approx((0.5 * (pol_real - opp_real)).mean().item(), abs=1e-4)
    assert logged(trainer, "rewards/generated") == pytest.approx((0.5 * (pol_gen - opp_gen)).mean().item(), abs=1e-4)
    assert logged(trainer, "rewards/margins") == pytest.approx(z.mean().item(), abs=1e-4)
    assert logged(trainer, "logps/real") == pytest.approx(pol_real.mean().item(), abs=1e-4)
    if precompute:
        assert "ref_chosen_logps" in trainer.train_dataset.column_names  # the opponent ran once, before training


@pytest.mark.parametrize("precompute", [False, True], ids=["frozen_copy", "precomputed"])
def test_step0_policy_equals_opponent_sigmoid_is_log2(tmp_path, precompute, logged):
    args = spin_args(tmp_path, max_steps=1, precompute_ref_log_probs=precompute)
    trainer = SPINTrainer(model=str(shared_tiny_model_dir("qwen2")), args=args, train_dataset=spin_dataset(2))
    assert (trainer.ref_model is None) == precompute  # precomputed: one model in memory
    trainer.train()
    assert logged(trainer, "loss") == pytest.approx(math.log(2), abs=1e-6)
    assert logged(trainer, "rewards/margins") == pytest.approx(0.0, abs=1e-6)


def test_step0_lora_opponent_is_the_base_model(tmp_path, logged):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = spin_args(tmp_path, max_steps=2)
    trainer = SPINTrainer(
        model=str(shared_tiny_model_dir("qwen2")), args=args, train_dataset=spin_dataset(4), peft_config=peft_config
    )
    trainer.train()
    # LoRA's B starts at 0: policy = base = opponent at step 1; after a step at lr 0.1 it no longer is
    assert logged(trainer, "loss", 1) == pytest.approx(math.log(2), abs=1e-6)
    assert logged(trainer, "loss", 2) != pytest.approx(math.log(2), abs=1e-6)


def test_reference_free_loss(tmp_path, logged):
    args = spin_args(tmp_path, max_steps=1, per_device_train_batch_size=1, reference_free=True, beta=0.3)
    trainer = SPINTrainer(model=str(shared_tiny_model_dir("qwen2")), args=args, train_dataset=spin_dataset(1))
    trainer.train()
    real, generated = logged(trainer, "logps/real"), logged(trainer, "logps/generated")
    want = F.softplus(torch.tensor(-0.3 * (real - generated), dtype=torch.float64)).item()
    assert logged(trainer, "loss") == pytest.approx(want, rel=1e-5)
    assert logged(trainer, "loss") != pytest.approx(math.log(2), abs=1e-4)


def test_hfx_optimizer_field(tmp_path):
    pytest.importorskip("hfx_optim")
    from hfx_optim.mars import MARS

    args = spin_args(tmp_path, hfx_optimizer="mars", hfx_optimizer_args={"gamma": 0.025})
    trainer = SPINTrainer(model=str(shared_tiny_model_dir("qwen2")), args=args, train_dataset=spin_dataset(4))
    trainer.train()
    from hfx.testing import unwrap_optimizer

    assert isinstance(unwrap_optimizer(trainer.optimizer), MARS)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
def test_config_defaults(tmp_path):
    args = SPINConfig(output_dir=str(tmp_path), bf16=False)
    assert isinstance(args, DPOConfig)
    assert args.beta == 0.1 and args.loss_type == ["sigmoid"] and args.reference_free is False
    assert args.learning_rate == 5e-7 and str(getattr(args.optim, "value", args.optim)) == "rmsprop"
    assert args.hfx_optimizer is None and args.hfx_optimizer_args == {} and args.hfx_kernels == "auto"
    assert SPINConfig(output_dir=str(tmp_path), bf16=False, loss_type="hinge").loss_type == ["hinge"]
    assert SPINConfig(output_dir=str(tmp_path), bf16=False, loss_type=["hinge"]).loss_type == ["hinge"]


@pytest.mark.floor
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "ipo"}, r"loss_type must be one of 'sigmoid', 'hinge'; got 'ipo'"),
        ({"loss_type": ["sigmoid", "hinge"]}, "takes one loss"),
        ({"beta": 0.0}, "beta must be a positive number"),
        ({"beta": -1.0}, "beta must be a positive number"),
        ({"loss_weights": [1.0]}, "does not use loss_weights"),
        ({"ld_alpha": 0.5}, "does not use ld_alpha"),
        ({"f_divergence_type": "forward_kl"}, "does not use f_divergence_type"),
        ({"use_weighting": True}, "does not use use_weighting"),
        ({"label_smoothing": 0.1}, "does not use label_smoothing"),
        ({"hfx_kernels": "cuda"}, "hfx_kernels must be one of"),
        ({"hfx_optimizer_args": "{not json"}, "hfx_optimizer_args must be a dict"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)
def test_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPINConfig(output_dir=str(tmp_path), bf16=False, **kwargs)


def test_trainer_rejects_plain_dpo_config(tmp_path):
    with pytest.raises(TypeError, match="SPINTrainer needs a SPINConfig"):
        SPINTrainer(model="unused", args=DPOConfig(output_dir=str(tmp_path), bf16=False), train_dataset=spin_dataset(2))


# --------------------------------------------------------------------------------------------------
# Dataset columns (checked before any model is loaded)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        ({"prompt": ["q"], "real": [" a"]}, r"lacks the column\(s\) generated \(or rejected\).*\(π_t's\) own answers"),
        ({"prompt": ["q"], "completion": [" a"]}, r"real \(or chosen\), generated.*rename it to `real`"),
        ({"real": [" a"], "generated": [" b"]}, r"lacks the column\(s\) prompt\b"),
        ({"messages": [[{"role": "user", "content": "q"}]]}, r"prompt, real.*split conversational `messages`"),
        ({"prompt": ["q"], "real": [" a"], "chosen": [" a"], "generated": [" b"]}, "both 'real' and 'chosen'"),
    ],
    ids=["no_generated", "sft_completion", "no_prompt", "messages", "ambiguous"],
)
def test_dataset_column_errors(tmp_path, columns, match):
    args = spin_args(tmp_path)
    with pytest.raises(ValueError, match=match):
        SPINTrainer(model="not/loaded", args=args, train_dataset=Dataset.from_dict(columns))
    with pytest.raises(ValueError, match="the eval dataset"):
        SPINTrainer(model="not/loaded", args=args, train_dataset=spin_dataset(2), eval_dataset=Dataset.from_dict(columns))


def test_eval_dict_with_spin_columns(tmp_path):
    args = spin_args(tmp_path, max_steps=1, eval_strategy="no")
    evals = {"a": spin_dataset(2), "b": spin_dataset(2, names=("chosen", "rejected"))}
    trainer = SPINTrainer(
        model=str(shared_tiny_model_dir("qwen2")), args=args, train_dataset=spin_dataset(2), eval_dataset=evals
    )
    metrics = trainer.evaluate()
    assert math.isclose(metrics["eval_a_loss"], math.log(2), abs_tol=1e-6)
    assert math.isclose(metrics["eval_b_loss"], math.log(2), abs_tol=1e-6)


def test_docstring_examples():
    import doctest

    from hfx_trainers import spin

    result = doctest.testmod(spin, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 4


# --------------------------------------------------------------------------------------------------
# Registry and facade
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
def test_facade_and_registry():
    assert hfx.SPINTrainer is SPINTrainer and hfx.SPINConfig is SPINConfig
    contribution = get_registry().get("trainer", "spin")
    assert contribution.available and contribution.extras["dataset_format"] == "preference"
    assert contribution.paper[1] == SPINTrainer._paper["id"] == "2401.01335"
    assert SPINTrainer._name == "SPIN" and "spin" in SPINTrainer._tag_names


def test_hfx_spin_command_runs_the_self_play_loop_on_the_toy_task(tmp_path):
    from hfx.cli import main

    out = tmp_path / "out"
    argv = ["spin", "--model_name_or_path", str(shared_tiny_model_dir("qwen2")), "--dataset_name", "toy:arithmetic",
            "--num_prompts", "4", "--num_iterations", "1", "--max_new_tokens", "2", "--max_steps", "1",
            "--output_dir", str(out), "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
            "--save_strategy", "no", "--per_device_train_batch_size", "2", "--loss_type", "hinge", "--beta", "0.2",
            "--optim", "adamw_torch"]
    assert main(argv) == 0
    config = json.loads((out / "iteration-0" / "trainer_config.json").read_text())
    assert config["loss_type"] == ["hinge"] and config["beta"] == 0.2 and config["precompute_ref_log_probs"]
    state = json.loads((out / "iteration-0" / "state.json").read_text())
    assert state["algorithm"] == "spin" and state["num_prompts"] == 4
    assert state["num_pairs"] + state["ties_dropped"] == 4  # one generation per prompt, against its answer
    assert 0.0 <= state["eval_after"] <= 1.0  # the toy task's metric
