"""SWEET-RL critic stage: conformance (full and LoRA), the loss against sweet_critic_loss on plain-forward
log-probs of the policy and the frozen reference with turns from the chat template, config and data errors."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from hfx.testing import TrainerConformance, apply_offline_env, fast_training_args, shared_tiny_model_dir
from hfx_trainers.losses import sweet_critic_loss
from hfx_trainers.sweet_rl import SweetCriticConfig, SweetCriticTrainer
from hfx_trainers.trajectories import assistant_turn_ids


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    apply_offline_env(monkeypatch)


def dialogue(first: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": "x=4, y is secret. x+y?"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "y=7"}, {"role": "assistant", "content": answer}]


def pairs(n: int = 8) -> Dataset:
    return Dataset.from_list([{"task_id": i, "hidden_info": str(11 + i), "chosen": dialogue("y?", str(11 + i)),
                               "rejected": dialogue("what is y" * (1 + i % 2), str(12 + i))} for i in range(n)])


def critic_args(output_dir, **overrides):
    return fast_training_args(SweetCriticConfig, output_dir, **{"max_length": 256, **overrides})


@pytest.mark.floor
class TestSweetCriticConformance(TrainerConformance):
    supports_peft = True

    def make_trainer(self, model_path, output_dir, peft_config=None):
        return SweetCriticTrainer(model=str(model_path), args=critic_args(output_dir), train_dataset=pairs(),
                                  peft_config=peft_config)


def plain_token_logps(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("normalization", ["turn_mean_sum", "trajectory_mean"])
def test_critic_loss_equals_sweet_critic_loss_on_plain_logps(normalization, tmp_path):
    data = pairs(4)
    args = critic_args(tmp_path, advantage_normalization=normalization, max_steps=2, learning_rate=0.05,
                       per_device_train_batch_size=4)
    trainer = SweetCriticTrainer(model=str(shared_tiny_model_dir()), args=args, train_dataset=data)
    tokenizer = AutoTokenizer.from_pretrained(shared_tiny_model_dir())
    system = [{"role": "system", "content": f"In light that the final answer is: {h}."} for h in data["hidden_info"]]
    tokenized = {side: [assistant_turn_ids(tokenizer, [s, *m]) for s, m in zip(system, data[side])]
                 for side in ("chosen", "rejected")}
    records, compute = [], trainer.compute_loss

    def spy(model, inputs, *a, **k):
        loss = compute(model, inputs, *a, **k)
        laid_out = [ids for side in ("chosen", "rejected") for ids, _ in tokenized[side]]
        for row, ids in zip(inputs["input_ids"].tolist(), laid_out):  # the batch is the dataset, in order
            assert row[:len(ids)] == ids
        sides = []
        for side in ("chosen", "rejected"):
            rows = tokenized[side]
            width = max(len(ids) for ids, _ in rows) - 1
            lp = torch.zeros(len(rows), width, dtype=torch.float64)
            ref, turns = torch.zeros_like(lp), torch.full((len(rows), width), -1)
            for i, (ids, t) in enumerate(rows):
                lp[i, :len(ids) - 1] = plain_token_logps(model, ids)
                ref[i, :len(ids) - 1] = plain_token_logps(trainer.ref_model, ids)
                turns[i, :len(ids) - 1] = torch.tensor(t[1:])
            sides.append((lp, ref, turns))
        expected = sweet_critic_loss(*sides[0], *sides[1], beta=0.1, normalization=normalization).mean()
        records.append((loss.item(), expected.item()))
        return loss

    trainer.compute_loss = spy
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    assert len(records) == 2
    assert records[0][0] == pytest.approx(0.693147, abs=1e-5)  # π_ψ = π_ref at step 1: log 2
    for got, expected in records:
        assert got == pytest.approx(expected, abs=1e-5)
    assert records[1][0] != pytest.approx(records[0][0], abs=1e-4)  # step 2 has moved off log 2


def test_bad_config_and_data_are_named(tmp_path):
    with pytest.raises(ValueError, match="advantage_normalization must be one of"):
        critic_args(tmp_path, advantage_normalization="mean")
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        critic_args(tmp_path, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="must contain '\\{hidden_info\\}'"):
        critic_args(tmp_path, hidden_info_template="answer:")
    rows = [{"task_id": 0, "messages": dialogue("y?", "11"), "reward": 1.0}]
    with pytest.raises(ValueError, match="critic_pairs"):
        SweetCriticTrainer(model=str(shared_tiny_model_dir()), args=critic_args(tmp_path),
                           train_dataset=Dataset.from_list(rows))
