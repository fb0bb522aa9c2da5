"""Built-in toy tasks: seeded, deterministic, offline.

They are the embedded default data of ``hfx demo``, the examples, the tests and the benchmarks. Nothing is
downloaded: the tokenizer is built in-process and the warm-start model is trained on this machine.

* :func:`tokenizer` - a character-level (byte) tokenizer with a ChatML chat template.
* :class:`ArithmeticTask` - ``"12+34="`` -> ``"46"``, with a reward function, a preference oracle and accuracy.
* :class:`CollaboratorTask` / :class:`CollaboratorEnv` - a multi-turn task for SWEET-RL: the agent must ask a
  simulated collaborator for a hidden number before it can answer.
* :func:`warm_start` - a tiny Qwen2 trained with TRL's ``SFTTrainer`` on a task, cached on disk, so that RL and
  self-play start from a model that is right some of the time.

Example::

    from hfx import toy
    from trl import GRPOConfig, GRPOTrainer

    task = toy.ArithmeticTask()
    task.reward_fn(["2+3="], ["5<|im_end|>"])        # [1.0]
    path = toy.warm_start("arithmetic")               # trains once (about a minute), then cached
    GRPOTrainer(model=str(path), reward_funcs=task.reward_fn, args=GRPOConfig(...),
                train_dataset=task.dataset("train", format="prompt")).train()

Importing this module is cheap: torch, transformers, trl and datasets are imported inside the functions.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_START",
    "PAD_TOKEN",
    "ArithmeticTask",
    "CollaboratorEnv",
    "CollaboratorTask",
    "accuracy",
    "get_task",
    "parse_int",
    "play_episodes",
    "prefer",
    "reward_fn",
    "tokenizer",
    "warm_start",
]

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
_SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN)
_SPLITS = ("train", "eval")

# ChatML. The {% generation %} markers let TRL build assistant-only loss masks (``assistant_only_loss=True``,
# multi-turn masks for SWEET-RL); the end-of-turn token sits inside them so the model learns to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@functools.lru_cache(maxsize=1)
def _tokenizer_prototype():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Token id == byte value, so ASCII text has ids == ord(char); specials follow at 256, 257, 258.
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No merges means one token per byte; the regex split would change nothing, so skip it.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        # transformers 4.x would also return token_type_ids, which causal LMs' generate() rejects.
        model_input_names=["input_ids", "attention_mask"],
    )


def tokenizer():
    """The character-level toy tokenizer: one token per byte plus ``<|endoftext|>`` (pad), ``<|im_start|>`` and
    ``<|im_end|>`` (eos), with a ChatML chat template that supports ``add_generation_prompt`` and TRL's
    assistant masks.

    Built once per process; each call returns a copy, so setting e.g. ``padding_side`` on it does not leak.

    Example::

        >>> tok = tokenizer()
        >>> tok("1+2=")["input_ids"]          # ids are the bytes
        [49, 43, 50, 61]
        >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    return copy.deepcopy(_tokenizer_prototype())


# --------------------------------------------------------------------------------------------------------------
# Parsing helpers shared by the tasks
# --------------------------------------------------------------------------------------------------------------

_LEADING_INT = re.compile(r"[+-]?\d+")


def _text(completion: Any) -> str:
    """The text of a completion in TRL's standard (str) or conversational (list of messages) format."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)) and completion:
        return _text(completion[-1])
    return ""


def _cut(text: str) -> str:
    """Drop everything from the first special token on (text after eos is noise), then strip spaces."""
    for token in _SPECIAL_TOKENS:
        text = text.split(token, 1)[0]
    return text.strip()


def parse_int(completion: Any) -> int | None:
    """The leading integer of a completion, or ``None``.

    Example::

        >>> parse_int(" 46<|im_end|>7"), parse_int("46 is it"), parse_int("about 46")
        (46, 46, None)
    """
    match = _LEADING_INT.match(_cut(_text(completion)))
    return int(match.group()) if match else None


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return split


def _split_sizes(total: int, n_train: int | None, n_eval: int | None) -> tuple[int, int]:
    """Resolve ``None`` sizes: eval gets min(200, total // 5) items, train the rest."""
    n_eval = min(200, total // 5) if n_eval is None else n_eval
    n_train = total - n_eval if n_train is None else n_train
    if n_eval < 1 or n_train < 1 or n_train + n_eval > total:
        raise ValueError(f"cannot split {total} items into n_train={n_train} and n_eval={n_eval} disjoint items")
    return n_train, n_eval


# --------------------------------------------------------------------------------------------------------------
# Generation helpers (torch imported lazily)
# --------------------------------------------------------------------------------------------------------------


def _resolve(model: Any, tok: Any):
    """Accept a model or a path to one; default to the toy tokenizer (or the one saved beside the model)."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(model)
        model = AutoModelForCausalLM.from_pretrained(path)
        if tok is None:
            tok = AutoTokenizer.from_pretrained(path)
    return model, (tokenizer() if tok is None else tok)


def _generate(model, tok, texts: Sequence[str], *, max_new_tokens: int, batch_size: int, desc: str | None = None,
              **generate_kwargs) -> list[str]:
    """Greedy (by default) batched generation with left padding; returns each completion cut at eos."""
    import torch
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    generate_kwargs.setdefault("do_sample", False)
    out: list[str] = []
    starts = range(0, len(texts), batch_size)
    try:
        # An explicit disable= would override the TQDM_DISABLE environment variable, so pass it only to silence.
        for start in tqdm(starts, desc=desc, leave=False, **({"disable": True} if desc is None else {})):
            batch = list(texts[start:start + batch_size])
            # Left padding so every prompt ends right where generation starts.
            enc = tok(batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            input_ids = enc["input_ids"].to(model.device)
            with torch.no_grad():
                ids = model.generate(input_ids=input_ids, attention_mask=enc["attention_mask"].to(model.device),
                                     max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id, **generate_kwargs)
            new = ids[:, input_ids.shape[1]:]
            out.extend(_cut(t) for t in tok.batch_decode(new, skip_special_tokens=False))
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------------------

_PROBLEM = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*")


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Addition ``"a+b="`` -> ``"a+b"`` in plain text (no chat template: the toy model is character-level).

    Operands are drawn from ``range(max_operand)``; all ``max_operand**2`` pairs are shuffled with ``seed`` and
    split into disjoint eval (first ``n_eval``, default min(200, 20%)) and train (next ``n_train``, default the
    rest) sets.

    ``verbose_tail=k`` makes the SFT completions verbose: each answer is followed by a space and 0..k dots (random per
    item), text the reward ignores. A model warm-started on it answers at varying lengths, which is what
    length-aware RL (DRPO) can shorten; the prompts, answers and reward are unchanged.

    Example::

        >>> task = ArithmeticTask(max_operand=10)
        >>> ds = task.dataset("train", format="prompt_completion")   # columns prompt, completion
        >>> task.answer("3+4="), task.reward_fn(["3+4=", "3+4="], ["7", "8"]), task.prefer("3+4=", "7", "8")
        ('7', [1.0, 0.0], 1.0)
    """

    max_operand: int = 100
    n_train: int | None = None
    n_eval: int | None = None
    seed: int = 0
    verbose_tail: int = 0

    name: ClassVar[str] = "arithmetic"
    metric_name: ClassVar[str] = "accuracy"
    sft_format: ClassVar[str] = "prompt_completion"
    formats: ClassVar[tuple[str, ...]] = ("prompt_completion", "prompt", "preference")
    _sft_args: ClassVar[dict] = {}

    @functools.cached_property
    def _pairs(self) -> dict[str, list[tuple[int, int]]]:
        pairs = [(a, b) for a in range(self.max_operand) for b in range(self.max_operand)]
        n_train, n_eval = _split_sizes(len(pairs), self.n_train, self.n_eval)
        random.Random(self.seed).shuffle(pairs)
        return {"eval": pairs[:n_eval], "train": pairs[n_eval:n_eval + n_train]}

    def prompts(self, split: str = "train") -> list[str]:
        """The problems of a split, e.g. ``["12+34=", ...]``."""
        return [f"{a}+{b}=" for a, b in self._pairs[_check_split(split)]]

    @staticmethod
    def answer(prompt: Any) -> str:
        """The reference answer of a problem: ``answer("12+34=") == "46"``."""
        match = _PROBLEM.fullmatch(_text(prompt))
        if match is None:
            raise ValueError(f"not an addition problem of the form 'a+b=': {prompt!r}")
        return str(int(match.group(1)) + int(match.group(2)))

    def _wrong(self, answer: int, rng: random.Random) -> str:
        # Plausible mistakes: off by one, a lost or spurious carry.
        options = [c for c in (answer + 1, answer - 1, answer + 10, answer - 10) if c >= 0]
        return str(rng.choice(options))

    def dataset(self, split: str = "train", format: str = "prompt_completion"):
        """A ``datasets.Dataset`` in a TRL format.

        * ``"prompt_completion"`` (SFT): ``prompt``, ``completion``.
        * ``"prompt"`` (GRPO/RLOO/online methods): ``prompt``, ``answer`` (passed to :meth:`reward_fn`).
        * ``"preference"`` (DPO and friends): ``prompt``, ``chosen`` (correct), ``rejected`` (a plausible wrong
          answer).
        """
        from datasets import Dataset

        prompts = self.prompts(split)
        answers = [self.answer(p) for p in prompts]
        if format == "prompt_completion":
            if self.verbose_tail:
                rng = random.Random(f"{self.seed}-{split}-tail")
                answers = [f"{a} {'.' * rng.randint(0, self.verbose_tail)}" for a in answers]
            return Dataset.from_dict({"prompt": prompts, "completion": answers})
        if format == "prompt":
            return Dataset.from_dict({"prompt": prompts, "answer": answers})
        if format == "preference":
            rng = random.Random(f"{self.seed}-{split}-rejected")
            rejected = [self._wrong(int(a), rng) for a in answers]
            return Dataset.from_dict({"prompt": prompts, "chosen": answers, "rejected": rejected})
        raise ValueError(f"format must be one of {self.formats}, got {format!r}")

    def reward_fn(self, prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
                  **kwargs) -> list[float]:
        """TRL reward function: 1.0 where the completion's leading integer is the right sum, else 0.0.

        ``answer`` is the dataset column of the ``"prompt"`` format; without it the answer is computed from the
        prompt. Text after the eos token, and text after the leading integer, is ignored.
        """
        if answer is None:
            answer = [self.answer(p) for p in prompts]
        return [float(parse_int(c) == int(a)) for c, a in zip(completions, answer, strict=True)]

    def prefer(self, prompt: Any, a: Any, b: Any) -> float:
        """Preference oracle: the probability that completion ``a`` beats ``b``.

        A correct answer beats an incorrect one; between equally correct ones the shorter wins; an exact tie
        is 0.5. It is antisymmetric: ``prefer(p, a, b) + prefer(p, b, a) == 1``.
        """
        ra, rb = self.reward_fn([prompt, prompt], [a, b])
        if ra != rb:
            return 1.0 if ra > rb else 0.0
        la, lb = len(_cut(_text(a))), len(_cut(_text(b)))
        if la != lb:
            return 1.0 if la < lb else 0.0
        return 0.5

    def accuracy(self, model: Any, tokenizer: Any = None, split: str = "eval", batch_size: int = 256,
                 max_new_tokens: int | None = None, limit: int | None = None) -> float:
        """Exact-match accuracy of greedy decoding on a split, or on its first ``limit`` problems (``model`` may
        be a model or a path)."""
        model, tok = _resolve(model, tokenizer)
        prompts = self.prompts(split)[:limit]
        if max_new_tokens is None:
            max_new_tokens = len(str(2 * (self.max_operand - 1))) + 1  # the digits, then eos
        completions = _generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                desc=f"arithmetic accuracy ({split})")
        rewards = self.reward_fn(prompts, completions)
        return sum(rewards) / len(rewards)

    def evaluate(self, model: Any, tokenizer: Any = None, split: str = "eval", limit: int | None = None) -> float:
        """The task's headline metric (used by :func:`warm_start`): :meth:`accuracy`."""
        return self.accuracy(model, tokenizer, split=split, limit=limit)


@functools.lru_cache(maxsize=1)
def _default_arithmetic() -> ArithmeticTask:
    return ArithmeticTask()


def reward_fn(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
              **kwargs) -> list[float]:
    """:meth:`ArithmeticTask.reward_fn` of the default task; usable as ``GRPOTrainer(reward_funcs=reward_fn)``."""
    return _default_arithmetic().reward_fn(prompts, completions, answer, **kwargs)


def prefer(prompt: Any, a: Any, b: Any) -> float:
    """:meth:`ArithmeticTask.prefer` (the preference oracle): probability that ``a`` beats ``b``."""
    return _default_arithmetic().prefer(prompt, a, b)


def accuracy(model: Any, split: str = "eval", task: ArithmeticTask | None = None, tokenizer: Any = None) -> float:
    """Exact-match accuracy of ``model`` (or a path) on ``task`` (default :class:`ArithmeticTask`)."""
    return (task or _default_arithmetic()).accuracy(model, tokenizer, split=split)


# --------------------------------------------------------------------------------------------------------------
# Multi-turn collaborator task (SWEET-RL)
# --------------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?\d+")
_NUDGE = "Ask or answer."


@dataclasses.dataclass(frozen=True)
class CollaboratorItem:
    """One collaborator task: ``prompt`` is what the agent sees; ``hidden`` only the collaborator (and a
    SWEET-RL critic, as training-time information) sees: ``{"y": ..., "answer": ...}``."""

    task_id: str
    prompt: str
    hidden: dict


@dataclasses.dataclass(frozen=True)
class CollaboratorTask:
    """The agent must ask before it can answer. The user says ``"x=12, y is secret. x+y?"``; any agent message
    with a ``?`` makes the collaborator reveal ``"y=7"``; an agent message that is a number ends the episode
    with reward 1.0 iff it equals x+y. Any other message gets ``"Ask or answer."``. After ``max_turns`` agent
    messages without an answer the episode ends with reward 0. Only the outcome is rewarded.

    ``x`` and ``y`` come from ``range(max_operand)``; pairs are shuffled with ``seed`` and split like
    :class:`ArithmeticTask`.

    ``critic_context`` (a template with ``{hidden_info}``, e.g. SWEET-RL's ``hidden_info_template``) puts the answer
    in a system message before every demonstration: a warm start on that data reads the training-time information
    the way an instruct model reads its system prompt, the toy stand-in for the paper's critic initialisation
    (``warm_start("collaborator", critic_context=...)``).

    Example::

        task = CollaboratorTask()
        env = task.env()
        tid = task.task_ids("train")[0]
        env.reset(tid)                                 # 'x=11, y is secret. x+y?'
        env.step("y?")                                 # ('y=12', False)
        env.step(str(task.get(tid).hidden["answer"]))  # (None, True)
        env.reward()                                   # 1.0
    """

    max_operand: int = 20
    n_train: int | None = None
    n_eval: int | None = None
    max_turns: int = 3
    seed: int = 0
    critic_context: str = ""

    name: ClassVar[str] = "collaborator"
    metric_name: ClassVar[str] = "success_rate"
    sft_format: ClassVar[str] = "messages"
    formats: ClassVar[tuple[str, ...]] = ("messages", "prompt")
    _sft_args: ClassVar[dict] = {"assistant_only_loss": True}  # learn the agent's turns, not the user's

    @functools.cached_property
    def _items(self) -> dict[str, list[CollaboratorItem]]:
        pairs = [(x, y) for x in range(self.max_operand) for y in range(self.max_operand)]
        n_train, n_eval = _split_sizes(len(pairs), self.n_train, self.n_eval)
        random.Random(self.seed).shuffle(pairs)
        chosen = {"eval": pairs[:n_eval], "train": pairs[n_eval:n_eval + n_train]}
        return {
            split: [
                CollaboratorItem(f"{split}-{i}", f"x={x}, y is secret. x+y?", {"y": y, "answer": x + y})
                for i, (x, y) in enumerate(chosen[split])
            ]
            for split in _SPLITS
        }

    @functools.cached_property
    def _by_id(self) -> dict[str, CollaboratorItem]:
        return {item.task_id: item for split in _SPLITS for item in self._items[split]}

    def items(self, split: str = "train") -> list[CollaboratorItem]:
        return list(self._items[_check_split(split)])

    def task_ids(self, split: str = "train") -> list[str]:
        return [item.task_id for item in self._items[_check_split(split)]]

    def get(self, task_id: str) -> CollaboratorItem:
        try:
            return self._by_id[task_id]
        except KeyError:
            raise KeyError(f"unknown task_id {task_id!r}") from None

    def env(self) -> CollaboratorEnv:
        return CollaboratorEnv(self)

    def demonstration(self, task_id: str) -> list[dict[str, str]]:
        """An expert conversation: ask, get the hidden number, answer correctly. With ``critic_context`` it opens
        with that system message, ``{hidden_info}`` filled with the answer."""
        item = self.get(task_id)
        context = ([{"role": "system", "content": self.critic_context.format(hidden_info=item.hidden["answer"])}]
                   if self.critic_context else [])
        return [
            *context,
            {"role": "user", "content": item.prompt},
            {"role": "assistant", "content": "y?"},
            {"role": "user", "content": f"y={item.hidden['y']}"},
            {"role": "assistant", "content": str(item.hidden["answer"])},
        ]

    def replay(self, task_id: str, messages: Sequence[dict]) -> float:
        """The outcome reward of a conversation: its assistant messages are played through a fresh env."""
        env = self.env()
        env.reset(task_id)
        for message in messages:
            if message["role"] == "assistant":
                env.step(message["content"])
                if env.done:
                    break
        return env.reward()

    def optimal_value(self, task_id: str, messages: Sequence[dict]) -> float:
        """The reward an optimal agent reaches when it takes over after ``messages`` (a dialogue that may stop after
        any agent turn): the true value of the last turn, for checking a critic's per-turn ranking.

        An ended episode keeps its reward; otherwise the best agent answers at once if it knows y and has a turn
        left, or asks first if it has two.

            >>> task = CollaboratorTask()
            >>> task.optimal_value("train-0", [{"role": "user", "content": "..."}, {"role": "assistant", "content": "y?"}])
            1.0
        """
        env = self.env()
        env.reset(task_id)
        knows_y = False
        for message in messages:
            if message["role"] == "assistant":
                reply, done = env.step(message["content"])
                if done:
                    return env.reward()
                knows_y = knows_y or reply != _NUDGE
        turns_left = self.max_turns - env.turns
        return float(turns_left >= 1 if knows_y else turns_left >= 2)

    def dataset(self, split: str = "train", format: str = "messages"):
        """``"messages"``: expert demonstrations for SFT. ``"prompt"``: ``prompt`` (the first user turn, in
        conversational form) and ``task_id``, to start rollouts from."""
        from datasets import Dataset

        ids = self.task_ids(split)
        if format == "messages":
            return Dataset.from_dict({"messages": [self.demonstration(t) for t in ids]})
        if format == "prompt":
            prompts = [[{"role": "user", "content": self.get(t).prompt}] for t in ids]
            return Dataset.from_dict({"prompt": prompts, "task_id": ids})
        raise ValueError(f"format must be one of {self.formats}, got {format!r}")

    def rollouts(self, model: Any, tokenizer: Any = None, split: str = "eval", *, task_ids: Sequence[str] | None = None,
                 batch_size: int = 256, max_new_tokens: int = 8, **generate_kwargs) -> list[dict]:
        """Play ``model`` (or a path) through the env on every task of a split, all episodes batched turn by turn.

        Returns one record per task: ``{"task_id", "messages", "reward"}``. Greedy unless ``do_sample=True`` is
        passed (forwarded to ``model.generate``, as is e.g. ``temperature``).
        """
        ids = list(self.task_ids(split) if task_ids is None else task_ids)
        return play_episodes(self.env, ids, model, tokenizer, max_turns=self.max_turns, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, desc=f"collaborator rollouts ({split})",
                             **generate_kwargs)

    def success_rate(self, model: Any, tokenizer: Any = None, split: str = "eval", **kwargs) -> float:
        """Fraction of tasks of a split that ``model`` solves (greedy rollouts through the env)."""
        records = self.rollouts(model, tokenizer, split, **kwargs)
        return sum(r["reward"] for r in records) / len(records)

    def evaluate(self, model: Any, tokenizer: Any = None, split: str = "eval", limit: int | None = None) -> float:
        """The task's headline metric (used by :func:`warm_start`): :meth:`success_rate`."""
        return self.success_rate(model, tokenizer, split=split, task_ids=self.task_ids(split)[:limit])


def play_episodes(make_env, task_ids: Sequence[Any], model: Any, tokenizer: Any = None, *, max_turns: int,
                  batch_size: int = 256, max_new_tokens: int = 8, desc: str | None = "episodes",
                  histories: Sequence[Sequence[dict]] | None = None, **generate_kwargs) -> list[dict]:
    """Play ``model`` (or a path) through one fresh environment per task id, all episodes batched turn by turn.

    With ``histories`` (one dialogue per task id, starting with the environment's first message), each episode first
    replays that dialogue's agent messages and the model takes over from there: the value of a dialogue prefix under
    the model's policy (e.g. to check a critic's ranking of candidate turns).

    ``make_env()`` returns an object with the multi-turn protocol of :class:`CollaboratorEnv`:
    ``reset(task_id) -> first user message``, ``step(agent_message) -> (reply or None, done)``, ``reward()``.
    Episodes end when ``step`` says done or after ``max_turns`` agent messages. Returns one record per task id:
    ``{"task_id", "messages", "reward"}``. Greedy unless ``do_sample=True`` is passed (forwarded to
    ``model.generate``, as is e.g. ``temperature``).
    """
    from tqdm.auto import tqdm

    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    model, tok = _resolve(model, tokenizer)
    envs = [make_env() for _ in task_ids]
    convs = [[{"role": "user", "content": env.reset(t)}] for env, t in zip(envs, task_ids)]
    done, turns = [False] * len(envs), [0] * len(envs)

    def step(i, message):
        convs[i].append({"role": "assistant", "content": message})
        reply, done[i] = envs[i].step(message)
        turns[i] += 1
        done[i] = done[i] or turns[i] >= max_turns
        if reply is not None and not done[i]:
            convs[i].append({"role": "user", "content": reply})

    if histories is not None and len(histories) != len(task_ids):
        raise ValueError(f"histories has {len(histories)} dialogues for {len(task_ids)} task ids")
    for i, history in enumerate(histories or ()):
        for message in history[1:]:
            if message["role"] == "assistant" and not done[i]:
                step(i, message["content"])
    with tqdm(total=len(envs), desc=desc, leave=False, **({"disable": True} if desc is None else {})) as bar:
        bar.update(sum(done))
        while not all(done):
            active = [i for i, d in enumerate(done) if not d]
            texts = [tok.apply_chat_template(convs[i], tokenize=False, add_generation_prompt=True) for i in active]
            replies = _generate(model, tok, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                **generate_kwargs)
            for i, message in zip(active, replies):
                step(i, message)
                bar.update(int(done[i]))
    return [{"task_id": t, "messages": c, "reward": float(e.reward())} for t, c, e in zip(task_ids, convs, envs)]


class CollaboratorEnv:
    """The simulated collaborator. Plain Python: ``reset(task_id) -> first user message``,
    ``step(agent_message) -> (reply or None, done)``, ``reward() -> float`` (outcome only, 0.0 until done).

    Example::

        env = CollaboratorTask().env()
        env.reset("train-0")      # 'x=11, y is secret. x+y?'
        env.step("y?")            # ('y=12', False)
        env.step("23")            # (None, True)
        env.reward()              # 1.0
    """

    def __init__(self, task: CollaboratorTask | None = None):
        self.task = task or CollaboratorTask()
        self.item: CollaboratorItem | None = None
        self.messages: list[dict[str, str]] = []
        self.done = False
        self.turns = 0
        self._answer: int | None = None

    def reset(self, task_id: str) -> str:
        self.item = self.task.get(task_id)
        self.messages = [{"role": "user", "content": self.item.prompt}]
        self.done, self.turns, self._answer = False, 0, None
        return self.item.prompt

    def step(self, agent_message: str) -> tuple[str | None, bool]:
        if self.item is None:
            raise RuntimeError("call reset(task_id) before step()")
        if self.done:
            raise RuntimeError("the episode is over; call reset(task_id)")
        if not isinstance(agent_message, str):
            raise TypeError(f"agent_message must be a str, got {type(agent_message).__name__}")
        self.messages.append({"role": "assistant", "content": agent_message})
        self.turns += 1
        text = _cut(agent_message)
        if _NUMBER.fullmatch(text):
            self._answer, self.done = int(text), True
            return None, True
        if self.turns >= self.task.max_turns:
            self.done = True
            return None, True
        reply = f"y={self.item.hidden['y']}" if "?" in text else _NUDGE
        self.messages.append({"role": "user", "content": reply})
        return reply, False

    def reward(self) -> float:
        return float(self.done and self.item is not None and self._answer == self.item.hidden["answer"])


# --------------------------------------------------------------------------------------------------------------
# Warm start
# --------------------------------------------------------------------------------------------------------------

_TASKS = {"arithmetic": ArithmeticTask, "collaborator": CollaboratorTask}
# The accuracy of these tiny models jumps (grokking-like) at a step that depends on the seed, the thread count and
# the library versions: arithmetic eval accuracy went 13% -> 26% -> 57% -> 76% over steps 500..650 in one run, while
# other seeds hit the jump hundreds of steps later. A fixed step count lands either well below or well above the
# "right some of the time" range; stopping at a target accuracy does not. Measured (transformers 5.24, 1 thread):
# arithmetic seed 0/1 stopped at step 350/1175 with eval accuracy 46%/32%; collaborator seed 0/1 stopped at step
# 525/300 with eval success 36%/32%.
DEFAULT_STEPS = {"arithmetic": 1500, "collaborator": 1500}  # caps; training usually stops earlier (stop_at)
# Train-probe targets. The collaborator's 320 train tasks are seen ~100 times each, so its eval success trails the
# train probe by ~10 points: a higher target lands both tasks' eval metric at roughly 20-50%.
DEFAULT_STOP_AT = {"arithmetic": 0.25, "collaborator": 0.4}
_MODEL_DEFAULTS = {
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 256,
}
_TRAIN_DEFAULTS = {
    "learning_rate": 3e-3,
    "per_device_train_batch_size": 128,
    "lr_scheduler_type": "constant",  # a decaying schedule would tie the model's state to the step cap
    "logging_steps": 10,
    "max_length": 256,
}
_PROBE = {"every": 25, "size": 200}  # the stop_at check: accuracy on the first 200 *train* items, every 25 steps
_WARM_START_FORMAT = 1  # bump when the training recipe changes, to invalidate old caches


def get_task(task: Any = "arithmetic", **fields):
    """A task object from a name (``"arithmetic"``, ``"collaborator"``) and dataclass fields, or ``task`` itself.

    Example::

        >>> get_task("arithmetic", max_operand=10)
        ArithmeticTask(max_operand=10, n_train=None, n_eval=None, seed=0, verbose_tail=0)
    """
    if isinstance(task, str):
        try:
            cls = _TASKS[task]
        except KeyError:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(_TASKS)}") from None
        return cls(**fields)
    if fields:
        raise TypeError(f"task fields {sorted(fields)} can only be given with a task name")
    return task


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("HFX_CACHE_DIR") or Path.home() / ".cache" / "hfx"
    return Path(base) / "warm_start"


def _major(package: str) -> str:
    return metadata.version(package).split(".")[0]


def warm_start(task: Any = "arithmetic", steps: int | None = None, *, seed: int = 0,
               stop_at: float | str | None = "auto", cache_dir: str | os.PathLike | None = None,
               **overrides) -> Path:
    """Train a tiny Qwen2 (0.48M parameters) with TRL's ``SFTTrainer`` on ``task``'s SFT data and return the
    directory holding the model and tokenizer (loadable by path, e.g. ``GRPOTrainer(model=str(path), ...)``).

    * ``task``: a name (``"arithmetic"``, ``"collaborator"``) or a task object.
    * ``steps``: the most optimizer steps (default ``DEFAULT_STEPS[task.name]``).
    * ``stop_at``: stop as soon as the task metric on the first 200 *train* items reaches it (checked every 25
      steps), so that RL and self-play start from a model that is right some of the time; ``"auto"`` is
      ``DEFAULT_STOP_AT[task.name]``; ``None`` trains all ``steps``. The eval split stays untouched for the
      reported ``eval_accuracy``.
    * ``overrides``: task fields (with a task name), ``Qwen2Config`` fields (``hidden_size``,
      ``num_hidden_layers``, ...) and ``SFTConfig`` fields (``learning_rate``, ...).

    The result is cached under ``cache_dir`` (default ``$HFX_CACHE_DIR/warm_start``, else
    ``~/.cache/hfx/warm_start``) in a folder keyed by a hash of every setting and the transformers/trl major
    versions; it is written atomically, and a cached result is returned without training. The folder also holds
    ``log_history.json`` (the trainer's log, with the stop_at probes) and ``metrics.json`` (``eval_accuracy`` on
    the eval split, the steps done, the train time, the settings).

    Example::

        path = warm_start("arithmetic")                # a minute or two on 2 CPU cores, then cached
        json.loads((path / "metrics.json").read_text())["eval_accuracy"]   # e.g. 0.46
        small = warm_start("arithmetic", 300, stop_at=None, max_operand=10, hidden_size=64)
    """
    fields = _task_field_names(task)
    task = get_task(task, **{k: overrides.pop(k) for k in list(overrides) if k in fields})
    steps = DEFAULT_STEPS.get(task.name, 1000) if steps is None else int(steps)
    if stop_at == "auto":
        stop_at = DEFAULT_STOP_AT.get(task.name, 0.25)
    model_cfg = {**_MODEL_DEFAULTS, **{k: overrides.pop(k) for k in list(overrides) if k in _MODEL_DEFAULTS}}
    train_cfg = {**_TRAIN_DEFAULTS, **task._sft_args, **overrides}
    settings = {
        "format": _WARM_START_FORMAT,
        "task": type(task).__name__,
        "task_fields": dataclasses.asdict(task),
        "steps": steps,
        "stop_at": stop_at,
        "probe": _PROBE if stop_at is not None else None,
        "seed": seed,
        "model": model_cfg,
        "train": train_cfg,
        "transformers": _major("transformers"),
        "trl": _major("trl"),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = _cache_root(cache_dir)
    final = root / f"{task.name}-{digest}"
    if (final / "metrics.json").is_file():
        return final

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        metrics = _train(task, steps, seed, model_cfg, train_cfg, tmp, stop_at=stop_at)
        metrics["settings"] = settings
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same warm start first: keep theirs.
            if not (final / "metrics.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _task_field_names(task: Any) -> set[str]:
    cls = _TASKS.get(task) if isinstance(task, str) else None
    return {f.name for f in dataclasses.fields(cls)} if cls is not None else set()


def _build_model(tok, seed: int, model_cfg: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM, set_seed

    set_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True, **model_cfg)
    return Qwen2ForCausalLM(config)


def _stop_at_callback(task: Any, tok: Any, stop_at: float):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        """Every few steps, measure the task metric on train items; stop once it reaches ``stop_at``."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % _PROBE["every"]:
                return
            value = task.evaluate(model, tok, split="train", limit=_PROBE["size"])
            state.log_history.append({"probe_train_accuracy": value, "step": state.global_step})
            if value >= stop_at:
                control.should_training_stop = True

    return StopAt()


def _train(task: Any, steps: int, seed: int, model_cfg: dict, train_cfg: dict, out: Path,
           stop_at: float | None = None) -> dict:
    import torch

    # One thread: this model is too small to gain from more, and with the CPU shared (parallel tests, other jobs)
    # every intra-op barrier waits for a descheduled thread - 60 steps took 6 s on one thread but 45-200 s on two
    # on a busy 2-core machine. It also makes the result independent of the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_single_thread(task, steps, seed, model_cfg, train_cfg, out, stop_at)
    finally:
        torch.set_num_threads(threads)


def _train_single_thread(task: Any, steps: int, seed: int, model_cfg: dict, train_cfg: dict, out: Path,
                         stop_at: float | None) -> dict:
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    tok = tokenizer()
    model = _build_model(tok, seed, model_cfg)
    from ._compat import checkpointing_field

    no_ckpt = checkpointing_field(SFTConfig)  # TRL defaults it to True; the field was renamed in transformers 5
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        **{no_ckpt: False},
        **train_cfg,
    )
    set_seed(seed)  # the data order too, not only the initial weights
    callbacks = [] if stop_at is None else [_stop_at_callback(task, tok, stop_at)]
    trainer = SFTTrainer(model=model, args=args, train_dataset=task.dataset("train", task.sft_format),
                         processing_class=tok, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    return {
        "eval_accuracy": task.evaluate(trainer.model, tok),
        "steps_done": trainer.state.global_step,
        "train_seconds": round(train_seconds, 2),
        "n_params": sum(p.numel() for p in trainer.model.parameters()),
    }
