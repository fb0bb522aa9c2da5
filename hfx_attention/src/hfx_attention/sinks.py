"""StreamingLLM attention sinks (Xiao et al., arXiv 2309.17453; spec C1): the KV cache keeps the first
``num_sink_tokens`` tokens of each row (the sinks: first *non-padding* tokens) and the ``window`` most recent ones,
so a model generates indefinitely with a constant cache.

``positions="cache"`` (default, StreamingLLM's pos-shift): keys are cached before RoPE and rotated at their cache
slot (0..n-1) at every step, the query at the number of cached tokens before it, so relative distances never exceed
the budget. ``positions="original"`` keeps each token's position in the text (only sensible within the trained
context).

Defaults: 4 sink tokens (the paper's and the official ``start_size``), ``window=1020`` so a decode step attends to
1024 tokens, its own included (``window`` counts the current token, as the official ``recent_size`` does).

    >>> import hfx
    >>> hfx.attention.apply(model, "sinks", num_sink_tokens=4, window=1020)   # doctest: +SKIP
    >>> model.generate(**batch, max_new_tokens=4096)                           # builds a SinkCache  # doctest: +SKIP
    >>> cache = SinkCache(model, num_sink_tokens=4, window=252)                # or pass one explicitly
    >>> model.generate(**batch, past_key_values=cache)                         # doctest: +SKIP

Prefill longer than the budget attends fully and is trimmed at the next step (the paper's streaming evaluation
feeds one token at a time; feed chunks no longer than the window to reproduce it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._core import register
from .cache import PolicyCache, PolicyLayer, first_valid, install, policy_attention, validate_budget, validate_positions

KEY = "hfx_sinks"


def sinks_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention over the sink cache (see :func:`hfx_attention.cache.policy_attention`)."""
    return policy_attention(module, query, key, value, attention_mask, method="sinks", **kwargs)


register(KEY, sinks_attention)


def check_options(num_sink_tokens: int, window: int, positions: str) -> None:
    validate_budget("sinks", num_sink_tokens, window=window)
    if window < 1:
        raise ValueError(f"hfx sinks: window must be >= 1 (it counts the current token), got {window}")
    validate_positions("sinks", positions)


class SinkLayer(PolicyLayer):
    """Keeps the first ``num_sink_tokens`` valid slots and the most recent valid ones; same slots for every head."""

    def __init__(self, num_sink_tokens: int, window: int, positions: str, record: bool = False):
        super().__init__(budget=num_sink_tokens + window, num_sink_tokens=num_sink_tokens, positions=positions,
                         record=record)
        self.window = window

    def priority(self, q_len: int) -> Tensor:
        recency = torch.arange(self.valid.shape[-1], device=self.valid.device, dtype=torch.float32).expand(
            self.valid.shape)
        priority = recency.masked_fill(~self.valid, -math.inf)
        return priority.masked_fill(first_valid(self.valid, self.num_sink_tokens), math.inf)


class SinkCache(PolicyCache):
    """The sink + window KV cache for ``model`` (prepared with ``hfx.attention.apply(model, "sinks")``).

    >>> cache = SinkCache(model, num_sink_tokens=4, window=1020)   # doctest: +SKIP
    """

    method = "sinks"

    def __init__(self, model: nn.Module, num_sink_tokens: int = 4, window: int = 1020, positions: str = "cache", *,
                 record: bool = False):
        check_options(num_sink_tokens, window, positions)
        self.num_sink_tokens, self.window, self.positions = num_sink_tokens, window, positions
        super().__init__(model, lambda: SinkLayer(num_sink_tokens, window, positions, record))


def apply(model: nn.Module, num_sink_tokens: int = 4, window: int = 1020, positions: str = "cache") -> nn.Module:
    """Give ``model`` attention sinks, reversibly: ``generate``/``forward`` without a cache build a
    :class:`SinkCache` with these options. Inference only (training forwards without a cache are plain attention).
    """
    check_options(num_sink_tokens, window, positions)
    return install(model, "sinks", KEY, lambda: SinkCache(model, num_sink_tokens, window, positions))
