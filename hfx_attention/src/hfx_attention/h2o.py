"""H2O, the heavy-hitter oracle (Zhang et al., arXiv 2306.14048; spec C2): every cached key accumulates the softmax
mass it receives (summed over all query rows that attended to it and, with GQA, over the query heads of its KV
group); when the cache is over budget each KV head keeps its ``recent`` most recent tokens (the current one
included), optional ``num_sink_tokens`` first tokens, and the ``heavy`` older tokens with the largest accumulated
mass. Eviction decided from a step's scores happens at the next step's cache update, as in the official code.

Defaults (absolute budgets, the same 1024-token budget as the sinks default): ``heavy=512``, ``recent=512``,
``num_sink_tokens=0``, ``positions="original"`` (keys keep their text position, as in the paper's accuracy runs;
``"cache"`` re-indexes like StreamingLLM and the official real-drop code). The official scripts use ratios of the
prompt length (``--heavy_ratio 0.1 --recent_ratio 0.1``); a cache built before the prompt is known takes absolute
sizes, so pass ``heavy=int(0.1 * prompt_len)`` etc. to reproduce them. Differences from the official code: scores
are kept per batch row (the official code sums over the batch and assumes batch 1), and ``recent`` counts the
current token (official ``recent_size=r`` is ``recent=r + 1`` here).

    >>> import hfx
    >>> hfx.attention.apply(model, "h2o", heavy=64, recent=64)             # doctest: +SKIP
    >>> model.generate(**batch, max_new_tokens=1024)                       # builds an H2OCache  # doctest: +SKIP

``H2OCache(model, heavy=0, recent=w)`` is a sliding window; ``H2OCache(model, heavy=0, recent=w,
num_sink_tokens=s)`` equals ``SinkCache(model, s, w)`` with the same ``positions``.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ._core import register
from .cache import (
    PolicyCache,
    PolicyLayer,
    first_valid,
    install,
    last_valid,
    policy_attention,
    validate_budget,
    validate_positions,
)

KEY = "hfx_h2o"


def h2o_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention over the H2O cache, accumulating each key's mass (see :func:`hfx_attention.cache.policy_attention`)."""
    return policy_attention(module, query, key, value, attention_mask, method="h2o", **kwargs)


register(KEY, h2o_attention)


def check_options(heavy: int, recent: int, num_sink_tokens: int, positions: str) -> None:
    validate_budget("h2o", num_sink_tokens, heavy=heavy, recent=recent)
    if recent < 1:
        raise ValueError(f"hfx h2o: recent must be >= 1 (it counts the current token), got {recent}")
    validate_positions("h2o", positions)


class H2OLayer(PolicyLayer):
    """Per KV head: sinks and the recent window always kept, the rest ranked by accumulated mass."""

    needs_scores = True
    per_head = True

    def __init__(self, heavy: int, recent: int, num_sink_tokens: int, positions: str, record: bool = False):
        super().__init__(budget=num_sink_tokens + heavy + recent, num_sink_tokens=num_sink_tokens,
                         positions=positions, record=record)
        self.heavy, self.recent = heavy, recent

    def min_kept(self) -> int:
        return self.num_sink_tokens + self.heavy

    def priority(self, q_len: int) -> Tensor:
        # the recent window counts the q_len tokens about to be appended
        protected = first_valid(self.valid, self.num_sink_tokens) | last_valid(self.valid, max(self.recent - q_len, 0))
        return self.scores.masked_fill(~self.valid, -math.inf).masked_fill(protected, math.inf)


class H2OCache(PolicyCache):
    """The heavy-hitter KV cache for ``model`` (prepared with ``hfx.attention.apply(model, "h2o")``).

    >>> cache = H2OCache(model, heavy=128, recent=128)   # doctest: +SKIP
    """

    method = "h2o"

    def __init__(self, model: nn.Module, heavy: int = 512, recent: int = 512, num_sink_tokens: int = 0,
                 positions: str = "original", *, record: bool = False):
        check_options(heavy, recent, num_sink_tokens, positions)
        self.heavy, self.recent, self.num_sink_tokens, self.positions = heavy, recent, num_sink_tokens, positions
        super().__init__(model, lambda: H2OLayer(heavy, recent, num_sink_tokens, positions, record))


def apply(model: nn.Module, heavy: int = 512, recent: int = 512, num_sink_tokens: int = 0,
          positions: str = "original") -> nn.Module:
    """Give ``model`` the H2O cache policy, reversibly: ``generate``/``forward`` without a cache build an
    :class:`H2OCache` with these options. Inference only."""
    check_options(heavy, recent, num_sink_tokens, positions)
    return install(model, "h2o", KEY, lambda: H2OCache(model, heavy, recent, num_sink_tokens, positions))
