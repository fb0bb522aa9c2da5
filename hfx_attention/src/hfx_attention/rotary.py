"""Per-instance rotary bypass (spec A5, patch point 2): the model's rotary embedding returns cos = 1, sin = 0, so HF's
``apply_rotary_pos_emb`` is an exact identity and the cache holds **pre-RoPE** keys; the attention function then
rotates queries and keys itself, at whatever positions its method needs (StreamingLLM slot positions, GRAPE
phases, interpolated positions), by evaluating the original rotary module (any ``rope_type``, with its
``attention_scaling``) at those positions. Bit-identical to the stock model when the positions are the model's.

    >>> bypass_rotary(model)                                   # doctest: +SKIP
    >>> cos, sin = rope_cos_sin(module, query, position_ids)   # inside an attention function  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hfx.attention import on_revert

from ._core import attention_modules, decoder, set_module_attribute


class BypassedRotary(nn.Module):
    """Stands in for ``model.model.rotary_emb``: identity rotation; the original stays reachable as ``.original``."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.dim = 2 * original.inv_freq.numel()

    def forward(self, x: Tensor, position_ids: Tensor):
        shape = (*position_ids.shape, self.dim)
        return torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device)


def bypass_rotary(model: nn.Module) -> nn.Module:
    """Bypass ``model``'s rotary embedding (reversibly) and give every attention module the original as
    ``module.hfx_rotary``; returns the original rotary module. Idempotent."""
    base = decoder(model)
    if isinstance(base.rotary_emb, BypassedRotary):
        return base.rotary_emb.original
    original = base.rotary_emb
    base.rotary_emb = BypassedRotary(original)
    on_revert(model, lambda: setattr(base, "rotary_emb", original))
    for module in attention_modules(model):
        set_module_attribute(model, module, "hfx_rotary", original)
    return original


def rope_cos_sin(module: nn.Module, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin) of shape (B, T, D) of the model's own rotary embedding at ``position_ids`` (B, T), in ``x``'s dtype.
    ``module`` is an attention module of a model passed through :func:`bypass_rotary`."""
    rotary = getattr(module, "hfx_rotary", None)
    if rotary is None:
        raise RuntimeError("this attention needs the rotary bypass: apply it with hfx.attention.apply(model, ...), "
                           "not only through attn_implementation=")
    return rotary(x, position_ids)


def rotate_half(x: Tensor) -> Tensor:
    """HF's rotate_half layout: dimension i is paired with i + D/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, H, T, D) by ``cos``/``sin`` of shape (B, T, D) (or (B, H, T, D)), as HF does."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
