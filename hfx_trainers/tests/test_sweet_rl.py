"""SWEET-RL: conformance of both stages (critic and policy, full and LoRA; floor row too), the loss against sweet_critic_loss on plain-forward
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


def turn_pairs(n: int = 8) -> Dataset:
    """Policy-stage rows as policy_pairs makes them: the history as the prompt, one candidate turn each side."""
    return Dataset.from_list([{"prompt": dialogue("y?", "")[:3], "chosen": [{"role": "assistant", "content": str(11 + i)}],
                               "rejected": [{"role": "assistant", "content": str(12 + i)}]} for i in range(n)])


@pytest.mark.floor
class TestSweetPolicyConformance(TrainerConformance):
    """The policy stage: TRL's DPOTrainer (hfx-extended) with SweetPolicyConfig's DPO + NLL loss on turn pairs."""

    supports_peft = True

    def make_trainer(self, model_path, output_dir, peft_config=None):
        from trl import DPOTrainer

        import hfx
        from hfx_trainers.sweet_rl import SweetPolicyConfig

        args = fast_training_args(SweetPolicyConfig, output_dir, max_length=256)
        return hfx.extend(DPOTrainer)(model=str(model_path), args=args, train_dataset=turn_pairs(),
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


# --------------------------------------------------------------------------------------------------
# Policy stage
# --------------------------------------------------------------------------------------------------


def trajectories(n: int = 3) -> list[dict]:
    return [{"task_id": i, "messages": dialogue("y?", str(11 + i)), "reward": 1.0, "hidden_info": str(11 + i)}
            for i in range(n)]


def test_turn_states_are_the_histories_before_each_agent_turn():
    from hfx_trainers.sweet_rl import turn_states

    states = turn_states(trajectories(3), fraction=1.0)
    assert len(states) == 6  # 2 agent turns per trajectory
    assert {len(s["history"]) for s in states} == {1, 3}
    assert all(s["history"][-1]["role"] == "user" for s in states)
    assert all(s["hidden_info"] == str(11 + s["task_id"]) for s in states)
    assert len(turn_states(trajectories(3), fraction=0.5)) == 3
    with pytest.raises(ValueError, match="fraction"):
        turn_states(trajectories(1), fraction=0.0)


def test_policy_pairs_take_upper_half_over_lower_half():
    from hfx_trainers.sweet_rl import policy_pairs

    state = {"task_id": 0, "history": dialogue("y?", "11")[:1], "hidden_info": "11"}
    candidates = [["a", "b", "c", "d"]]
    rows = policy_pairs([state], candidates, [[0.4, -1.0, 2.0, 0.1]], num_pairs=20)
    assert len(rows) == 20
    assert {r["chosen"][0]["content"] for r in rows} <= {"c", "a"}
    assert {r["rejected"][0]["content"] for r in rows} <= {"d", "b"}
    assert all(r["prompt"] == state["history"] for r in rows)
    assert policy_pairs([state], [["a", "b"]], [[1.0, 1.0]], num_pairs=3) == []  # ties carry no preference


def test_rank_candidates_is_the_critics_last_turn_advantage(tmp_path):
    from transformers import AutoModelForCausalLM

    from hfx_trainers.losses import sweet_turn_advantage
    from hfx_trainers.sweet_rl import rank_candidates, sample_candidates

    tokenizer = AutoTokenizer.from_pretrained(shared_tiny_model_dir())
    reference = AutoModelForCausalLM.from_pretrained(shared_tiny_model_dir())
    critic = AutoModelForCausalLM.from_pretrained(shared_tiny_model_dir())
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(0.05 * torch.randn_like(p))
    states = [{"task_id": 0, "history": dialogue("y?", "11")[:3], "hidden_info": "11"},
              {"task_id": 1, "history": dialogue("y?", "12")[:1], "hidden_info": "12"}]
    candidates = sample_candidates(reference, tokenizer, states, num_candidates=3, max_new_tokens=4)
    assert [len(c) for c in candidates] == [3, 3] and all(isinstance(x, str) for c in candidates for x in c)
    same = rank_candidates(reference, reference, tokenizer, states, candidates)
    assert all(abs(x) < 1e-6 for row in same for x in row)  # critic = reference: no advantage
    scores = rank_candidates(critic, reference, tokenizer, states, candidates, beta=0.5)
    for state, cands, row in zip(states, candidates, scores):
        for text, score in zip(cands, row):
            conv = [{"role": "system", "content": f"In light that the final answer is: {state['hidden_info']}."},
                    *state["history"], {"role": "assistant", "content": text}]
            ids, turns = assistant_turn_ids(tokenizer, conv)
            lp = plain_token_logps(critic, ids)[None]
            ref = plain_token_logps(reference, ids)[None]
            advantage = sweet_turn_advantage(lp, ref, torch.tensor([turns[1:]]), beta=0.5)
            assert score == pytest.approx(advantage[0, max(turns)].item(), abs=1e-5)


def test_policy_stage_trains_dpo_plus_nll(tmp_path):
    from trl import DPOTrainer

    import hfx
    from hfx_trainers.losses import sweet_policy_loss
    from hfx_trainers.sweet_rl import SweetPolicyConfig

    rows = [{"prompt": dialogue("y?", "11")[:3], "chosen": [{"role": "assistant", "content": "11"}],
             "rejected": [{"role": "assistant", "content": "what"}]}]
    args = fast_training_args(SweetPolicyConfig, tmp_path, per_device_train_batch_size=1, max_steps=1,
                              max_length=256)
    trainer = hfx.extend(DPOTrainer)(model=str(shared_tiny_model_dir()), args=args,
                                     train_dataset=Dataset.from_list(rows))
    tokenizer = AutoTokenizer.from_pretrained(shared_tiny_model_dir())
    model = trainer.model
    side = {}
    prompt = tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    for name in ("chosen", "rejected"):  # TRL's completion: what follows the prompt and its generation header
        ids = tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0][name], tokenize=True,
                                            return_dict=True)["input_ids"]
        assert ids[:len(prompt)] == prompt
        lp = plain_token_logps(model, ids)[len(prompt) - 1:]
        side[name] = (lp.sum(), -lp.mean())
    expected = sweet_policy_loss(side["chosen"][0][None], side["rejected"][0][None], side["chosen"][0][None],
                                 side["rejected"][0][None], side["chosen"][1][None]).item()
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, abs=1e-4)  # log 2 + 0.01·NLL at step 1
    assert expected > 0.6932


def test_policy_loss_spec_vector():
    from hfx_trainers.losses import sweet_policy_loss

    args = [torch.tensor([x]) for x in (-30.0, -42.0, -31.0, -40.0)]
    assert sweet_policy_loss(*args, torch.tensor([0.0])).item() == pytest.approx(0.554355, abs=1e-6)
    assert sweet_policy_loss(*args, torch.tensor([0.85])).item() == pytest.approx(0.562855, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The whole round
# --------------------------------------------------------------------------------------------------


def offline_trajectories() -> list[dict]:
    rows = []
    for task in range(4):
        answer = str(11 + task)
        rows.append({"task_id": task, "messages": dialogue("y?", answer), "reward": 1.0, "hidden_info": answer})
        rows.append({"task_id": task, "messages": dialogue("hmm", str(20 + task)), "reward": 0.0,
                     "hidden_info": answer})
    return rows


def test_sweet_rl_round_trains_critic_then_policy(tmp_path):
    from hfx_trainers.sweet_rl import SweetRLConfig, SweetRLTrainer

    args = fast_training_args(SweetRLConfig, tmp_path, max_length=256, num_candidates=3, data_fraction=1.0,
                              num_pairs=2, candidate_max_new_tokens=4, critic_learning_rate=0.05,
                              policy_learning_rate=0.05)
    trainer = SweetRLTrainer(str(shared_tiny_model_dir()), args, offline_trajectories())
    summary = trainer.train()
    assert summary["critic_pairs"] == 4 and summary["turn_states"] == 16  # 8 trajectories × 2 agent turns
    assert 0 < summary["policy_pairs"] <= 32
    assert (tmp_path / "critic" / "model.safetensors").is_file() and (tmp_path / "policy" / "model.safetensors").is_file()
    critic_cfg = args.stage_config("critic")
    assert (critic_cfg.learning_rate, critic_cfg.max_steps, critic_cfg.beta) == (0.05, 2, 0.1)
    assert args.stage_config("policy").loss_weights == [1.0, 0.01]


@pytest.mark.parametrize("reference_sees_hidden_info", [True, False])
def test_separate_critic_model_starts_the_critic_and_is_its_reference(tmp_path, monkeypatch,
                                                                      reference_sees_hidden_info):
    """``critic_model``: the critic stage starts from it, and the ranking's reference is its frozen copy (the trained
    advantage) or, with ``reference_sees_hidden_info=False``, the agent (the official ranking)."""
    from transformers import AutoModelForCausalLM

    from hfx_trainers import sweet_rl
    from hfx_trainers.sweet_rl import SweetRLConfig, SweetRLTrainer

    agent_path = str(shared_tiny_model_dir())
    critic_init = AutoModelForCausalLM.from_pretrained(agent_path)
    with torch.no_grad():
        for p in critic_init.parameters():
            p.add_(0.1 * torch.randn_like(p))
    critic_init.save_pretrained(tmp_path / "critic_init")
    args = fast_training_args(SweetRLConfig, tmp_path / "run", max_length=256, num_candidates=2, data_fraction=0.25,
                              candidate_max_new_tokens=2, critic_learning_rate=1e-12,
                              reference_sees_hidden_info=reference_sees_hidden_info)
    trainer = SweetRLTrainer(agent_path, args, offline_trajectories(), critic_model=str(tmp_path / "critic_init"))
    critic = trainer.train_critic()
    start = dict(critic_init.named_parameters())
    for name, p in critic.named_parameters():
        torch.testing.assert_close(p.detach(), start[name].detach(), atol=1e-6, rtol=0)
    seen = {}

    def recording_rank(critic, reference, tokenizer, states, candidates, **kwargs):
        seen["ref"] = reference
        return [[0.0] * len(c) for c in candidates]

    monkeypatch.setattr(sweet_rl, "rank_candidates", recording_rank)
    trainer.rank_turns(critic)
    expected = critic_init if reference_sees_hidden_info else AutoModelForCausalLM.from_pretrained(agent_path)
    for (name, p), q in zip(seen["ref"].named_parameters(), expected.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=0, rtol=0, msg=name)


def test_sweet_rl_bad_input_is_named(tmp_path):
    from hfx_trainers.sweet_rl import SweetRLConfig, SweetRLTrainer

    with pytest.raises(ValueError, match="num_candidates must be >= 2"):
        SweetRLConfig(output_dir=str(tmp_path), num_candidates=1, use_cpu=True)
    args = fast_training_args(SweetRLConfig, tmp_path)
    with pytest.raises(ValueError, match="needs train_dataset"):
        SweetRLTrainer(str(shared_tiny_model_dir()), args)
    failed = [{**r, "reward": 0.0} for r in offline_trajectories()]
    with pytest.raises(ValueError, match="no critic pairs"):
        SweetRLTrainer(str(shared_tiny_model_dir()), args, failed).train()
    with pytest.raises(ValueError, match="reward must be a finite number"):
        SweetRLTrainer(str(shared_tiny_model_dir()), args, [{**offline_trajectories()[0], "reward": None}])


@pytest.mark.floor
def test_registered_and_on_the_facade():
    import hfx
    from hfx.registry import get_registry
    from hfx_trainers.sweet_rl import SweetRLConfig, SweetRLTrainer

    contribution = get_registry().get("trainer", "sweet-rl")
    assert contribution.load() is SweetRLTrainer and contribution.load("config") is SweetRLConfig
    assert contribution.paper[1] == "2503.15478"
    assert hfx.SweetRLTrainer is SweetRLTrainer and hfx.SweetRLConfig is SweetRLConfig


def test_docstring_examples():
    import doctest

    from hfx_trainers import sweet_rl, trajectories

    for module in (sweet_rl, trajectories):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


def expert_and_failed_rows(task, n: int = 3) -> list[dict]:
    """Per task, the expert demonstration and the same dialogue with a wrong answer, rewarded by replaying them."""
    rows = []
    for tid in task.task_ids("train")[:n]:
        good = task.demonstration(tid)
        bad = [*good[:-1], {"role": "assistant", "content": str(task.get(tid).hidden["answer"] + 1)}]
        rows += [{"task_id": tid, "messages": m, "reward": task.replay(tid, m),
                  "hidden_info": str(task.get(tid).hidden["answer"])} for m in (good, bad)]
    return rows


def test_demo_row(tmp_path, monkeypatch):
    """``hfx demo --task collaborator``: one round of the toy recipe from the warm start, success before/after and the
    critic's then the policy's losses (collection replaced by expert/failed dialogues: a 3-step warm start never
    succeeds, so it would give no critic pairs)."""
    import math

    from hfx.demo import DemoContext
    from hfx.toy import ArithmeticTask, CollaboratorTask, warm_start
    from hfx_trainers import sweet_rl_script, trajectories

    task = CollaboratorTask(max_operand=4)
    path = warm_start(task, 3, stop_at=None, cache_dir=tmp_path / "cache", hidden_size=32, num_hidden_layers=1)
    monkeypatch.setattr(trajectories, "collect_trajectories", lambda *a, **k: expert_and_failed_rows(task))
    monkeypatch.setitem(sweet_rl_script.TOY_RECIPE, "logging_steps", 1)
    result = sweet_rl_script.demo(DemoContext(task, path, 20, 0, tmp_path / "sweet"))
    assert 0.0 <= result["metric_before"] <= 1.0 and 0.0 <= result["metric_after"] <= 1.0
    assert len(result["losses"]) >= 2 and all(math.isfinite(x) for x in result["losses"])
    assert (tmp_path / "sweet" / "critic" / "model.safetensors").is_file()
    assert (tmp_path / "sweet" / "policy" / "model.safetensors").is_file()
    skipped = sweet_rl_script.demo(DemoContext(ArithmeticTask(), path, 20, 0, tmp_path / "d"))
    assert math.isnan(skipped["metric_after"])


def test_command_line_critic_model_reaches_the_trainer(tmp_path, monkeypatch):
    """`hfx sweet-rl --trajectories F --critic_model_name_or_path C`: the trainer gets C as its critic start."""
    import json

    from hfx_trainers import sweet_rl, sweet_rl_script

    data = tmp_path / "trajectories.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in offline_trajectories()))
    seen = {}

    class Recording:
        def __init__(self, model, args, rows, **kwargs):
            seen.update(model=model, rows=len(rows), **kwargs)

        def train(self):
            return {}

    monkeypatch.setattr(sweet_rl, "SweetRLTrainer", Recording)
    parsed = sweet_rl_script.make_parser().parse_args_and_config(args=[
        "--trajectories", str(data), "--model_name_or_path", str(shared_tiny_model_dir()),
        "--critic_model_name_or_path", "path/to/critic", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
    sweet_rl_script.main(*parsed)
    assert seen["critic_model"] == "path/to/critic" and seen["model"] == str(shared_tiny_model_dir())
    assert seen["rows"] == len(offline_trajectories())


@pytest.mark.slow
def test_hfx_sweet_rl_toy_path(tmp_path, monkeypatch, warm_start_home):
    """`hfx sweet-rl` with no arguments but the recipe: the toy warm start plays every train task 3 times, the critic
    and the policy train, and success is measured before and after on the eval tasks."""
    from hfx.cli import main as cli
    from hfx_trainers import sweet_rl_script

    monkeypatch.setenv("HFX_CACHE_DIR", str(warm_start_home))  # the session's warm start, trained once
    captured = {}
    real_main = sweet_rl_script.main
    monkeypatch.setattr(sweet_rl_script, "main", lambda *a: captured.setdefault("summary", real_main(*a)))
    argv = ["sweet-rl", "--output_dir", str(tmp_path / "out")]
    for key, value in sweet_rl_script.TOY_RECIPE.items():
        argv += [f"--{key}", str(value)]
    assert cli(argv) in (0, None)
    summary = captured["summary"]
    assert summary["critic_pairs"] > 50 and summary["policy_pairs"] > 50
    assert 0.0 < summary["before"] < 1.0 and 0.0 <= summary["after"] <= 1.0
    assert (tmp_path / "out" / "policy" / "model.safetensors").is_file()


def test_candidates_with_vllm(monkeypatch):
    """``use_vllm``: vLLM's offline engine gets the chat-templated histories (generation prompt included, as HF
    generation and TRL's training see them), ``num_candidates`` samples each at the candidate temperature, the seed
    and ``vllm_kwargs``; its texts come back as each state's candidates (a recording stand-in for vLLM)."""
    import sys
    from types import SimpleNamespace

    from hfx_trainers.sweet_rl import SweetRLConfig, SweetRLTrainer, sample_candidates

    calls = {}

    class LLM:
        def __init__(self, model, seed, **kwargs):
            calls["llm"] = {"model": model, "seed": seed, **kwargs}

        def generate(self, prompts, params):
            calls["prompts"], calls["params"] = prompts, vars(params)
            return [SimpleNamespace(outputs=[SimpleNamespace(text=f"c{i}-{j}") for j in range(params.n)])
                    for i in range(len(prompts))]

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=LLM, SamplingParams=SimpleNamespace))
    path = str(shared_tiny_model_dir("qwen2"))
    tok = AutoTokenizer.from_pretrained(path)
    states = [{"task_id": i, "history": dialogue("y?", str(11 + i))[:3], "hidden_info": str(11 + i)}
              for i in range(2)]
    out = sample_candidates(path, tok, states, 3, temperature=0.7, max_new_tokens=5, use_vllm=True,
                            vllm_kwargs={"gpu_memory_utilization": 0.3}, seed=4)
    assert out == [[f"c{i}-{j}" for j in range(3)] for i in range(2)]
    assert calls["llm"] == {"model": path, "seed": 4, "gpu_memory_utilization": 0.3}
    assert calls["params"] == {"n": 3, "max_tokens": 5, "temperature": 0.7, "top_p": 1.0, "top_k": -1, "seed": 4}
    for state, prompt in zip(states, calls["prompts"], strict=True):
        text = tok.apply_chat_template(state["history"], tokenize=False, add_generation_prompt=True)
        assert prompt["prompt_token_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert state["hidden_info"] not in text  # the hidden information never reaches the agent
    with pytest.raises(ValueError, match="pass the agent as a path"):
        sample_candidates(object(), tok, states, 2, use_vllm=True)
    with pytest.raises(ValueError, match="pass the agent as a path"):
        SweetRLTrainer(object(), SweetRLConfig("o", use_cpu=True, use_vllm=True),
                       [{"task_id": 0, "messages": dialogue("y?", "11"), "reward": 1.0, "hidden_info": "11"}],
                       processing_class=tok)
