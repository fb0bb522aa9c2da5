"""RPGTrainer and DRPOTrainer: conformance (full fine-tune and LoRA), the loss against the pure functions on log-probs
computed here with plain forwards, groups kept intact, dynamic sampling, overlong shaping, the reference refresh,
bad input, and the registry/facade wiring.
"""

from __future__ import annotations

import doctest

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

import hfx
from hfx.registry import get_registry
from hfx.testing import (
    TrainerConformance,
    apply_offline_env,
    fast_training_args,
    make_tiny_datasets,
    shared_tiny_model_dir,
)
from hfx_trainers import drpo, rpg
from hfx_trainers.drpo import DRPOConfig, DRPOTrainer
from hfx_trainers.losses import RPG_ESTIMATORS, RPG_KL_KINDS, drpo_loss, rpg_loss
from hfx_trainers.rpg import RPGConfig, RPGTrainer


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    apply_offline_env(monkeypatch)


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def parity(completions, **kwargs):
    """A deterministic binary reward that varies between the tiny random model's completions."""
    return [float(sum(map(ord, _text(c))) % 2) for c in completions]


def prompts(n: int = 8) -> Dataset:
    return make_tiny_datasets(n)["prompt_only"]


def args_for(config_cls, output_dir, **overrides):
    base = {"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 8, "warmup_steps": 0}
    return fast_training_args(config_cls, output_dir, **{**base, **overrides})


# --------------------------------------------------------------------------------------------------
# Conformance: 2 steps on the tiny model change every trainable parameter
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
class TestRPGConformance(TrainerConformance):
    supports_peft = True

    def make_trainer(self, model_path, output_dir, peft_config=None):
        args = args_for(RPGConfig, output_dir, beta=0.1)
        return RPGTrainer(model=str(model_path), reward_funcs=parity, args=args, train_dataset=prompts(),
                          peft_config=peft_config)


@pytest.mark.floor
class TestRPGReinforceConformance(TrainerConformance):
    families = ("llama",)

    def make_trainer(self, model_path, output_dir, peft_config=None):
        args = args_for(RPGConfig, output_dir, beta=0.1, estimator="reinforce", kl_type="rkl")
        return RPGTrainer(model=str(model_path), reward_funcs=parity, args=args, train_dataset=prompts())


@pytest.mark.floor
class TestDRPOConformance(TrainerConformance):
    supports_peft = True

    def make_trainer(self, model_path, output_dir, peft_config=None):
        args = args_for(DRPOConfig, output_dir)
        return DRPOTrainer(model=str(model_path), reward_funcs=parity, args=args, train_dataset=prompts(),
                           peft_config=peft_config)


# --------------------------------------------------------------------------------------------------
# The trainers' loss equals the pure functions on log-probs computed here
# --------------------------------------------------------------------------------------------------


def plain_token_logps(model, inputs, temperature: float) -> torch.Tensor:
    """Per-token completion log-probs (B, T) in float64 from a plain forward and log_softmax (no fused head)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.double() / temperature
    width = inputs["completion_ids"].size(1)
    logps = torch.log_softmax(logits[:, -width - 1:-1], dim=-1)
    return logps.gather(-1, inputs["completion_ids"][..., None])[..., 0]


def spy_losses(trainer, reference):
    """Record (the trainer's loss × accumulation steps, reference(model, inputs)) at every micro-step."""
    records, compute = [], trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        loss = compute(model, inputs, *args, **kwargs)
        records.append((loss.item() * trainer.current_gradient_accumulation_steps, reference(model, inputs)))
        return loss

    trainer.compute_loss = spy
    return records


@pytest.mark.parametrize("estimator", RPG_ESTIMATORS)
@pytest.mark.parametrize("kind", RPG_KL_KINDS)
def test_rpg_loss_equals_rpg_loss_on_plain_logps(kind, estimator, tmp_path):
    # num_iterations=2 reuses each rollout for a second step, so π_θ ≠ π_old there and the KL term is live.
    args = args_for(RPGConfig, tmp_path, beta=0.5, kl_type=kind, estimator=estimator, num_iterations=2,
                    max_steps=3, learning_rate=0.02, epsilon=0.05, epsilon_high=0.05)
    trainer = RPGTrainer(model=str(shared_tiny_model_dir()), reward_funcs=parity, args=args, train_dataset=prompts())

    def reference(model, inputs):
        logps = plain_token_logps(model, inputs, args.temperature)
        old = inputs.get("old_per_token_logps")
        old = logps if old is None else old.double()
        return rpg_loss(logps, old, inputs["advantages"].double(), inputs["completion_mask"].double(), kind=kind,
                        estimator=estimator, beta=0.5, epsilon_low=0.05, epsilon_high=0.05, clip_c=args.clip_c).item()

    records = spy_losses(trainer, reference)
    trainer.train()
    assert len(records) == 3
    for got, expected in records:
        assert got == pytest.approx(expected, abs=2e-5)
    assert any(h.get("kl", 0) != 0 for h in trainer.state.log_history), "the KL term never moved"


def test_rpg_fixed_reference_is_the_starting_model_and_refreshes(tmp_path):
    args = args_for(RPGConfig, tmp_path, beta=0.5, kl_reference="ref", ref_refresh_steps=2, max_steps=3,
                    learning_rate=0.02)
    trainer = RPGTrainer(model=str(shared_tiny_model_dir()), reward_funcs=parity, args=args, train_dataset=prompts())
    assert trainer.ref_model is not None and trainer.beta == 0.5 and trainer.args.sync_ref_model
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    ref = trainer.ref_model

    def reference(model, inputs):
        logps = plain_token_logps(model, inputs, args.temperature)
        with torch.no_grad():
            ref_logps = plain_token_logps(ref, inputs, args.temperature)
        return rpg_loss(logps, logps, inputs["advantages"].double(), inputs["completion_mask"].double(), kind="ufkl",
                        beta=0.5, clip_c=10.0, ref_logps=ref_logps).item()

    records = spy_losses(trainer, reference)
    trainer.train()
    for got, expected in records:
        assert got == pytest.approx(expected, abs=2e-5)
    # after the step-2 refresh π_ref holds the step-2 policy: not the start, and the policy moved on at step 3
    ref_params = dict(ref.named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ref_params[name], start[name])
    assert not torch.equal(ref_params[name], dict(trainer.model.named_parameters())[name])


def test_drpo_loss_equals_drpo_loss_with_intact_groups(tmp_path):
    # 2 micro-batches per generation (gradient accumulation) and a second pass over each rollout (num_iterations):
    # TRL's row shuffle would split groups across micro-batches; DRPO must not.
    args = args_for(DRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=2,
                    gradient_accumulation_steps=2, num_iterations=2, max_steps=4, learning_rate=0.02, temperature=0.7,
                    delta=0.0, beta=50.0, kl_estimator="k3")
    trainer = DRPOTrainer(model=str(shared_tiny_model_dir()), reward_funcs=parity, args=args, train_dataset=prompts())
    tokenizer = AutoTokenizer.from_pretrained(shared_tiny_model_dir())

    def reference(model, inputs):
        logps = plain_token_logps(model, inputs, 0.7)
        mask = inputs["completion_mask"].double()
        texts = tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(inputs["completion_ids"], mask)],
                                       skip_special_tokens=True)
        rewards = torch.tensor(parity(texts))
        prompts_seen = [tuple(ids[m.bool()].tolist()) for ids, m in zip(inputs["prompt_ids"], inputs["prompt_mask"])]
        groups = torch.tensor([sorted(set(prompts_seen)).index(p) for p in prompts_seen])
        assert torch.bincount(groups).tolist() == [2] * (len(groups) // 2), "a group was split"
        old = inputs.get("old_per_token_logps")
        old = logps if old is None else old.double()
        log_ratio = old - logps
        kl = ((log_ratio.exp() - log_ratio - 1) * mask).sum() / mask.sum()
        return drpo_loss((logps * mask).sum(1) / mask.sum(1), rewards, mask.sum(1), groups, max_length=8,
                         kl=kl, delta=0.0, beta=50.0).item()

    records = spy_losses(trainer, reference)
    trainer.train()
    assert len(records) == 8
    for got, expected in records:
        assert got == pytest.approx(expected, abs=2e-5)
    assert any(h.get("kl/coef", 0) > 0 for h in trainer.state.log_history), "the trust-region penalty never fired"


# --------------------------------------------------------------------------------------------------
# DAPO extras
# --------------------------------------------------------------------------------------------------


def test_dynamic_sampling_keeps_only_informative_groups(tmp_path):
    def mostly_constant(prompts, completions, **kwargs):
        # only questions "What is a + b?" with even a can get differing rewards
        return [parity([c])[0] if int(p.split()[2]) % 2 == 0 else 1.0 for p, c in zip(prompts, completions)]

    args = args_for(DRPOConfig, tmp_path, dynamic_sampling=True, max_steps=3, num_generations=4,
                    per_device_train_batch_size=8, max_completion_length=12)
    trainer = DRPOTrainer(model=str(shared_tiny_model_dir()), reward_funcs=mostly_constant, args=args,
                          train_dataset=prompts())
    seen = []
    compute = trainer.compute_loss

    def spy(model, inputs, *a, **k):
        seen.append(inputs["rewards"].view(-1, 4).clone())
        return compute(model, inputs, *a, **k)

    trainer.compute_loss = spy
    trainer.train()
    for rewards in seen:
        assert (rewards.max(1).values > rewards.min(1).values).all(), f"an uninformative group was kept: {rewards}"
    rounds = [h["dynamic_sampling/rounds"] for h in trainer.state.log_history if "dynamic_sampling/rounds" in h]
    assert rounds and max(rounds) >= 1


def test_overlong_shaping_adds_the_soft_penalty(tmp_path):
    # max_completion_length 8, buffer 4: an 8-token completion (the tiny model never stops early) gets −1·penalty
    args = args_for(RPGConfig, tmp_path, overlong_buffer_length=4, overlong_penalty=0.5, max_steps=1)
    trainer = RPGTrainer(model=str(shared_tiny_model_dir()), reward_funcs=parity, args=args, train_dataset=prompts())
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["rewards/overlong_penalty/mean"] == pytest.approx(-1.0)
    assert log["reward"] == pytest.approx(log["rewards/parity/mean"] - 0.5)


# --------------------------------------------------------------------------------------------------
# Configs and bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
def test_config_defaults(tmp_path):
    r = RPGConfig(output_dir=str(tmp_path), use_cpu=True)
    assert (r.beta, r.kl_type, r.estimator, r.kl_reference, r.clip_c, r.epsilon, r.epsilon_high) == (
        1e-4, "ufkl", "differentiable", "old", 10.0, 0.2, 0.28)
    assert (r.scale_rewards, r.learning_rate, r.weight_decay, r.loss_type) == ("none", 1e-6, 0.1, "bnpo")
    assert RPGConfig(output_dir=str(tmp_path), use_cpu=True, estimator="reinforce").clip_c == 3.0
    d = DRPOConfig(output_dir=str(tmp_path), use_cpu=True)
    assert (d.tau, d.lam, d.delta, d.beta, d.kl_estimator, d.temperature, d.learning_rate, d.num_generations) == (
        10.0, 0.1, 1e-4, 1e3, "k1", 0.6, 2e-6, 8)


@pytest.mark.parametrize(("config", "kwargs", "match"), [
    (RPGConfig, {"kl_type": "kl"}, "kl_type must be one of"),
    (RPGConfig, {"estimator": "ppo"}, "estimator must be one of"),
    (RPGConfig, {"clip_c": 0.5}, "clip_c must be > 1"),
    (RPGConfig, {"ref_refresh_steps": 4}, "set kl_reference='ref'"),
    (RPGConfig, {"loss_type": "grpo"}, "loss_type must be one of"),
    (RPGConfig, {"num_generations": 1, "per_device_train_batch_size": 1}, "at least 2 generations"),  # TRL's check
    (RPGConfig, {"top_entropy_quantile": 0.5}, "does not use top_entropy_quantile"),
    (DRPOConfig, {"overlong_buffer_length": 4, "max_completion_length": 8}, "rewards must stay binary"),
    (DRPOConfig, {"tau": 0.0}, "tau must be > 0"),
    (DRPOConfig, {"kl_estimator": "k2"}, "kl_estimator must be"),
])
def test_bad_config_is_named(config, kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        config(output_dir=str(tmp_path), use_cpu=True, **kwargs)


def test_bad_input_is_named(tmp_path):
    model = str(shared_tiny_model_dir())
    with pytest.raises(ValueError, match=r"needs a `prompt` column.*rename_column"):
        RPGTrainer(model=model, reward_funcs=parity, args=args_for(RPGConfig, tmp_path),
                   train_dataset=Dataset.from_dict({"question": ["1+1="] * 4}))
    with pytest.raises(ValueError, match="multiple of num_generations"):
        args_for(DRPOConfig, tmp_path, num_generations=4, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="needs reward_funcs"):
        RPGTrainer(model=model, args=args_for(RPGConfig, tmp_path), train_dataset=prompts())
    with pytest.raises(TypeError, match="needs a DRPOConfig"):
        DRPOTrainer(model=model, reward_funcs=parity, args=args_for(RPGConfig, tmp_path), train_dataset=prompts())


@pytest.mark.parametrize(("reward", "trainer", "config", "match"), [
    (lambda completions, **k: [float("nan")] * len(completions), RPGTrainer, RPGConfig, "returned NaN"),
    (lambda completions, **k: [0.0] * (len(completions) - 1), RPGTrainer, RPGConfig, "rewards, but"),
    (lambda completions, **k: [0.5] * len(completions), DRPOTrainer, DRPOConfig, "binary rewards"),
])
def test_bad_rewards_are_named(reward, trainer, config, match, tmp_path):
    t = trainer(model=str(shared_tiny_model_dir()), reward_funcs=reward, args=args_for(config, tmp_path),
                train_dataset=prompts())
    with pytest.raises(ValueError, match=match):
        t.train()


def test_drpo_reward_threshold_binarises(tmp_path):
    graded = lambda completions, **k: [0.3 + 0.6 * r for r in parity(completions)]  # noqa: E731
    args = args_for(DRPOConfig, tmp_path, reward_threshold=0.5, max_steps=1)
    DRPOTrainer(model=str(shared_tiny_model_dir()), reward_funcs=graded, args=args, train_dataset=prompts()).train()


# --------------------------------------------------------------------------------------------------
# Registry, facade, docs
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
@pytest.mark.parametrize(("name", "trainer", "config", "paper"), [
    ("rpg", RPGTrainer, RPGConfig, "2505.17508"),
    ("drpo", DRPOTrainer, DRPOConfig, "2510.04474"),
])
def test_registered_and_on_the_facade(name, trainer, config, paper):
    contribution = get_registry().get("trainer", name)
    assert contribution.load() is trainer and contribution.load("config") is config
    assert contribution.extras["dataset_format"] == "prompt" and contribution.paper[1] == paper
    assert getattr(hfx, f"{name.upper()}Trainer") is trainer and getattr(hfx, f"{name.upper()}Config") is config


@pytest.mark.parametrize("module", [rpg, drpo])
def test_docstring_examples(module):
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0



def test_command_line_needs_a_reward_for_real_data(tmp_path):
    from hfx_trainers.rl_script import RLScriptArguments
    from hfx_trainers.rl_script import rpg as script

    parser = script.make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config(args=[
        "--dataset_name", str(tmp_path / "prompts.jsonl"), "--model_name_or_path", str(shared_tiny_model_dir()),
        "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
    assert isinstance(script_args, RLScriptArguments)
    with pytest.raises(ValueError, match="needs --reward_funcs"):
        script.main(script_args, training_args, model_args)


def test_command_line_reward_import_string_and_toy_task_args(tmp_path):
    from hfx_trainers.rl_script import drpo as script

    parsed = script.make_parser().parse_args_and_config(args=[
        "--model_name_or_path", str(shared_tiny_model_dir()), "--reward_funcs", "hfx.toy:reward_fn",
        "--task_args", '{"max_operand": 10}', "--max_steps", "1", "--num_generations", "2",
        "--per_device_train_batch_size", "2", "--max_completion_length", "3", "--output_dir", str(tmp_path),
        "--use_cpu", "true", "--report_to", "none"])
    summary = script.main(*parsed)
    assert summary["algorithm"] == "drpo" and 0.0 <= summary["after"] <= 1.0


# --------------------------------------------------------------------------------------------------
# Two processes (DDP over gloo): groups stay whole on one process and in one micro-batch
# --------------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, sys
import torch
from hfx.testing import apply_offline_env, fast_training_args, finish_distributed, make_tiny_datasets
from hfx_trainers.drpo import DRPOConfig, DRPOTrainer
from hfx_trainers.rpg import RPGConfig, RPGTrainer

apply_offline_env()
model, out = sys.argv[1], sys.argv[2]
data = make_tiny_datasets(16)["prompt_only"]

def parity(completions, **kwargs):
    return [float(sum(map(ord, c)) % 2) for c in completions]

result = {}
for name, config_cls, trainer_cls in (("drpo", DRPOConfig, DRPOTrainer), ("rpg", RPGConfig, RPGTrainer)):
    args = fast_training_args(config_cls, f"{out}/{name}", per_device_train_batch_size=4, num_generations=2,
                              gradient_accumulation_steps=2, max_steps=2, max_completion_length=6, warmup_steps=0,
                              learning_rate=0.01)
    trainer = trainer_cls(model=model, reward_funcs=parity, args=args, train_dataset=data)
    groups, compute = [], trainer.compute_loss

    def spy(model, inputs, *a, **k):
        rows = [tuple(ids[m.bool()].tolist()) for ids, m in zip(inputs["prompt_ids"], inputs["prompt_mask"])]
        counts = sorted(rows.count(r) for r in set(rows))
        groups.append({"counts": counts, "ids": inputs["group_ids"].tolist(),
                       "same_prompt_same_id": all((rows[i] == rows[j]) == (inputs["group_ids"][i] ==
                                                  inputs["group_ids"][j]) for i in range(len(rows))
                                                  for j in range(len(rows)))})
        return compute(model, inputs, *a, **k)

    trainer.compute_loss = spy
    trainer.train()
    checksum = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
    result[name] = {"groups": groups, "checksum": checksum, "world": trainer.args.world_size}
json.dump(result, open(f"{out}/rank{torch.distributed.get_rank()}.json", "w"))
finish_distributed()
"""


@pytest.mark.slow
def test_accelerate_launch_two_processes_keeps_groups(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (2 CPU processes over gloo): DRPO's micro-batches hold whole
    prompt groups on each process (2 micro-batches per generation), and both trainers end with the same parameters on
    both ranks."""
    import json
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = tmp_path / "ddp_rl.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29524",
           str(script), str(shared_tiny_model_dir()), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("drpo", "rpg"):
        assert [r[name]["world"] for r in ranks] == [2, 2]
        assert ranks[0][name]["checksum"] == pytest.approx(ranks[1][name]["checksum"], rel=1e-12)
    for rank in ranks:
        batches = rank["drpo"]["groups"]
        assert len(batches) == 4  # 2 steps × 2 micro-batches
        for batch in batches:
            assert batch["counts"] == [2, 2] and batch["same_prompt_same_id"], batch


@pytest.mark.parametrize("algorithm", ["rpg", "drpo"])
def test_demo_row(algorithm, tmp_path):
    from hfx.demo import DemoContext
    from hfx.toy import ArithmeticTask, CollaboratorTask, warm_start
    from hfx_trainers import rl_demo

    task = ArithmeticTask(max_operand=6)
    path = warm_start(task, 3, stop_at=None, cache_dir=tmp_path / "cache", hidden_size=32, num_hidden_layers=1)
    result = getattr(rl_demo, algorithm)(DemoContext(task, path, 2, 0, tmp_path / algorithm))
    assert 0.0 <= result["metric_after"] <= 1.0 and len(result["losses"]) == 2
    skipped = getattr(rl_demo, algorithm)(DemoContext(CollaboratorTask(), tmp_path, 2, 0, tmp_path / "d"))
    assert skipped["metric_after"] != skipped["metric_after"]  # NaN: no verifiable reward
