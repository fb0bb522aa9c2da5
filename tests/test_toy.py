"""Tests of hfx.toy: tokenizer, arithmetic task, collaborator env, warm start."""

import collections
import json
import os
import re
import subprocess
import sys

import pytest

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
                     "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

from hfx import toy  # noqa: E402

EOS, PAD, IM_START = "<|im_end|>", "<|endoftext|>", "<|im_start|>"


def _sum_of(prompt):
    """Independent reference: evaluate 'a+b=' with Python."""
    a, b = prompt.rstrip("=").split("+")
    return int(a) + int(b)


# ---------------------------------------------------------------------------------------------------- import


def test_import_is_light():
    code = ("import sys, hfx.toy; heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_character_level_and_round_trips():
    tok = toy.tokenizer()
    for text in ["Hello, world! 12+34=46\n\t~", "x=11, y is secret. x+y?", "  leading and trailing  "]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per ASCII character
        assert tok.decode(ids) == text
    utf8 = "naïve – 日本"
    ids = tok(utf8, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(utf8.encode()) and tok.decode(ids) == utf8


def test_tokenizer_special_tokens():
    tok = toy.tokenizer()
    assert tok.pad_token == PAD and tok.eos_token == EOS
    ids = [tok.convert_tokens_to_ids(t) for t in (PAD, IM_START, EOS)]
    assert len(set(ids)) == 3 and tok.unk_token_id not in ids
    assert tok.pad_token_id == ids[0] and tok.eos_token_id == ids[2]
    assert len(tok) == 256 + 3
    # Each special token is one token, also inside text.
    assert tok(f"{IM_START}a{EOS}", add_special_tokens=False)["input_ids"] == [ids[1], ord("a"), ids[2]]
    # No BOS/EOS is added implicitly.
    assert tok("ab")["input_ids"] == tok("ab", add_special_tokens=False)["input_ids"]


def test_tokenizer_calls_return_independent_copies():
    first, second = toy.tokenizer(), toy.tokenizer()
    first.padding_side = "left"
    assert second.padding_side == "right" and toy.tokenizer().padding_side == "right"


def test_chat_template_renders_chatml():
    tok = toy.tokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nyo<|im_end|>\n")
    assert tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages[1:2], tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_chat_template_assistant_masks_multi_turn():
    tok = toy.tokenizer()
    messages = [{"role": "user", "content": "x=1, y is secret. x+y?"}, {"role": "assistant", "content": "y?"},
                {"role": "user", "content": "y=2"}, {"role": "assistant", "content": "3"}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    # Exactly the assistant contents with their end-of-turn token, nothing of the user turns.
    assert tok.decode(masked) == f"y?{EOS}3{EOS}"


# ---------------------------------------------------------------------------------------------------- arithmetic


def test_answer_and_malformed_prompt():
    task = toy.ArithmeticTask()
    assert task.answer("12+34=") == "46" and task.answer("99+99=") == "198"
    for bad in ["12-3=", "hello", "1+2", ""]:
        with pytest.raises(ValueError):
            task.answer(bad)


def test_reward_fn_correct_incorrect_garbage_and_extra_text():
    prompts = ["12+34="] * 10
    completions = ["46", "47", "abc", "", f"46{EOS}", f"46{EOS}999", " 46 ", "46 is the answer", "460",
                   "the answer is 46"]
    expected = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert toy.reward_fn(prompts, completions) == expected
    assert toy.ArithmeticTask(max_operand=10).reward_fn(prompts, completions) == expected
    # Text after eos must not count: a wrong answer followed by the right one after eos is wrong.
    assert toy.reward_fn(["12+34="], [f"45{EOS}46"]) == [0.0]


def test_reward_fn_answer_column_and_conversational_completions():
    # With the dataset's `answer` column the reward follows it (TRL passes extra columns as kwargs).
    assert toy.reward_fn(["1+1=", "1+1="], ["2", "3"], answer=["3", "3"]) == [0.0, 1.0]
    conversational = [[{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "6"}]]
    assert toy.reward_fn(["2+3=", "2+3="], conversational, completion_ids=None, trainer_state=None) == [1.0, 0.0]


def test_prefer():
    p = "12+34="
    assert toy.prefer(p, "46", "47") == 1.0
    assert toy.prefer(p, "47", "46") == 0.0
    assert toy.prefer(p, "46 and", "47") == 1.0  # correctness first, length second
    assert toy.prefer(p, "46", "46 because 12+34 is 46") == 1.0  # shorter wins among correct
    assert toy.prefer(p, "50", "50 whatever") == 1.0  # and among incorrect
    assert toy.prefer(p, "46", "46") == 0.5
    assert toy.prefer(p, "46", f"46{EOS}junk") == 0.5  # the text after eos does not count
    candidates = ["46", "47", "46xx", "", "abc", "4", f"46{EOS}", "460"]
    for a in candidates:
        for b in candidates:
            assert toy.prefer(p, a, b) + toy.prefer(p, b, a) == 1.0
            assert 0.0 <= toy.prefer(p, a, b) <= 1.0


def test_splits_disjoint_sized_and_deterministic():
    task = toy.ArithmeticTask(max_operand=30, seed=0)
    train, evals = task.prompts("train"), task.prompts("eval")
    assert len(evals) == 180 and len(train) == 900 - 180  # 20% eval when small
    assert not set(train) & set(evals)
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert all(_sum_of(p) >= 0 and max(map(int, p[:-1].split("+"))) < 30 for p in train + evals)
    assert toy.ArithmeticTask(max_operand=30, seed=0).prompts("eval") == evals
    assert toy.ArithmeticTask(max_operand=30, seed=1).prompts("eval") != evals
    default = toy.ArithmeticTask()
    assert len(default.prompts("eval")) == 200 and len(default.prompts("train")) == 9800
    small = toy.ArithmeticTask(max_operand=30, n_train=50, n_eval=10)
    assert len(small.prompts("train")) == 50 and len(small.prompts("eval")) == 10
    with pytest.raises(ValueError):
        toy.ArithmeticTask(max_operand=3, n_train=5, n_eval=5).prompts("train")
    with pytest.raises(ValueError):
        task.prompts("test")


@pytest.mark.parametrize("fmt, columns", [("prompt_completion", {"prompt", "completion"}),
                                          ("prompt", {"prompt", "answer"}),
                                          ("preference", {"prompt", "chosen", "rejected"})])
def test_dataset_formats(fmt, columns):
    task = toy.ArithmeticTask(max_operand=20, seed=3)
    for split in ("train", "eval"):
        ds = task.dataset(split, format=fmt)
        assert set(ds.column_names) == columns
        assert ds["prompt"] == task.prompts(split)
        target = {"prompt_completion": "completion", "prompt": "answer", "preference": "chosen"}[fmt]
        assert [int(x) for x in ds[target]] == [_sum_of(p) for p in ds["prompt"]]
        assert ds.to_dict() == task.dataset(split, format=fmt).to_dict()  # deterministic
    assert task.dataset("train", fmt)["prompt"] != toy.ArithmeticTask(max_operand=20, seed=4).dataset(
        "train", fmt)["prompt"]


def test_preference_rejected_answers_are_wrong_but_plausible():
    task = toy.ArithmeticTask(seed=1)
    ds = task.dataset("train", format="preference")
    rewards = task.reward_fn(ds["prompt"], ds["rejected"])
    assert sum(rewards) == 0.0
    assert all(r.isdigit() for r in ds["rejected"])  # well-formed numbers, not garbage
    assert all(abs(int(r) - _sum_of(p)) <= 10 for p, r in zip(ds["prompt"], ds["rejected"]))
    assert len(set(ds["rejected"])) > 50  # not one constant
    assert all(toy.prefer(p, c, r) == 1.0 for p, c, r in zip(ds["prompt"][:100], ds["chosen"], ds["rejected"]))


def test_dataset_bad_format():
    with pytest.raises(ValueError):
        toy.ArithmeticTask().dataset("train", format="messages")


class _StubLM:
    """A fake causal LM whose `generate` answers with a Python function of the prompt text. It checks that
    prompts arrive left-padded (every row ends with a real token) and appends eos then pads, like HF generate."""

    def __init__(self, tok, respond):
        import torch

        self.tok, self.respond, self.device, self.training, self.seen = tok, respond, torch.device("cpu"), True, []

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        import torch

        assert bool(attention_mask[:, -1].all()), "prompts must be left-padded"
        assert not self.training
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tok.decode([i for i, m in zip(ids, mask) if m])
            self.seen.append(prompt)
            new = self.tok(self.respond(prompt), add_special_tokens=False)["input_ids"] + [eos_token_id]
            rows.append(ids + new[:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def test_accuracy_with_stub_models():
    tok = toy.tokenizer()
    task = toy.ArithmeticTask(max_operand=12, seed=5)
    oracle = _StubLM(tok, lambda p: str(_sum_of(p)))
    assert task.accuracy(oracle, tok, split="eval", batch_size=7) == 1.0
    assert sorted(oracle.seen) == sorted(task.prompts("eval"))  # every eval prompt, exactly as given
    assert oracle.training  # training mode restored
    constant = _StubLM(tok, lambda p: "11")
    evals = task.prompts("eval")
    assert task.accuracy(constant, tok) == pytest.approx(sum(_sum_of(p) == 11 for p in evals) / len(evals))
    assert toy.accuracy(_StubLM(tok, lambda p: str(_sum_of(p) + 1)), task=task) == 0.0


# ---------------------------------------------------------------------------------------------------- collaborator


def _x_of(first_message):
    return int(re.search(r"x=(\d+)", first_message).group(1))


def test_collaborator_ask_then_answer_gets_reward():
    task = toy.CollaboratorTask()
    env = task.env()
    for tid in task.task_ids("train") + task.task_ids("eval"):
        first = env.reset(tid)
        reply, done = env.step("What is y?")
        assert not done and re.fullmatch(r"y=\d+", reply)
        assert env.reward() == 0.0  # outcome reward only
        answer = _x_of(first) + int(reply[2:])
        assert env.step(str(answer)) == (None, True)
        assert env.reward() == 1.0


def test_collaborator_wrong_answer_gets_nothing():
    task = toy.CollaboratorTask()
    env = task.env()
    first = env.reset(task.task_ids("eval")[0])
    reply, _ = env.step("y?")
    assert env.step(str(_x_of(first) + int(reply[2:]) + 1)) == (None, True)
    assert env.reward() == 0.0


def test_collaborator_guessing_without_asking_usually_fails():
    task = toy.CollaboratorTask()
    env = task.env()
    ids = task.task_ids("train")
    wins = 0
    for tid in ids:
        env.reset(tid)
        _, done = env.step(str(_x_of(env.messages[0]["content"]) + 5))  # guess y=5
        assert done
        wins += env.reward()
    assert wins / len(ids) < 0.2


def test_collaborator_demonstrations_replay_to_reward_one():
    task = toy.CollaboratorTask(seed=2)
    for tid in task.task_ids("train")[:50] + task.task_ids("eval")[:50]:
        demo = task.demonstration(tid)
        assert [m["role"] for m in demo] == ["user", "assistant", "user", "assistant"]
        env = task.env()
        assert env.reset(tid) == demo[0]["content"]
        for i, message in enumerate(demo[1:], start=1):
            if message["role"] == "assistant":
                reply, done = env.step(message["content"])
                if not done:
                    assert reply == demo[i + 1]["content"]  # the demo's user turns are what the env says
        assert done and env.reward() == 1.0
        assert task.replay(tid, demo) == 1.0
        assert task.replay(tid, demo[:2]) == 0.0  # asked but never answered


def test_collaborator_critic_context_opens_demonstrations_with_the_answer():
    plain = toy.CollaboratorTask()
    task = toy.CollaboratorTask(critic_context="the answer is {hidden_info}!")
    for tid in task.task_ids("train")[:20]:
        demo = task.demonstration(tid)
        assert demo[0] == {"role": "system", "content": f"the answer is {plain.get(tid).hidden['answer']}!"}
        assert demo[1:] == plain.demonstration(tid)
        assert task.replay(tid, demo) == 1.0
    assert task.dataset("train")["messages"][0][0]["role"] == "system"
    assert task.dataset("train", "prompt")["prompt"][0] == plain.dataset("train", "prompt")["prompt"][0]


def test_collaborator_malformed_input():
    task = toy.CollaboratorTask(max_turns=3)
    env = task.env()
    with pytest.raises(RuntimeError):
        env.step("y?")  # before reset
    with pytest.raises(KeyError):
        env.reset("no-such-task")
    tid = task.task_ids("eval")[1]
    env.reset(tid)
    with pytest.raises(TypeError):
        env.step(None)
    reply, done = env.step("")
    assert not done and reply and not reply.startswith("y=")  # nothing revealed without a question
    reply, done = env.step("blah 12")
    assert not done and not reply.startswith("y=")
    assert env.step("y?") == (None, True)  # the third agent turn is the last one: a question comes too late
    assert env.done and env.turns == 3 and env.reward() == 0.0
    with pytest.raises(RuntimeError):
        env.step("1")  # after done
    # An answer followed by eos and noise still counts as an answer.
    env.reset(tid)
    answer = task.get(tid).hidden["answer"]
    assert env.step(f" {answer}{EOS}garbage") == (None, True) and env.reward() == 1.0


def test_collaborator_splits_and_datasets():
    task = toy.CollaboratorTask(seed=0)
    train, evals = task.task_ids("train"), task.task_ids("eval")
    assert not set(train) & set(evals)
    pairs = lambda t, s: [(_x_of(t.get(i).prompt), t.get(i).hidden["y"]) for i in t.task_ids(s)]  # noqa: E731
    assert not set(pairs(task, "train")) & set(pairs(task, "eval"))
    assert pairs(task, "eval") == pairs(toy.CollaboratorTask(seed=0), "eval")
    assert pairs(task, "eval") != pairs(toy.CollaboratorTask(seed=1), "eval")
    for tid in train:
        item = task.get(tid)
        assert "y=" not in item.prompt and item.hidden["answer"] == _x_of(item.prompt) + item.hidden["y"]
    ds = task.dataset("train")
    assert ds.column_names == ["messages"] and len(ds) == len(train)
    assert all(task.replay(tid, m) == 1.0 for tid, m in zip(train, ds["messages"]))
    rl = task.dataset("eval", format="prompt")
    assert set(rl.column_names) == {"prompt", "task_id"} and rl["task_id"] == evals
    assert rl["prompt"][0] == [{"role": "user", "content": task.get(evals[0]).prompt}]


def _collaborator_oracle(prompt):
    """Reads the ChatML conversation: ask first, then answer x+y."""
    assert prompt.endswith(f"{IM_START}assistant\n")
    y = re.findall(r"user\ny=(\d+)", prompt)
    return str(_x_of(prompt) + int(y[-1])) if y else "y?"


def test_success_rate_with_stub_models():
    tok = toy.tokenizer()
    task = toy.CollaboratorTask(max_operand=8, seed=1)
    assert task.success_rate(_StubLM(tok, _collaborator_oracle), tok, batch_size=5) == 1.0
    records = task.rollouts(_StubLM(tok, _collaborator_oracle), tok, split="eval")
    assert [r["task_id"] for r in records] == task.task_ids("eval")
    assert all(r["messages"] == task.demonstration(r["task_id"]) for r in records)
    # Never asking: the model can only guess; always chatting: it runs out of turns.
    guesser = _StubLM(tok, lambda p: str(_x_of(p) + 3))
    evals = task.items("eval")
    assert task.success_rate(guesser, tok) == pytest.approx(sum(i.hidden["y"] == 3 for i in evals) / len(evals))
    chatter = _StubLM(tok, lambda p: "hm")
    assert task.success_rate(chatter, tok) == 0.0
    assert len(chatter.seen) == task.max_turns * len(evals)


# ---------------------------------------------------------------------------------------------------- warm start


def test_get_task():
    assert toy.get_task("arithmetic", max_operand=7) == toy.ArithmeticTask(max_operand=7)
    assert isinstance(toy.get_task("collaborator"), toy.CollaboratorTask)
    task = toy.ArithmeticTask(seed=9)
    assert toy.get_task(task) is task
    with pytest.raises(ValueError):
        toy.get_task("chess")
    with pytest.raises(TypeError):
        toy.get_task(task, seed=1)


def test_warm_start_cache_key_and_atomicity(tmp_path, monkeypatch):
    calls = []

    def fake_train(task, steps, seed, model_cfg, train_cfg, out, stop_at=None):
        calls.append((task, steps, seed, model_cfg, train_cfg, stop_at))
        (out / "weights").write_text("w")
        return {"eval_accuracy": 0.5}

    monkeypatch.setattr(toy, "_train", fake_train)
    monkeypatch.setenv("HFX_CACHE_DIR", str(tmp_path / "env"))
    path = toy.warm_start("arithmetic", 10, max_operand=10)
    assert path.parent == tmp_path / "env" / "warm_start" and (path / "weights").is_file()
    assert calls[-1][0] == toy.ArithmeticTask(max_operand=10) and calls[-1][1] == 10
    assert toy.warm_start("arithmetic", 10, max_operand=10) == path and len(calls) == 1  # cached
    assert toy.warm_start(toy.ArithmeticTask(max_operand=10), 10) == path and len(calls) == 1
    others = [toy.warm_start("arithmetic", 11, max_operand=10), toy.warm_start("arithmetic", 10, max_operand=11),
              toy.warm_start("arithmetic", 10, max_operand=10, seed=1),
              toy.warm_start("arithmetic", 10, max_operand=10, learning_rate=1e-3),
              toy.warm_start("arithmetic", 10, max_operand=10, hidden_size=64),
              toy.warm_start("arithmetic", 10, max_operand=10, stop_at=None),
              toy.warm_start("collaborator", 10, max_operand=10)]
    assert len({path, *others}) == 8 and len(calls) == 8
    stop_ats = [c[5] for c in calls]
    assert stop_ats[0] == toy.DEFAULT_STOP_AT["arithmetic"] and stop_ats[-1] == toy.DEFAULT_STOP_AT["collaborator"]
    assert stop_ats[-2] is None
    assert calls[-1][4]["assistant_only_loss"] is True  # multi-turn SFT learns the agent turns only
    assert calls[-4][4]["learning_rate"] == 1e-3 and calls[-3][3]["hidden_size"] == 64
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["eval_accuracy"] == 0.5 and metrics["settings"]["steps"] == 10
    # An explicit cache_dir wins over the environment; nothing temporary is left behind.
    assert toy.warm_start("arithmetic", 10, max_operand=10, cache_dir=tmp_path / "c").parent == tmp_path / "c"
    assert not [p for p in (tmp_path / "env" / "warm_start").iterdir() if p.name.startswith(".tmp")]


def test_warm_start_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(toy, "_train", broken)
    with pytest.raises(RuntimeError, match="boom"):
        toy.warm_start("arithmetic", 5, max_operand=10, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


FAST = dict(max_operand=10, hidden_size=64, num_hidden_layers=2, intermediate_size=128)
FAST_STEPS = 300


def test_warm_start_learns_and_caches(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = toy.warm_start("arithmetic", FAST_STEPS, stop_at=None, cache_dir=tmp_path, **FAST)
    task = toy.ArithmeticTask(max_operand=10)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    acc = toy.accuracy(model, task=task, tokenizer=tok)
    # Chance: the best constant answer is the most frequent sum of the eval problems.
    evals = task.prompts("eval")
    chance = max(collections.Counter(map(_sum_of, evals)).values()) / len(evals)
    assert acc >= max(0.5, 3 * chance), (acc, chance)
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["eval_accuracy"] == pytest.approx(acc)
    losses = [e["loss"] for e in json.loads((path / "log_history.json").read_text()) if "loss" in e]
    assert len(losses) >= 10 and losses[-1] < 0.5 * losses[0]
    assert sum(p.numel() for p in model.parameters()) < 200_000
    # Cached: same path, files untouched, and no training (a trainer call would fail).
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(toy, "_train", lambda *a, **k: pytest.fail("retrained"))
    assert toy.warm_start("arithmetic", FAST_STEPS, stop_at=None, cache_dir=tmp_path, **FAST) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_warm_start_collaborator_runs(tmp_path):
    path = toy.warm_start("collaborator", 4, cache_dir=tmp_path, max_operand=6, hidden_size=32,
                          num_hidden_layers=1, intermediate_size=64)
    metrics = json.loads((path / "metrics.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


@pytest.mark.slow
def test_warm_start_default_arithmetic(tmp_path):
    path = toy.warm_start("arithmetic", cache_dir=tmp_path)
    acc = toy.accuracy(path)
    assert 0.1 <= acc <= 0.8, acc  # far above chance (1%), far from solved
    assert json.loads((path / "metrics.json").read_text())["eval_accuracy"] == pytest.approx(acc)


@pytest.mark.slow
def test_warm_start_default_collaborator(warm_start_home):
    path = toy.warm_start("collaborator", cache_dir=warm_start_home / "warm_start")  # shared with the SWEET-RL toy test
    task = toy.CollaboratorTask()
    records = task.rollouts(path)
    rate = sum(r["reward"] for r in records) / len(records)
    assert 0.1 <= rate <= 0.9, rate
    assert sum(r["messages"][1]["content"].endswith("?") for r in records) / len(records) > 0.9  # learned to ask


def test_arithmetic_verbose_tail_only_lengthens_sft_completions():
    plain, verbose = toy.ArithmeticTask(max_operand=20), toy.ArithmeticTask(max_operand=20, verbose_tail=5)
    answers = plain.dataset("train")["completion"]
    tailed = verbose.dataset("train")["completion"]
    tails = [t[len(a):] for a, t in zip(answers, tailed)]
    assert all(t.startswith(a + " ") for a, t in zip(answers, tailed))
    assert {len(t) - 1 for t in tails} == set(range(6)) and all(set(t[1:]) <= {"."} for t in tails)
    prompts = verbose.prompts("train")
    assert verbose.reward_fn(prompts, tailed) == [1.0] * len(prompts)  # the reward ignores the tail
    assert verbose.dataset("train", "prompt")[:] == plain.dataset("train", "prompt")[:]


def test_collaborator_optimal_value_of_each_turn():
    task = toy.CollaboratorTask(max_turns=3)
    tid = task.task_ids("train")[0]
    item = task.get(tid)
    right, wrong = str(item.hidden["answer"]), str(item.hidden["answer"] + 1)
    user = {"role": "user", "content": item.prompt}

    def agent(text):
        return {"role": "assistant", "content": text}

    assert task.optimal_value(tid, [user, agent("y?")]) == 1.0                 # asked: answer next turn
    assert task.optimal_value(tid, [user, agent(wrong)]) == 0.0                # a wrong guess ends it
    assert task.optimal_value(tid, [user, agent("hm")]) == 1.0                 # 2 turns left: ask, answer
    assert task.optimal_value(tid, [user, agent("hm"), {"role": "user", "content": "Ask or answer."},
                                    agent("hm")]) == 0.0                       # 1 turn left, y unknown
    reply = {"role": "user", "content": f"y={item.hidden['y']}"}
    assert task.optimal_value(tid, [user, agent("y?"), reply, agent(right)]) == 1.0
    assert task.optimal_value(tid, [user, agent("y?"), reply, agent("ok")]) == 1.0  # one turn left, y known
    assert task.optimal_value(tid, task.demonstration(tid)) == task.replay(tid, task.demonstration(tid))


def test_play_episodes_continues_histories():
    """With histories the env replays each dialogue's agent turns and the model plays the rest: a wrong first guess
    ends at once (the model is never asked), a question gets the answer from the model, a stall leaves it the last
    turn; the turn budget counts the replayed turns."""
    tok = toy.tokenizer()
    task = toy.CollaboratorTask(max_turns=3)
    tid = task.task_ids("train")[0]
    item = task.get(tid)
    answer = item.hidden["answer"]
    model = _StubLM(tok, lambda p: str(answer))  # always answers right
    user = {"role": "user", "content": item.prompt}

    def agent(text):
        return {"role": "assistant", "content": text}

    histories = [[user, agent(str(answer + 1))], [user, agent("y?")], [user, agent("hm"), agent("hm")], [user]]
    episodes = toy.play_episodes(task.env, [tid] * 4, model, tok, max_turns=3, histories=histories, desc=None)
    assert [e["reward"] for e in episodes] == [0.0, 1.0, 1.0, 1.0]
    assert [sum(m["role"] == "assistant" for m in e["messages"]) for e in episodes] == [1, 2, 3, 1]
    assert episodes[1]["messages"][2] == {"role": "user", "content": f"y={item.hidden['y']}"}
    assert len(model.seen) == 3  # the ended episode never reached the model
    stalled = toy.play_episodes(task.env, [tid], _StubLM(tok, lambda p: "hm"), tok, max_turns=3,
                                histories=[[user, agent("y?")]], desc=None)[0]
    assert stalled["reward"] == 0.0 and sum(m["role"] == "assistant" for m in stalled["messages"]) == 3
    with pytest.raises(ValueError, match="2 dialogues for 1 task ids"):
        toy.play_episodes(task.env, [tid], model, tok, max_turns=3, histories=[[user], [user]])
