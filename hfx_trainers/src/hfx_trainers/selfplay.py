"""The iterative self-play driver shared by SPIN, SPPO, RSPO and INPO (spec ``specs/trainers.md`` §2.2, §3.2, §4.2,
§5.2, §10.1).

Each algorithm trains one *iteration* with a DPO-family trainer (``SPINTrainer``, ``SPPOTrainer``, ...); this module
chains the iterations::

    for t in range(num_iterations):
        sample K completions per prompt with π_t (the current model)
        SPIN: pair each with the ground truth | SPPO/RSPO/INPO: annotate with a preference model, select pairs
        train π_{t+1} from π_t on the pairs (config = base config + iteration_overrides[t]), save it

* :class:`SelfPlayArguments`: the outer-loop settings; ``None`` fields take the algorithm's official default
  (:data:`ALGORITHM_DEFAULTS`).
* :class:`SelfPlayDriver` (and the one-call :func:`self_play`): runs the loop, resumes it, keeps a ``history``.
* :func:`generate_completions`: batched, length-sorted HF generation of K completions per prompt.

On disk, under the trainer config's ``output_dir``::

    iteration-{t}/pairs/             the training pairs of iteration t (datasets.save_to_disk; SPIN: mixed with the
                                     previous iterations' pairs, see ``mixing_window``), column ``iteration`` = origin
    iteration-{t}/                   π_{t+1}: model + tokenizer, trainer_config.json, trainer_state.json, checkpoints
    iteration-{t}/state.json         the iteration's metrics, written last: an iteration is finished iff it exists
    reference-model/                 π_ref for RSPO/INPO when it was given as an in-memory model (saved once)

Anchors. π_t is the model at the start of each iteration; every trainer precomputes its log-probs from the starting
weights (``precompute_ref_log_probs=True`` is forced), so only the policy stays in memory while training. RSPO and
INPO (trainers with ``needs_opponent``) also need the fixed π_ref: it is loaded for the trainer's construction only
(its log-probs are precomputed there) and released before training.

PEFT. With ``peft_config`` every iteration trains a fresh adapter on π_t, then merges it (``merge_and_unload``) and
saves full weights, so π_{t+1} is a plain model and the next iteration starts a new adapter on top of it.

Several processes (``accelerate launch``/``torchrun``): each process generates and annotates its contiguous shard of
the prompts; the pairs are gathered (``gather_object``) so every process holds the same dataset; only the main
process writes files, and all wait for it. Generation runs on each process's full copy of the model, outside the
trainer (a model that does not fit one device needs ``use_vllm`` or fewer processes). The output folder must be on a
file system all processes share.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import gc
import importlib
import json
import numbers
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .preference import SELECTION_STRATEGIES, annotate, select_pairs

__all__ = [
    "ALGORITHM_DEFAULTS",
    "SelfPlayArguments",
    "SelfPlayDriver",
    "generate_completions",
    "resolve_trainer",
    "self_play",
]

# Official outer-loop settings (spec §2.3, §3.2, §4.2, §5.2). SPIN generates greedily with the model's decoding
# config; SPPO/RSPO sample with vLLM (no top-k), INPO at temperature 1.0. Only SPIN mixes iterations (§2.2).
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "spin": dict(num_generations=1, do_sample=False, temperature=None, top_p=None, selection=None, mixing_window=2),
    "sppo": dict(num_generations=5, do_sample=True, temperature=0.7, top_p=0.9, selection="best_worst", mixing_window=1),
    "rspo": dict(num_generations=5, do_sample=True, temperature=0.7, top_p=0.9, selection="best_worst", mixing_window=1),
    "inpo": dict(num_generations=8, do_sample=True, temperature=1.0, top_p=1.0, selection="tournament", mixing_window=1),
}
GROUND_TRUTH_COLUMNS = ("real", "completion", "chosen")  # SPIN's answer column, first found wins
STATE_FILE = "state.json"
PAIRS_DIR = "pairs"
REFERENCE_DIR = "reference-model"
VLLM_INSTALL = "pip install vllm"


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


@dataclass
class SelfPlayArguments:
    """Settings of the self-play outer loop. ``None`` means the algorithm's official default
    (:data:`ALGORITHM_DEFAULTS`); the trainer's own hyper-parameters live in its config.

    Parameters:
        num_iterations: self-play iterations (official: 3 for SPPO/RSPO/INPO, 4 for SPIN).
        num_generations: K completions per prompt (SPIN 1, SPPO/RSPO 5, INPO 8). SPPO/RSPO/INPO need K ≥ 2.
        max_new_tokens: generation budget per completion (SPIN's official 256).
        temperature, top_p, do_sample: sampling (SPIN greedy; SPPO/RSPO 0.7/0.9; INPO 1.0/1.0). Sampling disables
            HF's top-k (``top_k=0``) as the official vLLM samplers do; set it in ``generation_kwargs`` if wanted.
        generation_kwargs: extra ``model.generate`` keyword arguments (e.g. ``repetition_penalty``).
        generation_batch_size: prompts per ``generate`` call (each yields K sequences).
        use_vllm: generate with vLLM's offline ``LLM`` from the saved π_t (needs ``pip install vllm`` and the model
            as a path); ``vllm_kwargs`` go to ``vllm.LLM``.
        selection: pair selection (:func:`~hfx_trainers.preference.select_pairs`): ``"best_worst"`` (SPPO/RSPO),
            ``"tournament"`` (INPO) or ``"all_pairs"``. Not used by SPIN (generation vs ground truth).
        drop_ties: drop pairs that carry no preference (P(chosen ≻ rejected) = ½; SPIN: a generation identical to
            the ground truth). Counted as ``ties_dropped`` in the iteration state.
        mixing_window: train on this and the previous ``mixing_window − 1`` iterations' pairs (SPIN 2, spec §2.2;
            others 1 = current only).
        prompt_splits: split the prompts into this many contiguous parts; iteration t uses part t mod n (the
            official SPPO/RSPO/INPO "ABC" schedule with 3).
        iteration_overrides: ``{t: {config field: value}}`` applied to iteration t's trainer config, e.g. SPIN's
            official ``{3: {"beta": 5.0, "learning_rate": 1e-7}}``.
        resume: skip finished iterations (those with ``state.json``) and continue from the last saved model.
        generation_seed: sampling seed; iteration t uses ``generation_seed + t`` (the trainer config's ``seed``
            seeds training).

    The dict fields also take a JSON string (command lines, YAML).

    >>> SelfPlayArguments(num_iterations=2).resolved("sppo").num_generations
    5
    """

    num_iterations: int = 3
    num_generations: int | None = None
    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    do_sample: bool | None = None
    generation_kwargs: dict | str | None = field(default_factory=dict)
    generation_batch_size: int = 16
    use_vllm: bool = False
    vllm_kwargs: dict | str | None = field(default_factory=dict)
    selection: str | None = None
    drop_ties: bool = True
    mixing_window: int | None = None
    prompt_splits: int = 1
    iteration_overrides: dict | str | None = field(default_factory=dict)
    resume: bool = True
    generation_seed: int = 0

    def __post_init__(self):
        for name in ("generation_kwargs", "vllm_kwargs", "iteration_overrides"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, {})
            elif isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value) if value.strip() else {})
                except json.JSONDecodeError as err:
                    raise ValueError(f"{name} must be a dict or a JSON object string; got {value!r} ({err})") from None
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"{name} must be a dict or a JSON object string; got {type(getattr(self, name)).__name__}")
        for name in ("num_iterations", "max_new_tokens", "generation_batch_size", "prompt_splits"):
            _check_count(name, getattr(self, name))
        for name in ("num_generations", "mixing_window"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        overrides = {}
        for key, value in dict(self.iteration_overrides).items():
            t = int(key) if isinstance(key, str) and key.isdigit() else key  # JSON/YAML keys are strings
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"iteration_overrides keys are iteration numbers (int ≥ 0), got {key!r}")
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"iteration_overrides[{t}] must be a dict of trainer-config fields, e.g. {{'beta': 5.0}}; got "
                    f"{type(value).__name__}"
                )
            overrides[t] = dict(value)
        self.iteration_overrides = overrides

    def resolved(self, algorithm: str) -> SelfPlayArguments:
        """A copy with every ``None`` replaced by ``algorithm``'s default, checked for that algorithm."""
        defaults = ALGORITHM_DEFAULTS[algorithm]
        filled = {k: defaults[k] if getattr(self, k) is None else getattr(self, k) for k in defaults}
        out = dataclasses.replace(self, **filled)
        late = [t for t in out.iteration_overrides if t >= out.num_iterations]
        if late:
            raise ValueError(
                f"iteration_overrides names iteration(s) {sorted(late)} but num_iterations={out.num_iterations} "
                f"(iterations are numbered 0..{out.num_iterations - 1})"
            )
        if algorithm == "spin":
            if self.selection is not None:
                raise ValueError("SPIN pairs each generation with the ground truth; `selection` does not apply to it")
        else:
            if out.num_generations < 2:
                raise ValueError(
                    f"{algorithm.upper()} compares completions of the same prompt, so it needs num_generations ≥ 2 "
                    f"(got {out.num_generations}); official: {defaults['num_generations']}"
                )
            if out.selection not in SELECTION_STRATEGIES:
                raise ValueError(f"unknown selection {out.selection!r}; choose one of {SELECTION_STRATEGIES}")
        if out.num_generations > 1 and not out.do_sample:
            raise ValueError(
                f"num_generations={out.num_generations} with greedy decoding (do_sample=False) gives identical "
                "completions; set do_sample=True (and a temperature) or num_generations=1"
            )
        return out

    def sampling_kwargs(self) -> dict[str, Any]:
        """The decoding keyword arguments of ``generate`` (after :meth:`resolved`)."""
        if not self.do_sample:
            return {"do_sample": False, **self.generation_kwargs}
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
        return {**{k: v for k, v in sampling.items() if v is not None}, **self.generation_kwargs}


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def _is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, list)


def _prompt_format(prompts: Sequence[Any]) -> bool:
    """True for conversational prompts (lists of messages), False for text; a mix is an error."""
    kinds = {_is_conversation(p) for p in prompts}
    if len(kinds) > 1:
        raise ValueError("the prompts mix text and conversations (lists of messages); use one format")
    return kinds == {True}


def check_tokenizer(tokenizer: Any, conversational: bool) -> None:
    """Batched left-padded generation needs a pad token; conversational prompts need a chat template."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            "the tokenizer has no pad token, which batched generation needs; set one first, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token"
        )
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the prompts are conversations (lists of messages) but the tokenizer has no chat template; set "
            "tokenizer.chat_template or pass text prompts"
        )


def check_generative(model: Any) -> None:
    can_generate = getattr(model, "can_generate", None)
    if not callable(getattr(model, "generate", None)) or (callable(can_generate) and not can_generate()):
        raise TypeError(
            f"{type(model).__name__} cannot generate text; self-play samples completions from the policy, so it "
            "needs a causal LM (e.g. AutoModelForCausalLM.from_pretrained(path))"
        )


def _encode(tokenizer, prompts: Sequence[Any], conversational: bool) -> list[list[int]]:
    """Token ids of each prompt, as TRL's DPOTrainer tokenises them for training: the chat template with the
    generation prompt for conversations (the template writes the special tokens), the tokenizer's own special
    tokens for text."""
    if conversational:
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(list(prompts))["input_ids"]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def _stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos (TRL appends it to every training completion) and the model's own eos ids."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return ids


def _decode(tokenizer, new_tokens: torch.Tensor, stop_ids: Sequence[int]) -> list[str]:
    """Decode generated tokens up to (excluding) the first stop token; what follows it is padding."""
    stop = set(stop_ids)
    rows = []
    for row in new_tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in stop), len(row))
        rows.append(row[:end])
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _as_completion(text: str, conversational: bool) -> Any:
    return [{"role": "assistant", "content": text}] if conversational else text


def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[Any],
    num_generations: int = 1,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    *,
    desc: str | None = "Generating completions",
    disable_progress: bool = False,
    **generate_kwargs: Any,
) -> list[list[Any]]:
    """``num_generations`` completions of each prompt, in the prompts' order: ``out[i][k]`` is the k-th completion of
    ``prompts[i]``.

    Prompts are tokenised as TRL trains on them (text: the tokenizer's special tokens; conversations: the chat
    template with ``add_generation_prompt=True``), sorted by length (longest first, so padding is small and an
    out-of-memory shows up on the first batch), left-padded and generated ``batch_size`` prompts per ``generate``
    call with ``num_return_sequences=num_generations``, under ``torch.no_grad`` in eval mode (the training mode is
    restored). Text completions are decoded with ``skip_special_tokens=True`` up to the first eos (the tokenizer's
    or the model's); conversational prompts get ``[{"role": "assistant", "content": text}]``. ``generate_kwargs``
    (``do_sample``, ``temperature``, ...) go to ``model.generate``; without them the model's generation config
    decides.

    >>> completions = generate_completions(model, tokenizer, ["2+3=", "10+7="], num_generations=2,
    ...                                    max_new_tokens=4, do_sample=True)  # doctest: +SKIP
    >>> len(completions), len(completions[0])  # doctest: +SKIP
    (2, 2)
    """
    prompts = list(prompts)
    if not prompts:
        return []
    _check_count("num_generations", num_generations)
    _check_count("max_new_tokens", max_new_tokens)
    _check_count("generation_batch_size", batch_size)
    conversational = _prompt_format(prompts)
    check_tokenizer(tokenizer, conversational)
    check_generative(model)
    encoded = _encode(tokenizer, prompts, conversational)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    stop_ids = _stop_ids(model, tokenizer)
    out: list[list[Any]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    # An explicit disable=False would override the TQDM_DISABLE environment variable: pass it only to silence.
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", **({"disable": True} if disable_progress else {}))
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                ids, mask = _left_pad([encoded[i] for i in rows], tokenizer.pad_token_id)
                sequences = model.generate(
                    input_ids=ids.to(model.device),
                    attention_mask=mask.to(model.device),
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=num_generations,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stop_ids,
                    **generate_kwargs,
                )
                texts = _decode(tokenizer, sequences[:, ids.shape[1]:], stop_ids)
                for n, i in enumerate(rows):  # generate repeats each prompt K times in a row
                    group = texts[n * num_generations:(n + 1) * num_generations]
                    out[i] = [_as_completion(text, conversational) for text in group]
                bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return out


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"use_vllm=True needs vLLM, which is not installed: {VLLM_INSTALL}") from err
    return vllm


def vllm_completions(model_path: str, tokenizer, prompts: Sequence[Any], num_generations: int, max_new_tokens: int,
                     *, seed: int = 0, vllm_kwargs: dict | None = None, do_sample: bool = True, **sampling) -> list:
    """``num_generations`` completions per prompt from vLLM's offline engine on the model saved at ``model_path``,
    prompts tokenised as for HF generation (:func:`generate_completions`'s return format). ``sampling`` takes the
    ``generate``-style ``temperature``, ``top_p``, ``top_k`` (0/None = off); ``vllm_kwargs`` go to ``vllm.LLM``."""
    vllm = _import_vllm()
    conversational = _prompt_format(prompts)
    encoded = _encode(tokenizer, prompts, conversational)
    params = vllm.SamplingParams(
        n=num_generations,
        max_tokens=max_new_tokens,
        temperature=sampling.get("temperature", 1.0) if do_sample else 0.0,
        top_p=sampling.get("top_p", 1.0) if do_sample else 1.0,
        top_k=sampling.get("top_k") or -1,
        seed=seed,
    )
    llm = vllm.LLM(model=model_path, seed=seed, **(vllm_kwargs or {}))
    try:
        results = llm.generate([{"prompt_token_ids": ids} for ids in encoded], params)
        return [[_as_completion(o.text, conversational) for o in r.outputs] for r in results]
    finally:
        del llm
        _free_memory()


# --------------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------------


def _content(completion: Any) -> Any:
    if isinstance(completion, list) and completion and isinstance(completion[-1], Mapping):
        return completion[-1].get("content")
    return completion


def spin_pairs(prompts: Sequence[Any], truths: Sequence[Any], candidates: Sequence[Sequence[Any]],
               drop_ties: bool = True) -> tuple[dict[str, list], int]:
    """SPIN's pairs: every generation against the ground truth. Returns the columns ``prompt``, ``real``,
    ``generated`` and the number of pairs dropped because the generation equals the ground truth (``drop_ties``).

    >>> spin_pairs(["q1", "q2"], ["a", "b"], [["a"], ["c"]])
    ({'prompt': ['q2'], 'real': ['b'], 'generated': ['c']}, 1)
    """
    columns: dict[str, list] = {"prompt": [], "real": [], "generated": []}
    ties = 0
    for prompt, truth, group in zip(prompts, truths, candidates, strict=True):
        for generated in group:
            if drop_ties and _content(generated) == _content(truth):
                ties += 1  # identical answers: the SPIN margin is 0 whatever θ, no gradient
                continue
            columns["prompt"].append(prompt)
            columns["real"].append(truth)
            columns["generated"].append(generated)
    return columns, ties


def preference_pairs(preference_model, prompts: Sequence[Any], candidates: Sequence[Sequence[Any]],
                     selection: str = "best_worst", drop_ties: bool = True) -> tuple[dict[str, list], int]:
    """SPPO/RSPO/INPO pairs: annotate the K candidates of each prompt with ``preference_model`` (validated by
    :func:`~hfx_trainers.preference.annotate`), select pairs with ``selection`` and return
    :meth:`~hfx_trainers.preference.PreferencePairs.to_columns` (``prompt``, ``chosen``, ``rejected``, the win
    probabilities, the indices) with the number of tied pairs dropped."""
    probs = annotate(preference_model, prompts, candidates)
    pairs = select_pairs(probs, selection, drop_ties=drop_ties)
    ties = len(select_pairs(probs, selection)) - len(pairs) if drop_ties else 0
    return pairs.to_columns(prompts, candidates), ties


def _records(columns: Mapping[str, list]) -> list[dict[str, Any]]:
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _split_range(n: int, parts: int, index: int) -> range:
    """The ``index``-th of ``parts`` contiguous, nearly equal ranges of ``range(n)`` (like numpy.array_split)."""
    size, extra = divmod(n, parts)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def resolve_trainer(trainer: Any) -> type:
    """A trainer class from a class, a name (``"spin"`` -> ``hfx_trainers.spin:SPINTrainer``) or ``"module:Class"``,
    imported only now."""
    if isinstance(trainer, type):
        return trainer
    if not isinstance(trainer, str):
        raise TypeError(f"trainer must be a trainer class or a name such as 'sppo', got {type(trainer).__name__}")
    if ":" in trainer:
        module, _, name = trainer.partition(":")
    elif trainer.lower() in ALGORITHM_DEFAULTS:
        module, name = f"hfx_trainers.{trainer.lower()}", f"{trainer.upper()}Trainer"
    else:
        raise ValueError(f"unknown self-play trainer {trainer!r}; choose one of {sorted(ALGORITHM_DEFAULTS)}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"cannot import the trainer {module}:{name} ({err})") from err


def _algorithm(trainer_cls: type) -> str:
    name = str(getattr(trainer_cls, "_name", "")).lower()
    if name not in ALGORITHM_DEFAULTS:
        raise ValueError(
            f"cannot tell which self-play algorithm {trainer_cls.__name__} implements: its `_name` must be one of "
            f"{[a.upper() for a in ALGORITHM_DEFAULTS]} (subclass SPINTrainer, SPPOTrainer, RSPOTrainer or "
            "INPOTrainer)"
        )
    return name


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _is_peft(model: Any) -> bool:
    return callable(getattr(model, "merge_and_unload", None)) and hasattr(model, "peft_config")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _metric(value: Any) -> Any:
    if value is None or isinstance(value, numbers.Real):
        return None if value is None else float(value)
    if isinstance(value, Mapping):
        return {str(k): _metric(v) for k, v in value.items()}
    if hasattr(value, "item"):
        return float(value.item())
    raise TypeError(f"eval_fn must return a number or a dict of numbers, got {type(value).__name__}")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)  # atomic: state.json is the completion marker


class SelfPlayDriver:
    """Iterative self-play (SPIN, SPPO, RSPO, INPO) around a per-iteration TRL trainer.

    Args:
        trainer: the per-iteration trainer class, or its name (``"spin"``, ``"sppo"``, ``"rspo"``, ``"inpo"``).
        model: the starting model π_0: a path, or a causal LM (trained in place at iteration 0, as trainers do).
        args: the trainer's config (e.g. ``SPPOConfig``); its ``output_dir`` is the run folder. Each iteration uses a
            copy with ``output_dir=<run>/iteration-{t}``, ``precompute_ref_log_probs=True`` and
            ``selfplay_args.iteration_overrides[t]``. ``model_init_kwargs`` apply to the models loaded from disk.
        prompts: a ``datasets.Dataset`` (or a list of prompts) with a ``prompt`` column, text or conversational;
            SPIN also needs the ground-truth answer in ``real``, ``completion`` or ``chosen``.
        selfplay_args: :class:`SelfPlayArguments`.
        preference_model: SPPO/RSPO/INPO: a :class:`~hfx_trainers.preference.PreferenceModel` (wrap a reward
            function with ``from_reward_fn``, a judge with ``from_pairwise``, a reward model with
            ``from_reward_model``, PairRM with ``pairrm()``).
        processing_class: the tokenizer (default: loaded from the model's path).
        ref_model: RSPO/INPO's fixed π_ref, a path or a model (default: the starting model).
        peft_config: train a fresh adapter each iteration, merged into π_{t+1} when saved.
        eval_fn: ``eval_fn(model, tokenizer) -> float | dict`` run on π_0 and after every iteration.
        callbacks: ``TrainerCallback`` s given to every iteration's trainer.

    ``run()`` returns the folder of the final model; ``history`` holds each iteration's state (also in
    ``iteration-{t}/state.json``).

    Example::

        from hfx import toy
        from hfx_trainers.preference import from_pairwise
        from hfx_trainers.selfplay import SelfPlayArguments, SelfPlayDriver
        from hfx_trainers.sppo import SPPOConfig

        task = toy.ArithmeticTask()
        driver = SelfPlayDriver(
            "sppo", model=str(toy.warm_start("arithmetic")), args=SPPOConfig("sppo-run", beta=0.1),
            prompts=task.dataset("train", format="prompt"),
            selfplay_args=SelfPlayArguments(num_iterations=3, max_new_tokens=4, prompt_splits=3),
            preference_model=from_pairwise(task.prefer), eval_fn=task.accuracy,
        )
        final = driver.run()          # sppo-run/iteration-2
        driver.history[-1]["eval_after"]
    """

    def __init__(
        self,
        trainer: type | str,
        model: Any,
        args: Any,
        prompts: Any,
        selfplay_args: SelfPlayArguments | None = None,
        *,
        preference_model: Callable[..., Any] | None = None,
        processing_class: Any = None,
        ref_model: Any = None,
        peft_config: Any = None,
        eval_fn: Callable[[Any, Any], Any] | None = None,
        callbacks: list | None = None,
    ):
        self.trainer_cls = resolve_trainer(trainer)
        self.algorithm = _algorithm(self.trainer_cls)
        self.two_anchors = bool(getattr(self.trainer_cls, "needs_opponent", False))
        self.args = self._check_args(args)
        self.selfplay_args = (selfplay_args or SelfPlayArguments()).resolved(self.algorithm)
        self.prompts, self.truth_column = self._check_prompts(prompts)
        self.preference_model = self._check_preference_model(preference_model)
        if ref_model is not None and not self.two_anchors:
            raise ValueError(
                f"{self.algorithm.upper()}'s reference is π_t, the model at the start of each iteration; ref_model "
                "(a fixed π_ref) is for RSPO/INPO"
            )
        self.output_dir = Path(self.args.output_dir)
        self.configs = [self._iteration_config(t) for t in range(self.selfplay_args.num_iterations)]
        if self.selfplay_args.use_vllm:
            _import_vllm()
            if not _is_path(model):
                raise ValueError("use_vllm=True loads π_0 from disk: pass the model as a path")
        if not _is_path(model):
            check_generative(model)
        self.model, self.ref_model = model, ref_model
        self.tokenizer = self._load_tokenizer(processing_class, model)
        check_tokenizer(self.tokenizer, _prompt_format(list(self.prompts["prompt"])))
        plugin = getattr(self.args, "deepspeed_plugin", None)
        if peft_config is not None and getattr(plugin, "zero_stage", None) == 3:
            raise ValueError(
                "peft_config with DeepSpeed ZeRO-3 is not supported by self-play: merging the adapter into π_{t+1} "
                "needs the full weights; use ZeRO-2 or full fine-tuning"
            )
        self.peft_config, self.eval_fn, self.callbacks = peft_config, eval_fn, callbacks
        self.history: list[dict[str, Any]] = []

    # -- checks (before any model is loaded) ---------------------------------------------------------

    def _check_args(self, args):
        config_class = getattr(self.trainer_cls, "config_class", None)
        if args is None:
            raise ValueError("pass the trainer's config as `args` (its output_dir is the self-play run folder)")
        if config_class is not None and not isinstance(args, config_class):
            raise TypeError(
                f"{self.trainer_cls.__name__} needs a {config_class.__name__} as args, got {type(args).__name__}"
            )
        self._check_sync(args)
        return args

    @staticmethod
    def _check_sync(config):
        if getattr(config, "sync_ref_model", False):
            raise ValueError(
                "sync_ref_model=True is not supported by self-play: each iteration's anchors (π_t, π_ref) are fixed "
                "and precomputed; set sync_ref_model=False (π_t is refreshed every iteration instead)"
            )

    def _check_prompts(self, prompts):
        from datasets import Dataset

        if isinstance(prompts, (list, tuple)):
            prompts = Dataset.from_dict({"prompt": list(prompts)})
        if not isinstance(prompts, Dataset):
            raise TypeError(
                f"prompts must be a datasets.Dataset with a `prompt` column (or a list of prompts), got "
                f"{type(prompts).__name__}"
            )
        if "prompt" not in prompts.column_names:
            raise ValueError(
                f"the prompts dataset needs a `prompt` column; got columns {prompts.column_names} (rename yours with "
                "dataset.rename_column(..., 'prompt'))"
            )
        if len(prompts) < self.selfplay_args.prompt_splits:
            raise ValueError(
                f"prompt_splits={self.selfplay_args.prompt_splits} but there are only {len(prompts)} prompts"
            )
        truth = None
        if self.algorithm == "spin":
            truth = next((c for c in GROUND_TRUTH_COLUMNS if c in prompts.column_names), None)
            if truth is None:
                raise ValueError(
                    f"SPIN trains the ground-truth answer against the model's own: the prompts dataset needs the answer "
                    f"in a `real`, `completion` or `chosen` column; got columns {prompts.column_names}"
                )
        return prompts.select_columns(["prompt"] + ([truth] if truth else [])), truth

    def _check_preference_model(self, preference_model):
        if self.algorithm == "spin":
            if preference_model is not None:
                raise ValueError("SPIN pairs generations with the ground truth; it takes no preference_model")
            return None
        if preference_model is None:
            raise ValueError(
                f"{self.algorithm.upper()} needs a preference_model to compare the K completions: e.g. "
                "hfx_trainers.preference.from_reward_fn(reward_fn), from_pairwise(judge), from_reward_model(rm) or "
                "pairrm()"
            )
        if not callable(preference_model):
            raise TypeError(
                f"preference_model must be callable as model(prompts, candidates) -> (B, K, K) probabilities, got "
                f"{type(preference_model).__name__}"
            )
        return preference_model

    def _iteration_config(self, t: int):
        overrides = self.selfplay_args.iteration_overrides.get(t, {})
        valid = {f.name for f in dataclasses.fields(self.args) if f.init}
        for key in overrides:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"iteration_overrides[{t}] sets {key!r}, which is not a field of {type(self.args).__name__}{hint}"
                )
            if key in ("output_dir", "precompute_ref_log_probs"):
                raise ValueError(f"iteration_overrides[{t}] cannot set {key!r}: the self-play driver sets it")
        forced = {"output_dir": str(self.iteration_dir(t)), "precompute_ref_log_probs": True}
        try:
            config = dataclasses.replace(self.args, **overrides, **forced)
        except (ValueError, TypeError) as err:
            raise ValueError(f"iteration_overrides[{t}] = {overrides}: {err}") from err
        self._check_sync(config)
        return config

    @staticmethod
    def _load_tokenizer(processing_class, model):
        if processing_class is not None:
            return processing_class
        from transformers import AutoTokenizer

        path = model if _is_path(model) else getattr(getattr(model, "config", None), "_name_or_path", None)
        if not path:
            raise ValueError("cannot find the model's tokenizer: pass processing_class=tokenizer")
        return AutoTokenizer.from_pretrained(str(path))

    # -- paths and state --------------------------------------------------------------------------------

    def iteration_dir(self, t: int) -> Path:
        return self.output_dir / f"iteration-{t}"

    def _read_state(self, t: int) -> dict | None:
        path = self.iteration_dir(t) / STATE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def _resume_point(self) -> int:
        """Load the states of the finished iterations into ``history``; return the first unfinished one."""
        self.history = []
        if not self.selfplay_args.resume:
            return 0
        for t in range(self.selfplay_args.num_iterations):
            state = self._read_state(t)
            if state is None:
                break
            if state.get("algorithm") != self.algorithm:
                raise ValueError(
                    f"{self.iteration_dir(t)} holds a {state.get('algorithm')!r} iteration, not {self.algorithm!r}; "
                    "use another output_dir or resume=False"
                )
            self.history.append(state)
        return len(self.history)

    # -- models -------------------------------------------------------------------------------------

    def _load_model(self, source: Any):
        """``source`` itself if it is a model, else ``from_pretrained`` as TRL loads a model path, on the device of
        this process."""
        if not _is_path(source):
            model = source
        else:
            from trl.trainer.utils import create_model_from_path

            kwargs = dict(self.args.model_init_kwargs or {})
            if self.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                kwargs["device_map"] = None  # as TRL: one full copy per process
            kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
            model = create_model_from_path(str(source), **kwargs)
        check_generative(model)
        if getattr(model, "hf_device_map", None) is None and model.device != self.args.device:
            model.to(self.args.device)
        return model

    def _reference_source(self, state) -> Any:
        """π_ref for RSPO/INPO: a path when one was given; an in-memory starting model is saved once, so that the
        policy trained in place at iteration 0 does not change it."""
        if self.ref_model is not None:
            return self.ref_model
        if _is_path(self.model):
            return self.model
        path = self.output_dir / REFERENCE_DIR
        if state.is_main_process and not (path / "config.json").is_file():
            self.model.save_pretrained(path)
        state.wait_for_everyone()
        return path

    def _build_trainer(self, t: int, policy, dataset, reference):
        kwargs = dict(model=policy, args=self.configs[t], train_dataset=dataset, processing_class=self.tokenizer,
                      callbacks=self.callbacks)
        if self.peft_config is not None:  # a copy: PEFT writes the base model's path into the config it is given
            kwargs["peft_config"] = copy.deepcopy(self.peft_config)
        if reference is None:
            return self.trainer_cls(**kwargs)
        ref = self._load_model(reference)
        trainer = self.trainer_cls(ref_model=ref, **kwargs)
        # π_ref's log-probs are precomputed now: drop every reference to it, including the one the Accelerator
        # keeps for each prepared model, so only the policy stays in memory while training.
        trainer.ref_model = None
        models = getattr(trainer.accelerator, "_models", [])
        models[:] = [m for m in models if m is not ref]
        del ref
        _free_memory()
        return trainer

    def _save(self, trainer, out: Path, state):
        """Save π_{t+1} (PEFT: merged into full weights) with the tokenizer and the trainer's config and log."""
        model = trainer.model
        if _is_peft(model):
            model = model.merge_and_unload()
            if state.is_main_process:
                model.save_pretrained(out)
                self.tokenizer.save_pretrained(out)
        else:
            trainer.save_model(str(out))  # every process: DeepSpeed/FSDP gather the weights
        trainer.save_state()
        if state.is_main_process:
            (out / "trainer_config.json").write_text(trainer.args.to_json_string())
        return model

    # -- one iteration ------------------------------------------------------------------------------

    def _local_pairs(self, t: int, prompts, policy, source, state) -> tuple[list[dict], dict[str, float]]:
        """Generate and annotate this process's shard of ``prompts``; return its pair records and timings."""
        sp = self.selfplay_args
        shard = _split_range(len(prompts), state.num_processes, state.process_index)
        local = prompts.select(shard)
        texts = list(local["prompt"])
        seconds = {"generation": 0.0, "annotation": 0.0}
        if not texts:
            return [], {**seconds, "ties": 0}
        from transformers import set_seed

        set_seed(sp.generation_seed + t)
        start = time.perf_counter()
        if sp.use_vllm:
            candidates = vllm_completions(str(source), self.tokenizer, texts, sp.num_generations, sp.max_new_tokens,
                                          seed=sp.generation_seed + t, vllm_kwargs=sp.vllm_kwargs,
                                          **sp.sampling_kwargs())
        else:
            candidates = generate_completions(
                policy, self.tokenizer, texts, sp.num_generations, sp.max_new_tokens, sp.generation_batch_size,
                desc=f"iteration {t}: generating", disable_progress=not state.is_local_main_process,
                **sp.sampling_kwargs(),
            )
        seconds["generation"] = time.perf_counter() - start
        start = time.perf_counter()
        if self.algorithm == "spin":
            columns, ties = spin_pairs(texts, list(local[self.truth_column]), candidates, sp.drop_ties)
        else:
            columns, ties = preference_pairs(self.preference_model, texts, candidates, sp.selection, sp.drop_ties)
            columns["prompt_index"] = [i + shard.start for i in columns["prompt_index"]]
        seconds["annotation"] = time.perf_counter() - start
        columns["iteration"] = [t] * len(columns["prompt"])
        return _records(columns), {**seconds, "ties": ties}

    def _pair_dataset(self, t: int, records: list[dict], state):
        """Iteration t's training set: the pairs of the previous ``mixing_window − 1`` iterations, then its new ones.
        Saved by the main process and loaded from disk by all (TRL caches its precomputed columns next to the data,
        which must be one file all processes see). An empty set is not saved (``datasets`` cannot reload one)."""
        from datasets import Dataset, concatenate_datasets, load_from_disk

        path = self.iteration_dir(t) / PAIRS_DIR
        window, previous = self.selfplay_args.mixing_window, None
        if window > 1 and t > 0 and (self.iteration_dir(t - 1) / PAIRS_DIR).is_dir():
            previous = load_from_disk(str(self.iteration_dir(t - 1) / PAIRS_DIR))
            previous = previous.filter(lambda it: it > t - window, input_columns="iteration", keep_in_memory=True)
        new = Dataset.from_list(records, features=None if previous is None else previous.features)
        dataset = new if previous is None else concatenate_datasets([previous, new])
        if state.is_main_process:
            shutil.rmtree(path, ignore_errors=True)
            if len(dataset):
                dataset.save_to_disk(str(path))
        state.wait_for_everyone()
        return load_from_disk(str(path)) if len(dataset) else dataset

    def _train(self, t: int, policy, dataset, state):
        """Train π_{t+1} from ``policy`` on ``dataset`` and save it; return it with the train loss."""
        out = self.iteration_dir(t)
        if len(dataset) == 0:
            if state.is_main_process:
                print(f"self-play {self.algorithm} iteration-{t}: no pairs (all ties dropped), the model is unchanged")
                policy.save_pretrained(out)
                self.tokenizer.save_pretrained(out)
            return policy, None
        reference = self._reference_source(state) if self.two_anchors else None
        trainer = self._build_trainer(t, policy, dataset, reference)
        train_loss = trainer.train().training_loss
        return self._save(trainer, out, state), train_loss

    def _invalidate_from(self, t: int) -> None:
        """Recomputing iteration t makes its and every later iteration's results stale: drop their markers."""
        for marker in self.output_dir.glob(f"iteration-*/{STATE_FILE}"):
            index = marker.parent.name.removeprefix("iteration-")
            if index.isdigit() and int(index) >= t:
                marker.unlink()

    def _evaluate(self, model) -> Any:
        return None if self.eval_fn is None else _metric(self.eval_fn(model, self.tokenizer))

    def _iteration(self, t: int, state) -> dict[str, Any]:
        from accelerate.utils import gather_object

        sp = self.selfplay_args
        begin = time.perf_counter()
        out = self.iteration_dir(t)
        source = self.model if t == 0 else self.iteration_dir(t - 1)
        if state.is_main_process:
            self._invalidate_from(t)
            out.mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()

        split = t % sp.prompt_splits
        prompts = self.prompts.select(_split_range(len(self.prompts), sp.prompt_splits, split))
        if sp.use_vllm:  # vLLM takes the accelerator first; the HF policy is loaded after it is freed
            records, local = self._local_pairs(t, prompts, None, source, state)
            policy = self._load_model(source)
        else:
            policy = self._load_model(source)
            records, local = self._local_pairs(t, prompts, policy, source, state)
        eval_before = self.history[-1]["eval_after"] if self.history else self._evaluate(policy)
        records = gather_object(records)
        ties = sum(s["ties"] for s in gather_object([local]))
        dataset = self._pair_dataset(t, records, state)

        start = time.perf_counter()
        trained, train_loss = self._train(t, policy, dataset, state)
        training_seconds = time.perf_counter() - start
        eval_after = self._evaluate(trained)
        del policy, trained
        _free_memory()

        result = {
            "iteration": t,
            "algorithm": self.algorithm,
            "trainer": self.trainer_cls.__name__,
            "prompt_split": split,
            "num_prompts": len(prompts),
            "num_generations": sp.num_generations,
            "num_new_pairs": len(records),
            "num_pairs": len(dataset),
            "ties_dropped": ties,
            "train_loss": train_loss,
            "eval_before": eval_before,
            "eval_after": eval_after,
            "overrides": sp.iteration_overrides.get(t, {}),
            "seconds": {
                "generation": round(local["generation"], 3),
                "annotation": round(local["annotation"], 3),
                "training": round(training_seconds, 3),
                "total": round(time.perf_counter() - begin, 3),
            },
            "model": str(out),
        }
        if state.is_main_process:
            _write_json(out / STATE_FILE, result)
            loss = "n/a" if train_loss is None else f"{train_loss:.4f}"
            print(
                f"self-play {self.algorithm} iteration-{t} ({t + 1}/{sp.num_iterations}): {len(dataset)} pairs "
                f"({len(records)} new, {ties} ties dropped), train loss {loss}, eval {eval_before} -> {eval_after}, "
                f"{result['seconds']['total']:.1f}s"
            )
        state.wait_for_everyone()
        if state.is_main_process and len(dataset):
            dataset.cleanup_cache_files()  # TRL's tokenised copies beside the saved pairs: no longer needed
        return result

    def run(self) -> Path:
        """Run the remaining iterations; return the folder of the final model π_{num_iterations}."""
        from accelerate import PartialState

        self.args.device  # noqa: B018 - sets up the (distributed) state the trainers will use
        state = PartialState()
        for t in range(self._resume_point(), self.selfplay_args.num_iterations):
            self.history.append(self._iteration(t, state))
        return self.iteration_dir(self.selfplay_args.num_iterations - 1)


def self_play(trainer: type | str, model: Any, args: Any, prompts: Any,
              selfplay_args: SelfPlayArguments | None = None, **kwargs: Any) -> Path:
    """Build a :class:`SelfPlayDriver` and run it; returns the final model's folder.

    >>> final = self_play("spin", "path/to/sft-model", SPINConfig("spin-run"), sft_dataset,
    ...                   SelfPlayArguments(num_iterations=4, iteration_overrides={3: {"beta": 5.0}}))  # doctest: +SKIP
    """
    return SelfPlayDriver(trainer, model, args, prompts, selfplay_args, **kwargs).run()
