"""Trajectory format validation and the multi-turn turn map: on Llama-3-, Qwen-2.5- and ChatML-style chat templates
every agent turn's tokens, and only those, carry its turn number (token-level assertions, character tokenizer)."""

from __future__ import annotations

import pytest
from trl.chat_template_utils import llama3_chat_template, qwen2_5_chat_template

from hfx import toy
from hfx_trainers.trajectories import (
    assistant_turn_ids,
    collect_trajectories,
    critic_pairs,
    validate_trajectories,
    validate_trajectory,
)

MESSAGES = [
    {"role": "user", "content": "x=4, y is secret. x+y?"},
    {"role": "assistant", "content": "y?"},
    {"role": "user", "content": "y=7"},
    {"role": "assistant", "content": "11"},
]


def tokenizer_with(template):
    tok = toy.tokenizer()  # one token per character: token boundaries are character boundaries
    if template is not None:
        tok.chat_template = template
    return tok


# template -> what its {% generation %} block holds for an assistant message
TEMPLATES = {
    "chatml-toy": (None, lambda c: c + "<|im_end|>"),
    "llama3": (llama3_chat_template, lambda c: c + "<|eot_id|>"),
    "qwen2.5": (qwen2_5_chat_template, lambda c: "\n" + c + "<|im_end|>\n"),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_turn_ids_cover_exactly_the_assistant_tokens(name):
    template, generated = TEMPLATES[name]
    tok = tokenizer_with(template)
    input_ids, turn_ids = assistant_turn_ids(tok, MESSAGES)
    assert len(input_ids) == len(turn_ids)
    answers = [m["content"] for m in MESSAGES if m["role"] == "assistant"]
    for k, content in enumerate(answers):
        tokens = [t for t, turn in zip(input_ids, turn_ids) if turn == k]
        assert tok.decode(tokens) == generated(content), name
        positions = [i for i, turn in enumerate(turn_ids) if turn == k]
        assert positions == list(range(positions[0], positions[-1] + 1))  # one contiguous span per turn
    outside = tok.decode([t for t, turn in zip(input_ids, turn_ids) if turn < 0])
    assert all(m["content"] in outside for m in MESSAGES if m["role"] == "user")
    assert "11" not in outside.replace("x=4, y is secret. x+y?", "")  # the agent's answer is not left outside
    assert set(turn_ids) == {-1, 0, 1}


def test_template_without_markers_is_refused():
    tok = tokenizer_with("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ValueError, match="no \\{% generation %\\} markers"):
        assistant_turn_ids(tok, MESSAGES)


GOOD = {"task_id": "t", "messages": MESSAGES, "reward": 1.0, "hidden_info": "11"}


@pytest.mark.parametrize(("change", "match"), [
    ({"reward": float("nan")}, "reward must be a finite number"),
    ({"reward": "1"}, "reward must be a finite number"),
    ({"hidden_info": None}, "hidden_info must be a str"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages\\[0\\] must be"),
    ({"messages": MESSAGES[1:]}, "must start with the user"),
    ({"messages": MESSAGES[:1]}, "no assistant"),
    ({"messages": [MESSAGES[0], MESSAGES[2], MESSAGES[1]]}, "two user messages in a row"),
])
def test_malformed_trajectories_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        validate_trajectory({**GOOD, **change})


def test_missing_fields_and_row_index():
    with pytest.raises(ValueError, match=r"trajectory 1 lacks \['reward'\]"):
        validate_trajectories([GOOD, {k: v for k, v in GOOD.items() if k != "reward"}])
    validate_trajectories([GOOD, {**GOOD, "messages": [{"role": "system", "content": "s"}, *MESSAGES]}])


def _row(task_id, reward, answer="11"):
    return {"task_id": task_id, "messages": [MESSAGES[0], {"role": "assistant", "content": answer}],
            "reward": reward, "hidden_info": "h"}


def test_critic_pairs_pair_the_best_with_every_worse_attempt():
    rows = [_row("a", 0.0, "1"), _row("a", 1.0, "11"), _row("a", 0.5, "2"), _row("a", 1.0, "12"),
            _row("b", 0.5), _row("b", 0.0),  # best below the threshold: no pairs
            _row("c", 1.0), _row("c", 1.0)]  # no worse attempt: no pairs
    pairs = critic_pairs(rows)
    assert [(p["task_id"], p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs] == [
        ("a", "11", "1"), ("a", "11", "2")]
    assert [p["rejected_reward"] for p in pairs] == [0.0, 0.5]
    assert len(critic_pairs(rows, min_best_reward=0.5)) == 3  # now task b pairs too


def test_collect_trajectories_on_the_toy_environment(tmp_path):
    task = toy.CollaboratorTask(max_operand=5)
    path = toy.warm_start(task, 3, stop_at=None, cache_dir=tmp_path, hidden_size=32, num_hidden_layers=1)
    ids = task.task_ids("train")[:4]
    rows = collect_trajectories(str(path), task_ids=ids, make_env=task.env, attempts=2, max_turns=3,
                                hidden_info=lambda t: str(task.get(t).hidden["answer"]))
    assert [(r["task_id"], r["attempt"]) for r in rows] == [(t, a) for a in (0, 1) for t in ids]
    for r in rows:
        assert r["hidden_info"] == str(task.get(r["task_id"]).hidden["answer"])
        assert task.replay(r["task_id"], r["messages"]) == r["reward"]  # the env's outcome, replayed
        assert 1 <= sum(m["role"] == "assistant" for m in r["messages"]) <= 3
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        collect_trajectories(str(path), attempts=0)
