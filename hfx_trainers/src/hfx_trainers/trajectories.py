"""Multi-turn trajectories for SWEET-RL (spec ``specs/trainers.md`` §8): the data format, its validation, and the
per-token turn map of a chat (which tokens belong to which agent turn).

A trajectory is one attempt of an agent at a task, as a plain dict (a row of a ``datasets.Dataset``)::

    {"task_id": "train-3",                                   # attempts of one task share it
     "messages": [{"role": "user", "content": "x=4, y is secret. x+y?"},
                  {"role": "assistant", "content": "y?"},
                  {"role": "user", "content": "y=7"},
                  {"role": "assistant", "content": "11"}],
     "reward": 1.0,                                          # the outcome, a finite number
     "hidden_info": "11"}                                    # training-time information: the critic sees it, the agent never

Example::

    >>> validate_trajectory({"task_id": 0, "messages": [{"role": "user", "content": "hi"},
    ...                      {"role": "assistant", "content": "hello"}], "reward": 1.0, "hidden_info": ""})
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "TRAJECTORY_FIELDS",
    "assistant_turn_ids",
    "collect_trajectories",
    "critic_pairs",
    "validate_trajectories",
    "validate_trajectory",
]

TRAJECTORY_FIELDS = ("task_id", "messages", "reward", "hidden_info")
_ROLES = ("system", "user", "assistant")


def validate_trajectory(row: Mapping[str, Any], where: str = "trajectory") -> None:
    """Raise a ``ValueError`` naming the field and the fix when ``row`` is not a well-formed trajectory."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} must be a dict with fields {TRAJECTORY_FIELDS}, got {type(row).__name__}")
    missing = [f for f in TRAJECTORY_FIELDS if f not in row]
    if missing:
        raise ValueError(f"{where} lacks {missing}; a trajectory has {TRAJECTORY_FIELDS} (hidden_info may be '' when "
                         "there is no training-time information)")
    reward = row["reward"]
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise ValueError(f"{where}: reward must be a finite number (the outcome), got {reward!r}")
    if not isinstance(row["hidden_info"], str):
        raise ValueError(f"{where}: hidden_info must be a str (the text the critic sees, e.g. the reference answer), "
                         f"got {type(row['hidden_info']).__name__}")
    messages = row["messages"]
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in _ROLES or not isinstance(
                message.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] must be {{'role': one of {_ROLES}, 'content': str}}, got "
                             f"{message!r}")
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user":
        raise ValueError(f"{where}: the dialogue must start with the user's message (after an optional system one)")
    if "assistant" not in roles:
        raise ValueError(f"{where}: the dialogue has no assistant (agent) turn")
    for i, (a, b) in enumerate(itertools.pairwise(roles)):
        if a == b:
            raise ValueError(f"{where}: two {a} messages in a row (turns {i} and {i + 1}); user and assistant alternate")


def validate_trajectories(rows: Iterable[Mapping[str, Any]]) -> None:
    """:func:`validate_trajectory` on every row (a list or a ``datasets.Dataset``), naming the first bad one."""
    for i, row in enumerate(rows):
        validate_trajectory(row, where=f"trajectory {i}")


def _training_template(tokenizer) -> str:
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if template is None:
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template (with {% generation %} "
                         "markers around the assistant's content) to mark the agent's turns")
    if has_generation_markers(template):
        return template
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        patched = None
    if patched is None:
        raise ValueError(
            "the tokenizer's chat template has no {% generation %} markers and is not one TRL knows how to patch "
            "(trl.chat_template_utils.get_training_chat_template: Llama 3, Qwen 2.5/3, Gemma, Phi-3, ...); wrap the "
            "assistant's content in {% generation %}...{% endgeneration %} in tokenizer.chat_template"
        )
    return patched


def assistant_turn_ids(tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """Tokenise a chat and number the agent's turns: returns ``(input_ids, turn_ids)`` where ``turn_ids[i]`` is the
    index (0, 1, ...) of the assistant message token ``i`` belongs to, or -1 for every other token.

    The assistant tokens are those inside the chat template's ``{% generation %}`` blocks (transformers'
    ``return_assistant_tokens_mask``); templates without markers are patched with TRL's training templates where
    TRL knows them, otherwise this raises. No string scanning for role headers.
    """
    template = _training_template(tokenizer)
    out = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    input_ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    turn_ids, turn, inside = [], -1, False
    for flag in mask:
        if flag and not inside:
            turn += 1
        inside = bool(flag)
        turn_ids.append(turn if inside else -1)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if turn + 1 != n_assistant:
        raise ValueError(f"the chat template marked {turn + 1} assistant spans for {n_assistant} assistant messages; "
                         "its {% generation %} blocks must cover each assistant message once")
    return input_ids, turn_ids


def collect_trajectories(model: Any, tokenizer: Any = None, task_ids: Sequence[Any] | None = None, *, make_env=None,
                         hidden_info=None, attempts: int = 3, max_turns: int = 10, temperature: float = 1.0,
                         max_new_tokens: int = 8, batch_size: int = 256, seed: int = 0) -> list[dict[str, Any]]:
    """Sample ``attempts`` trajectories per task by playing ``model`` through a multi-turn environment.

    ``make_env()`` returns an environment with ``reset(task_id) -> first user message``,
    ``step(agent_message) -> (reply or None, done)`` and ``reward() -> float`` (see ``hfx.toy.CollaboratorEnv``);
    ``hidden_info(task_id) -> str`` is the training-time information kept for the critic. Without ``make_env`` the
    environment is the core's multi-turn toy task (``hfx.toy.CollaboratorTask``, its train split and its hidden
    answer). Attempts are sampled at ``temperature``, each with its own seed; rows carry an ``attempt`` index.

    >>> rows = collect_trajectories("path/to/agent", attempts=3)  # doctest: +SKIP
    >>> rows[0].keys()  # doctest: +SKIP
    dict_keys(['task_id', 'messages', 'reward', 'hidden_info', 'attempt'])
    """
    import torch

    from hfx.toy import CollaboratorTask, play_episodes

    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if make_env is None:
        task = CollaboratorTask()
        make_env, max_turns = task.env, task.max_turns
        task_ids = task.task_ids("train") if task_ids is None else task_ids
        if hidden_info is None:
            def hidden_info(task_id):
                return f"The final answer is {task.get(task_id).hidden['answer']}."
    if task_ids is None:
        raise ValueError("task_ids is required with a custom make_env")
    rows = []
    for attempt in range(attempts):
        torch.manual_seed(seed + attempt)
        episodes = play_episodes(make_env, list(task_ids), model, tokenizer, max_turns=max_turns,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=True,
                                 temperature=temperature, desc=f"trajectories, attempt {attempt + 1}/{attempts}")
        rows += [{**e, "hidden_info": hidden_info(e["task_id"]) if hidden_info else "", "attempt": attempt}
                 for e in episodes]
    validate_trajectories(rows)
    return rows


def critic_pairs(trajectories: Iterable[Mapping[str, Any]], min_best_reward: float = 1.0) -> list[dict[str, Any]]:
    """SWEET-RL's critic data (spec §8.2): for every task whose best attempt has reward >= ``min_best_reward``,
    the best attempt (chosen) paired with each attempt of strictly lower reward (rejected).

    Returns rows ``{"task_id", "hidden_info", "chosen", "rejected", "chosen_reward", "rejected_reward"}`` where
    ``chosen``/``rejected`` are message lists.
    """
    by_task: dict[Any, list[Mapping[str, Any]]] = {}
    for i, row in enumerate(trajectories):
        validate_trajectory(row, where=f"trajectory {i}")
        by_task.setdefault(row["task_id"], []).append(row)
    pairs = []
    for task_id, rows in by_task.items():
        best = max(rows, key=lambda r: r["reward"])  # the first of equally good attempts
        if best["reward"] < min_best_reward:
            continue
        pairs += [{"task_id": task_id, "hidden_info": best["hidden_info"], "chosen": list(best["messages"]),
                   "rejected": list(r["messages"]), "chosen_reward": best["reward"], "rejected_reward": r["reward"]}
                  for r in rows if r["reward"] < best["reward"]]
    return pairs
