"""Preference models and pair selection for the self-play driver (SPPO, RSPO, INPO; spec ``specs/trainers.md`` §3–§5,
§10.2).

Each self-play iteration samples K completions per prompt from π_t, asks a *preference model* how they compare, and
turns the answer into training pairs with per-example scalars. The answer is a win-probability matrix per prompt::

    P[b, i, j] = P(candidate i ≻ candidate j | prompt b),   P[b, i, i] = ½,   P[b, i, j] + P[b, j, i] = 1

* :class:`PreferenceModel` is the protocol: ``model(prompts, candidates) -> Tensor`` of shape ``(B, K, K)``;
  :func:`annotate` calls one and checks its answer with :func:`validate_preference_matrix`.
* Adapters: :func:`from_reward_fn` (Bradley–Terry ``σ(r_i − r_j)`` of a TRL-style reward function),
  :func:`from_pairwise` (a judge giving ``P(a ≻ b)``), :func:`from_reward_model` (an
  ``AutoModelForSequenceClassification``) and :func:`pairrm` (PairRM through the optional ``llm-blender`` package,
  as the official SPPO/RSPO pipelines use).
* Selection: :func:`select_best_worst` (official SPPO/RSPO: best and worst by mean win rate), :func:`select_tournament`
  (INPO's official annotation: knockout brackets), :func:`select_all_pairs`; :func:`select_pairs` picks one by name.
  Each returns :class:`PreferencePairs`, whose :meth:`PreferencePairs.to_columns` gives the columns of a
  ``datasets.Dataset``.

Example::

    >>> from hfx.toy import ArithmeticTask
    >>> task = ArithmeticTask()
    >>> probs = annotate(from_pairwise(task.prefer), ["2+3="], [["5", "6", "4"]])
    >>> pairs = select_best_worst(probs)
    >>> pairs.to_columns(["2+3="], [["5", "6", "4"]])["chosen"], pairs.chosen_win_prob.tolist()
    (['5'], [0.8333333333333334])

Only torch is imported at module level; transformers and llm-blender are imported by the adapters that need them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "PAIRRM_INSTALL",
    "PROB_ATOL",
    "SELECTION_STRATEGIES",
    "TIE_TOL",
    "PairRMPreference",
    "PairwisePreference",
    "PreferenceModel",
    "PreferencePairs",
    "RewardFnPreference",
    "RewardModelPreference",
    "annotate",
    "bradley_terry",
    "check_candidates",
    "from_pairwise",
    "from_reward_fn",
    "from_reward_model",
    "mean_win_rate",
    "pairrm",
    "select_all_pairs",
    "select_best_worst",
    "select_pairs",
    "select_tournament",
    "validate_preference_matrix",
]

PROB_ATOL = 1e-4
"""Slack of :func:`validate_preference_matrix`: float32 sigmoids and judges' rounding stay well inside it."""

TIE_TOL = 1e-6
"""Two win probabilities (or a pair probability and ½) closer than this count as a tie in the selection utilities."""

SELECTION_STRATEGIES = ("best_worst", "tournament", "all_pairs")

PAIRRM_INSTALL = "pip install git+https://github.com/yuchenlin/LLM-Blender.git"
"""How the SPPO/RSPO authors install PairRM's package (PyPI's ``llm-blender`` 0.0.2 is older; spec §3.5)."""


# --------------------------------------------------------------------------------------------------
# Protocol and validation
# --------------------------------------------------------------------------------------------------


class PreferenceModel(Protocol):
    """Anything that compares K candidate completions of each prompt.

    ``model(prompts, candidates)`` gets ``B`` prompts and, for each, a list of ``K ≥ 2`` completions (the same K for
    every prompt) and returns a float tensor of shape ``(B, K, K)`` with ``P[b, i, j] = P(candidates[b][i] ≻
    candidates[b][j] | prompts[b])``: values in [0, 1], ``P[b, i, i] = ½`` and ``P[b, i, j] + P[b, j, i] = 1``.
    A plain function with this signature qualifies; :func:`annotate` checks the answer.
    """

    def __call__(self, prompts: list[str], candidates: list[list[str]]) -> Tensor: ...


def check_candidates(prompts: Sequence[Any], candidates: Sequence[Sequence[Any]]) -> int:
    """Check that there is one list of candidates per prompt, all of one length K ≥ 2, and return K.

    >>> check_candidates(["1+1="], [["2", "3"]])
    2
    """
    if isinstance(prompts, str) or isinstance(candidates, str):
        raise TypeError("prompts and candidates must be lists (B prompts, and B lists of K completions), not a str")
    if len(prompts) != len(candidates):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(candidates)} candidate lists; pass one list of K completions per "
            "prompt"
        )
    if not prompts:
        raise ValueError("no prompts to annotate: pass at least one prompt with its K completions")
    sizes = set()
    for b, group in enumerate(candidates):
        if isinstance(group, str):
            raise TypeError(f"candidates[{b}] is a str; each prompt needs a list of K completions")
        sizes.add(len(group))
    if len(sizes) > 1:
        raise ValueError(
            f"every prompt needs the same number K of candidates, got sizes {sorted(sizes)}; sample the same "
            "number of completions for each prompt"
        )
    (k,) = sizes
    _check_k(k)
    return k


def _check_k(k: int) -> None:
    if k < 2:
        raise ValueError(
            f"self-play needs K ≥ 2 candidates per prompt to form a pair, got K={k}; sample at least 2 completions "
            "per prompt"
        )


def _where(mask: Tensor) -> str:
    """The first index where ``mask`` holds, as ``[b, i, j]``."""
    return str(mask.nonzero()[0].tolist())


def validate_preference_matrix(
    probs: Any,
    batch_size: int | None = None,
    num_candidates: int | None = None,
    *,
    atol: float = PROB_ATOL,
    source: str = "the preference model",
) -> Tensor:
    """Check that ``probs`` is a batch of win-probability matrices and return it as a tensor.

    Requirements (each violation is a ``ValueError``/``TypeError`` that says how to fix it): a floating tensor of
    shape ``(B, K, K)`` with K ≥ 2 (and the expected B, K when given), no NaN/inf, values in [0, 1], ``P[b, i, i] =
    ½`` and ``P[b, i, j] + P[b, j, i] = 1``, the last three up to ``atol`` (or twice the dtype's resolution if that
    is coarser, so that a half-precision matrix is not rejected for its rounding). Lists and arrays are converted.

    >>> validate_preference_matrix(torch.tensor([[[0.5, 0.8], [0.2, 0.5]]])).shape
    torch.Size([1, 2, 2])
    >>> validate_preference_matrix(torch.tensor([[[0.5, 0.8], [0.8, 0.5]]]))
    Traceback (most recent call last):
    ...
    ValueError: the preference model returned P[i, j] + P[j, i] = 1.6 at [0, 0, 1] (it must be 1: ...
    """
    if not isinstance(probs, Tensor):
        try:
            probs = torch.as_tensor(probs)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{source} must return a tensor of shape (B, K, K), got {type(probs).__name__}") from err
    if not probs.is_floating_point():
        raise TypeError(
            f"{source} returned a {probs.dtype} tensor; it must return floating-point probabilities P(i ≻ j) "
            "(e.g. .float() a 0/1 matrix and put ½ on the diagonal)"
        )
    if probs.ndim != 3 or probs.shape[1] != probs.shape[2]:
        raise ValueError(
            f"{source} returned shape {tuple(probs.shape)}; it must return (B, K, K): one K×K win-probability matrix "
            "per prompt (add a batch dimension with .unsqueeze(0) for a single prompt)"
        )
    _check_k(probs.shape[1])
    expected = (batch_size if batch_size is not None else probs.shape[0], num_candidates or probs.shape[1])
    if tuple(probs.shape[:2]) != expected:
        raise ValueError(
            f"{source} returned shape {tuple(probs.shape)} but was given {expected[0]} prompts with {expected[1]} "
            f"candidates each; it must return ({expected[0]}, {expected[1]}, {expected[1]})"
        )
    atol = max(atol, 2 * torch.finfo(probs.dtype).eps)
    values = probs.detach().double()  # check in float64: a half-precision sum would round its own error away
    bad = ~torch.isfinite(values)
    if bad.any():
        raise ValueError(
            f"{source} returned NaN/inf at {_where(bad)}; check the scores it is built from (e.g. a reward model in "
            "half precision overflowing, or a 0/0 in a judge)"
        )
    bad = (values < -atol) | (values > 1 + atol)
    if bad.any():
        raise ValueError(
            f"{source} returned values outside [0, 1] (min {values.min().item():.4g}, max {values.max().item():.4g}, "
            f"first at {_where(bad)}); it must return probabilities P(i ≻ j): apply torch.sigmoid to logits or "
            "score differences, or wrap unbounded rewards with from_reward_fn (Bradley–Terry)"
        )
    diagonal = values.diagonal(dim1=1, dim2=2)
    bad = (diagonal - 0.5).abs() > atol
    if bad.any():
        b, i = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{source} returned P[i, i] = {diagonal[b, i].item():.4g} at [{b}, {i}, {i}]; a candidate ties with "
            "itself, so the diagonal must be 0.5 (set it with probs.diagonal(dim1=1, dim2=2).fill_(0.5))"
        )
    total = values + values.transpose(1, 2)
    bad = (total - 1).abs() > atol
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{source} returned P[i, j] + P[j, i] = {total[tuple(where)].item():.4g} at {where} (it must be 1: "
            "exactly one of two candidates wins); symmetrise it as (P + 1 − Pᵀ) / 2, or wrap a pairwise judge with "
            "from_pairwise, which does"
        )
    return probs


def annotate(
    model: PreferenceModel, prompts: Sequence[Any], candidates: Sequence[Sequence[Any]], *, atol: float = PROB_ATOL
) -> Tensor:
    """Run ``model`` on ``B`` prompts with ``K`` candidates each and return its validated ``(B, K, K)`` matrix.

    >>> annotate(from_reward_fn(lambda p, c: [len(x) for x in c]), ["q"], [["a", "bb"]])
    tensor([[[0.5000, 0.2689],
             [0.7311, 0.5000]]], dtype=torch.float64)
    """
    k = check_candidates(prompts, candidates)
    probs = model(list(prompts), [list(group) for group in candidates])
    source = f"preference model {_name(model)}"
    return validate_preference_matrix(probs, len(prompts), k, atol=atol, source=source)


def _name(obj: Any) -> str:
    """A short name for error messages: a function's qualified name, else the object's repr."""
    name = getattr(obj, "__qualname__", None)
    if name is not None:
        name = name.rsplit("<locals>.", 1)[-1]  # a nested function: its own name is the telling part
    else:
        name = repr(obj) if type(obj).__repr__ is not object.__repr__ else type(obj).__name__
    return name if len(name) <= 80 else name[:77] + "..."


# --------------------------------------------------------------------------------------------------
# Building matrices
# --------------------------------------------------------------------------------------------------


def bradley_terry(scores: Any, scale: float = 1.0) -> Tensor:
    """Bradley–Terry win probabilities ``P[..., i, j] = σ(scale · (s_i − s_j))`` from scores of shape ``(..., K)``.

    Computed in float64 (as the official SPPO code builds its probabilities, spec §3.4), so that ``P[i, j] + P[j, i]
    = 1`` and the diagonal is exactly ½. With PairRM's rank scores this is SPPO's matrix (spec §3.2, issue #15).

    >>> bradley_terry(torch.tensor([[0.0, math.log(3.0)]]))
    tensor([[[0.5000, 0.2500],
             [0.7500, 0.5000]]], dtype=torch.float64)
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if scores.ndim < 1:
        raise ValueError("scores must have a candidate dimension: shape (..., K)")
    return torch.sigmoid(scale * (scores.unsqueeze(-1) - scores.unsqueeze(-2)))


def _flatten(prompts: Sequence[Any], candidates: Sequence[Sequence[Any]]) -> tuple[list, list]:
    """One (prompt, completion) row per candidate, prompt-major: row b·K + i is candidate i of prompt b."""
    flat_prompts = [p for p, group in zip(prompts, candidates, strict=True) for _ in group]
    flat_completions = [c for group in candidates for c in group]
    return flat_prompts, flat_completions


def _batches(n: int, batch_size: int | None):
    step = batch_size or max(n, 1)
    return (range(start, min(start + step, n)) for start in range(0, n, step))


def _check_batch_size(batch_size: int | None) -> int | None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return batch_size


class RewardFnPreference:
    """Bradley–Terry preference model of a reward function; see :func:`from_reward_fn`."""

    def __init__(self, fn: Callable[..., Any], scale: float = 1.0, batch_size: int | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(prompts, completions) -> rewards, got {type(fn).__name__}")
        bradley_terry(torch.zeros(2), scale)  # validates scale now rather than on the first call
        self.fn, self.scale, self.batch_size = fn, scale, _check_batch_size(batch_size)

    def rewards(self, prompts: list[Any], candidates: list[list[Any]]) -> Tensor:
        """The rewards of every candidate, shape ``(B, K)``, float64."""
        k = check_candidates(prompts, candidates)
        flat_prompts, flat_completions = _flatten(prompts, candidates)
        values: list[float] = []
        for rows in _batches(len(flat_prompts), self.batch_size):
            out = self.fn([flat_prompts[r] for r in rows], [flat_completions[r] for r in rows])
            out = out.tolist() if hasattr(out, "tolist") else list(out)
            if len(out) != len(rows):
                raise ValueError(
                    f"reward function {_name(self.fn)} returned {len(out)} rewards for {len(rows)} completions; it "
                    "must return one reward per completion"
                )
            if any(v is None for v in out):
                raise ValueError(
                    f"reward function {_name(self.fn)} returned None for some completions; a preference model needs "
                    "a reward for every completion (return a low reward instead of None)"
                )
            values.extend(float(v) for v in out)
        return torch.tensor(values, dtype=torch.float64).view(len(prompts), k)

    def __call__(self, prompts: list[Any], candidates: list[list[Any]]) -> Tensor:
        return bradley_terry(self.rewards(prompts, candidates), self.scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_name(self.fn)}, scale={self.scale})"


def from_reward_fn(fn: Callable[..., Any], *, scale: float = 1.0, batch_size: int | None = None) -> RewardFnPreference:
    """A preference model from a reward function: ``P(i ≻ j) = σ(scale · (r_i − r_j))`` (Bradley–Terry).

    ``fn(prompts, completions) -> rewards`` is called with flat, equally long lists (prompt b repeated for each of
    its K candidates), so a TRL reward function works as is; ``batch_size`` bounds the rows per call (``None``: all
    in one call). Use ``scale`` to sharpen 0/1 rewards: scale 1 gives a correct answer only σ(1) ≈ 0.73 against a
    wrong one.

    >>> model = from_reward_fn(lambda prompts, completions: [float(c == "5") for c in completions], scale=2.0)
    >>> model(["2+3="], [["5", "6"]])[0, 0, 1].item()  # σ(2 · (1 − 0))
    0.8807970779778823
    """
    return RewardFnPreference(fn, scale=scale, batch_size=batch_size)


class PairwisePreference:
    """Preference model of a pairwise judge; see :func:`from_pairwise`."""

    def __init__(self, fn: Callable[..., Any], symmetrize: bool = True, batched: bool = False):
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(prompt, a, b) -> P(a ≻ b), got {type(fn).__name__}")
        self.fn, self.symmetrize, self.batched = fn, symmetrize, batched

    def _judge(self, queries: list[tuple[Any, Any, Any]]) -> list[float]:
        if self.batched:
            out = self.fn([q[0] for q in queries], [q[1] for q in queries], [q[2] for q in queries])
            out = out.tolist() if hasattr(out, "tolist") else list(out)
            if len(out) != len(queries):
                raise ValueError(
                    f"pairwise judge {_name(self.fn)} returned {len(out)} probabilities for {len(queries)} pairs "
                    "(batched=True: it must return one P(a ≻ b) per pair)"
                )
        else:
            out = [self.fn(*q) for q in queries]
        values = [float(v) for v in out]
        # Check each raw answer: symmetrising could average an out-of-range value back into [0, 1].
        for value, (_, a, b) in zip(values, queries):
            if not (0.0 <= value <= 1.0):  # also catches NaN
                raise ValueError(
                    f"pairwise judge {_name(self.fn)} returned {value!r} for P({a!r} ≻ {b!r}); it must return a "
                    "probability in [0, 1] (apply a sigmoid to a logit or score margin)"
                )
        return values

    def __call__(self, prompts: list[Any], candidates: list[list[Any]]) -> Tensor:
        k = check_candidates(prompts, candidates)
        upper = [(b, i, j) for b in range(len(prompts)) for i in range(k) for j in range(i + 1, k)]
        queries = [(prompts[b], candidates[b][i], candidates[b][j]) for b, i, j in upper]
        if self.symmetrize:
            queries += [(p, y, x) for p, x, y in queries]
        values = self._judge(queries)
        probs = torch.full((len(prompts), k, k), 0.5, dtype=torch.float64)  # P(y ≻ y) = ½: never asked
        n = len(upper)
        for m, (b, i, j) in enumerate(upper):
            # Averaging both orders cancels a judge's position bias: P = ½·(f(a, b) + 1 − f(b, a)).
            p = 0.5 * (values[m] + 1.0 - values[n + m]) if self.symmetrize else values[m]
            probs[b, i, j], probs[b, j, i] = p, 1.0 - p
        return probs

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_name(self.fn)}, symmetrize={self.symmetrize}, batched={self.batched})"


def from_pairwise(fn: Callable[..., Any], *, symmetrize: bool = True, batched: bool = False) -> PairwisePreference:
    """A preference model from a pairwise judge ``fn(prompt, a, b) -> P(a ≻ b)`` (e.g. ``hfx.toy`` tasks' ``prefer``).

    For each prompt the judge is asked about every unordered pair ``i < j``; the matrix is filled as
    ``P[i, j] = ½·(fn(x, y_i, y_j) + 1 − fn(x, y_j, y_i))`` (``symmetrize=True``, the default: both orders, which
    cancels a judge's position bias, K(K−1) calls per prompt) or ``P[i, j] = fn(x, y_i, y_j)`` (``symmetrize=False``,
    for judges that are antisymmetric by construction, K(K−1)/2 calls), with ``P[j, i] = 1 − P[i, j]`` and ½ on the
    diagonal (never asked). ``batched=True``: ``fn(prompts, as_, bs) -> probabilities`` is called once with every
    pair of the batch.

    >>> judge = lambda prompt, a, b: 0.9 if len(a) < len(b) else 0.1 if len(a) > len(b) else 0.5
    >>> from_pairwise(judge)(["q"], [["a", "bb", "c"]])[0]
    tensor([[0.5000, 0.9000, 0.5000],
            [0.1000, 0.5000, 0.1000],
            [0.5000, 0.9000, 0.5000]], dtype=torch.float64)
    """
    return PairwisePreference(fn, symmetrize=symmetrize, batched=batched)


class RewardModelPreference:
    """Bradley–Terry preference model of a sequence-classification reward model; see :func:`from_reward_model`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        scale: float = 1.0,
        use_chat_template: bool | None = None,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the reward model's tokenizer has no pad token, which batched scoring needs; set one first, e.g. "
                "tokenizer.pad_token = tokenizer.eos_token (and model.config.pad_token_id = tokenizer.pad_token_id)"
            )
        model_pad = getattr(model.config, "pad_token_id", None)
        if model_pad is None:
            # *ForSequenceClassification scores the last non-pad token, which it finds through config.pad_token_id.
            raise ValueError(
                "model.config.pad_token_id is None, so the reward model cannot find the last token of a padded "
                "sequence; set model.config.pad_token_id = tokenizer.pad_token_id"
            )
        if model_pad != tokenizer.pad_token_id:
            raise ValueError(
                f"model.config.pad_token_id ({model_pad}) differs from tokenizer.pad_token_id "
                f"({tokenizer.pad_token_id}): the model would score the wrong token of padded rows; make them equal"
            )
        num_labels = getattr(model.config, "num_labels", 1)
        if num_labels != 1:
            raise ValueError(
                f"the reward model has num_labels={num_labels}; a reward model has one output per sequence "
                "(AutoModelForSequenceClassification.from_pretrained(..., num_labels=1))"
            )
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if use_chat_template is None:
            use_chat_template = has_template
        elif use_chat_template and not has_template:
            raise ValueError(
                "use_chat_template=True but the tokenizer has no chat template; set tokenizer.chat_template or pass "
                "use_chat_template=False to score prompt + completion as plain text"
            )
        bradley_terry(torch.zeros(2), scale)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.scale = _check_batch_size(batch_size), max_length, scale
        self.use_chat_template = use_chat_template

    def format(self, prompt: Any, completion: Any) -> str:
        """The text the reward model scores: the chat template applied to a user turn (or the conversation given
        as ``prompt``) and the assistant's completion, or ``prompt + completion`` without a template."""
        if not self.use_chat_template:
            return f"{prompt}{completion}"
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        messages.append({"role": "assistant", "content": completion})
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def rewards(self, prompts: list[Any], candidates: list[list[Any]]) -> Tensor:
        """The reward of every candidate, shape ``(B, K)``, float64; batched, without gradients, in eval mode."""
        k = check_candidates(prompts, candidates)
        texts = [self.format(p, c) for p, c in zip(*_flatten(prompts, candidates))]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()  # dropout would make the scores random
        values = []
        try:
            for rows in _batches(len(texts), self.batch_size):
                enc = self.tokenizer(
                    [texts[r] for r in rows],
                    return_tensors="pt",
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                    # The chat template already wrote the special tokens; adding BOS again would shift the scores.
                    add_special_tokens=not self.use_chat_template,
                )
                logits = self.model(
                    input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
                ).logits
                values.append(logits[:, 0].double().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(values).view(len(prompts), k)

    def __call__(self, prompts: list[Any], candidates: list[list[Any]]) -> Tensor:
        return bradley_terry(self.rewards(prompts, candidates), self.scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, scale={self.scale})"


def from_reward_model(
    model: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    scale: float = 1.0,
    use_chat_template: bool | None = None,
) -> RewardModelPreference:
    """A preference model from a reward model (``AutoModelForSequenceClassification`` with ``num_labels=1``):
    ``P(i ≻ j) = σ(scale · (r_i − r_j))``, ``r`` the model's score of prompt + completion.

    ``model`` may be a path (loaded with its tokenizer when ``tokenizer`` is None). Texts are built with the
    tokenizer's chat template when it has one (``use_chat_template=None``), scored ``batch_size`` at a time under
    ``torch.no_grad`` in eval mode on the model's device, truncated to ``max_length`` tokens when given. The tokenizer
    needs a pad token equal to ``model.config.pad_token_id``.

    Example::

        rm = AutoModelForSequenceClassification.from_pretrained("my-reward-model", num_labels=1)
        model = from_reward_model(rm, AutoTokenizer.from_pretrained("my-reward-model"), batch_size=32)
        probs = annotate(model, prompts, candidates)          # (B, K, K)
    """
    if isinstance(model, str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model)
        model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    if tokenizer is None:
        raise ValueError("from_reward_model needs the reward model's tokenizer (or a path to load both from)")
    return RewardModelPreference(
        model,
        tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        scale=scale,
        use_chat_template=use_chat_template,
    )


class PairRMPreference:
    """SPPO's preference model from PairRM's rank scores; see :func:`pairrm`."""

    def __init__(self, blender: Any, batch_size: int = 1):
        self.blender, self.batch_size = blender, batch_size

    def __call__(self, prompts: list[Any], candidates: list[list[Any]]) -> Tensor:
        check_candidates(prompts, candidates)
        scores = self.blender.rank(prompts, candidates, return_scores=True, batch_size=self.batch_size)
        return bradley_terry(scores)


def pairrm(checkpoint: str = "llm-blender/PairRM", *, batch_size: int = 1, **load_kwargs: Any) -> PairRMPreference:
    """PairRM (``llm-blender``), the preference model of the official SPPO and RSPO pipelines (spec §3.2, §4.2).

    Like the official code, it ranks the K candidates with ``Blender.rank(..., return_scores=True)`` and returns
    ``P(i ≻ j) = σ(s_i − s_j)`` of the rank scores (which are aggregated over the other candidates, so they depend on
    the whole group, spec §3 finding 3). ``llm-blender`` is optional and imported here; loading the checkpoint
    downloads it unless it is cached.

    Example::

        model = pairrm()          # needs PAIRRM_INSTALL: pip install git+https://github.com/yuchenlin/LLM-Blender.git
        probs = annotate(model, prompts, candidates)
    """
    try:
        import llm_blender
    except ImportError as err:
        raise ImportError(
            f"pairrm() needs the optional llm-blender package, which is not installed: {PAIRRM_INSTALL} "
            "(or use from_reward_model / from_reward_fn / from_pairwise instead)"
        ) from err
    blender = llm_blender.Blender()
    blender.loadranker(checkpoint, **load_kwargs)
    return PairRMPreference(blender, batch_size=batch_size)


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


def mean_win_rate(probs: Any, include_self: bool = True) -> Tensor:
    """Each candidate's average win probability against its group, shape ``(B, K)``, float64::

        include_self=True  (official SPPO; the paper's P̂(y ≻ π_t)):  w_i = (1/K) Σ_j P[i, j]    (P[i, i] = ½ included)
        include_self=False:                                           w_i = (1/(K−1)) Σ_{j≠i} P[i, j]

    Both rank the candidates the same way; they differ in value (spec §3.1, §3.2, §3.6).

    >>> mean_win_rate(torch.tensor([[[0.5, 0.9], [0.1, 0.5]]], dtype=torch.float64)).tolist()
    [[0.7, 0.3]]
    """
    probs = validate_preference_matrix(probs, source="the win-probability matrix").double()
    k = probs.shape[-1]
    if include_self:
        return probs.mean(-1)
    return (probs.sum(-1) - probs.diagonal(dim1=1, dim2=2)) / (k - 1)


@dataclasses.dataclass(frozen=True, eq=False)
class PreferencePairs:
    """Training pairs chosen from groups of K candidates, one row per pair; every field is a tensor of shape (N,).

    * ``prompt_index``, ``chosen_index``, ``rejected_index`` (int64): prompt b, and the candidates' positions in its
      group.
    * ``chosen_win_prob`` (float64): p_w = mean win rate of the chosen candidate against its group
      (:func:`mean_win_rate`; official SPPO column ``chosen_probs_win``); ``sppo_loss(chosen_win_prob=...)``.
    * ``rejected_win_prob`` (float64): p_l, the same for the rejected one (official ``chosen_probs_lose``);
      ``sppo_loss(rejected_win_prob=...)``.
    * ``pair_win_prob`` (float64): ``P(chosen ≻ rejected)`` (official ``chosen_probs``), the single probability
      that ``sppo_loss(loss_type="sppo_single")`` takes as its ``chosen_win_prob``.
    """

    prompt_index: Tensor
    chosen_index: Tensor
    rejected_index: Tensor
    chosen_win_prob: Tensor
    rejected_win_prob: Tensor
    pair_win_prob: Tensor

    def __len__(self) -> int:
        return self.prompt_index.numel()

    def to_columns(
        self, prompts: Sequence[Any] | None = None, candidates: Sequence[Sequence[Any]] | None = None
    ) -> dict[str, list]:
        """The pairs as columns of plain lists, ready for ``datasets.Dataset.from_dict``: ``prompt`` (with
        ``prompts``), ``chosen``/``rejected`` (with ``candidates``), then every field of this class.

        >>> pairs = select_best_worst(torch.tensor([[[0.5, 0.2], [0.8, 0.5]]]))
        >>> pairs.to_columns(["q"], [["a", "b"]])["chosen"]
        ['b']
        """
        columns: dict[str, list] = {}
        index = self.prompt_index.tolist()
        if prompts is not None:
            columns["prompt"] = [prompts[b] for b in index]
        if candidates is not None:
            columns["chosen"] = [candidates[b][i] for b, i in zip(index, self.chosen_index.tolist())]
            columns["rejected"] = [candidates[b][i] for b, i in zip(index, self.rejected_index.tolist())]
        for field in dataclasses.fields(self):
            columns[field.name] = getattr(self, field.name).tolist()
        return columns


def _pairs(probs: Tensor, rates: Tensor, rows: list[tuple[int, int, int]], drop_ties: bool, tie_tol: float):
    """Gather the scalars of (prompt, chosen, rejected) rows; drop pairs with P(chosen ≻ rejected) ≈ ½ if asked."""
    index = torch.tensor(rows, dtype=torch.long).view(-1, 3)
    b, c, r = index.unbind(1)
    pair = probs[b, c, r]
    if drop_ties:
        # A tie carries no preference: DPO-style losses would push an arbitrary direction, INPO's target is wrong.
        keep = (pair - 0.5).abs() > tie_tol
        b, c, r, pair = b[keep], c[keep], r[keep], pair[keep]
    return PreferencePairs(b, c, r, rates[b, c], rates[b, r], pair)


def _prepare(probs: Any, include_self: bool, tie_tol: float) -> tuple[Tensor, Tensor]:
    if not (tie_tol >= 0 and math.isfinite(tie_tol)):
        raise ValueError(f"tie_tol must be a finite number ≥ 0, got {tie_tol!r}")
    # Selection is bookkeeping on a few numbers per prompt: do it on the CPU in float64 whatever the input.
    probs = validate_preference_matrix(probs, source="the win-probability matrix").detach().double().cpu()
    return probs, mean_win_rate(probs, include_self)


def select_best_worst(
    probs: Any, *, include_self: bool = True, drop_ties: bool = False, tie_tol: float = TIE_TOL
) -> PreferencePairs:
    """One pair per prompt: the candidate with the highest mean win rate against the group (chosen) and the one with
    the lowest (rejected), as the official SPPO and RSPO pipelines build their data (spec §3.2, §4.2)::

        w_i = mean_j P[i, j]       chosen = argmax_i w_i     rejected = argmin_i w_i
        chosen_win_prob = w_chosen,  rejected_win_prob = w_rejected,  pair_win_prob = P[chosen, rejected]

    For a Bradley–Terry matrix (PairRM, reward models) this is argmax/argmin of the scores, as in the official code.
    Ties (within ``tie_tol``) go to the lowest index on both ends, except that rejected is never the chosen
    candidate itself: when all K tie, the pair is (0, 1). ``include_self`` picks the win-rate definition of
    :func:`mean_win_rate` (official: True); ``drop_ties`` drops prompts whose ``P(chosen ≻ rejected)`` is ½.

    Spec §3.6's vector (PairRM scores s = [1.2, 0.3, −0.5, 0.9, −1.1])::

        >>> pairs = select_best_worst(bradley_terry(torch.tensor([[1.2, 0.3, -0.5, 0.9, -1.1]])))
        >>> pairs.chosen_index.tolist(), pairs.rejected_index.tolist()
        ([0], [4])
        >>> [round(x, 6) for x in (pairs.pair_win_prob.item(), pairs.chosen_win_prob.item(),
        ...                        pairs.rejected_win_prob.item())]
        [0.908877, 0.707961, 0.252497]
    """
    probs, rates = _prepare(probs, include_self, tie_tol)
    k = probs.shape[-1]
    positions = torch.arange(k)
    # argmax of a 0/1 mask returns the first True: the lowest index among (near-)ties.
    is_best = rates >= rates.max(-1, keepdim=True).values - tie_tol
    chosen = is_best.to(torch.uint8).argmax(-1)
    is_worst = (rates <= rates.min(-1, keepdim=True).values + tie_tol) & (positions != chosen.unsqueeze(-1))
    # Never empty (a near-min candidate other than chosen always exists); the fallback only guards rounding.
    is_worst |= ~is_worst.any(-1, keepdim=True) & (positions != chosen.unsqueeze(-1))
    rejected = is_worst.to(torch.uint8).argmax(-1)
    rows = [(b, c, r) for b, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist()))]
    return _pairs(probs, rates, rows, drop_ties, tie_tol)


def _knockout(entrants: list[int], advances: Callable[[int, int], bool]) -> int:
    """Single elimination in index order: (e0 vs e1), (e2 vs e3), …, an odd one out gets a bye; the survivor wins.
    ``advances(a, b)`` (a before b) says whether ``a`` goes on."""
    while len(entrants) > 1:
        nxt = [a if advances(a, b) else b for a, b in zip(entrants[0::2], entrants[1::2])]
        if len(entrants) % 2:
            nxt.append(entrants[-1])
        entrants = nxt
    return entrants[0]


def select_tournament(
    probs: Any, *, include_self: bool = True, drop_ties: bool = False, tie_tol: float = TIE_TOL
) -> PreferencePairs:
    """One pair per prompt picked by knockout brackets, as INPO's official annotation does with a pairwise preference
    model (``--use_tournament``, ``choose_type=max_min``; spec §5.2)::

        chosen   = winner of a single-elimination bracket over candidates 0..K−1  (a beats b iff P[a, b] > ½)
        rejected = "loser advances" bracket over the other K−1 candidates   (the one that loses every match)

    Matches pair neighbours in index order ((0, 1), (2, 3), …; an odd one out gets a bye); on a tie (|P − ½| ≤
    ``tie_tol``) the lower index advances in both brackets, so all-tied groups give the pair (0, 1) as in
    :func:`select_best_worst`. For transitive preferences (e.g. Bradley–Terry) the result equals
    :func:`select_best_worst`; with cyclic preferences (a judge, not a reward) it can differ. The scalars are those of
    :class:`PreferencePairs` (mean win rates against the whole group).

    >>> cyclic = torch.tensor([[[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]]])   # 0 ≻ 1 ≻ 2 ≻ 0
    >>> pairs = select_tournament(cyclic)            # 0 beats 1, then 2 beats 0; worst of {0, 1}: 1
    >>> pairs.chosen_index.tolist(), pairs.rejected_index.tolist()
    ([2], [1])
    """
    probs, rates = _prepare(probs, include_self, tie_tol)
    k = probs.shape[-1]
    rows = []
    for b, matrix in enumerate(probs.tolist()):
        chosen = _knockout(list(range(k)), lambda a, c, m=matrix: m[a][c] >= 0.5 - tie_tol)
        others = [i for i in range(k) if i != chosen]
        rejected = _knockout(others, lambda a, c, m=matrix: m[a][c] <= 0.5 + tie_tol)
        rows.append((b, chosen, rejected))
    return _pairs(probs, rates, rows, drop_ties, tie_tol)


def select_all_pairs(
    probs: Any, *, include_self: bool = True, drop_ties: bool = False, tie_tol: float = TIE_TOL
) -> PreferencePairs:
    """Every unordered pair of each group, K(K−1)/2 per prompt, oriented so that chosen is the preferred one::

        for i < j:  (chosen, rejected) = (j, i) if P[i, j] < ½ else (i, j)       (ties: the lower index is chosen)

    Rows are ordered by prompt, then by (i, j). ``drop_ties`` drops pairs with ``|P[i, j] − ½| ≤ tie_tol``, which
    carry no preference. This uses all K samples, as the SPPO paper's Algorithm 1 does (the official pipeline keeps
    only best/worst, spec §3.2).

    >>> pairs = select_all_pairs(bradley_terry(torch.tensor([[0.0, 1.0, 1.0]])), drop_ties=True)
    >>> list(zip(pairs.chosen_index.tolist(), pairs.rejected_index.tolist()))
    [(1, 0), (2, 0)]
    """
    probs, rates = _prepare(probs, include_self, tie_tol)
    k = probs.shape[-1]
    rows = []
    for b, matrix in enumerate(probs.tolist()):
        for i in range(k):
            for j in range(i + 1, k):
                rows.append((b, j, i) if matrix[i][j] < 0.5 - tie_tol else (b, i, j))
    return _pairs(probs, rates, rows, drop_ties, tie_tol)


_SELECTORS: dict[str, Callable[..., PreferencePairs]] = {
    "best_worst": select_best_worst,
    "tournament": select_tournament,
    "all_pairs": select_all_pairs,
}


def select_pairs(probs: Any, strategy: str = "best_worst", **kwargs: Any) -> PreferencePairs:
    """Select training pairs with a named strategy: ``"best_worst"`` (:func:`select_best_worst`, official SPPO/RSPO),
    ``"tournament"`` (:func:`select_tournament`, official INPO) or ``"all_pairs"`` (:func:`select_all_pairs`);
    ``kwargs`` go to that function.

    >>> len(select_pairs(bradley_terry(torch.tensor([[0.0, 1.0, 2.0]])), "all_pairs"))
    3
    """
    try:
        selector = _SELECTORS[strategy]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown pair-selection strategy {strategy!r}; choose one of {SELECTION_STRATEGIES}"
        ) from None
    return selector(probs, **kwargs)
