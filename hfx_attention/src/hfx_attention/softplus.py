"""Softplus attention, LSSA / LSSAR (Gao, Spratling, Gionfrida, arXiv 2501.13428; spec C7): the softmax's exp replaced
by Softplus with a length-dependent scale, then row-wise l1 normalisation (and, with ``power > 1``, LSSAR's
re-weighting). The math and its provenance live in ``hfx_kernels.softplus_attention`` (Triton on CUDA, torch
elsewhere); this module plugs it into transformers.

Paper form (the default): q and k are L2-normalised per head and the logit is ``log(D) * log(N_i) * q̂·k̂``
(``qk_norm=True``); ``qk_norm=False`` keeps the model's own logits ``q·k * scaling`` and only multiplies by log N_i.

Swapping softmax for softplus **changes what a softmax-pretrained model computes**: it needs (re)training. So
``apply`` warns (``UntrainedSoftplusWarning``, once) when such a model is first run for inference (modules in eval
mode) before any training forward; pass ``trained=True`` when the weights were trained with softplus attention. Loading
such a checkpoint with ``attn_implementation="hfx_softplus"`` (default options) is taken as that acknowledgement.

    >>> import hfx, hfx_attention.softplus
    >>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hfx_softplus")   # doctest: +SKIP
    >>> hfx.attention.apply(model, "softplus", power=15.0)                   # LSSAR, before training  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from hfx_kernels.softplus_attention import _check_options, softplus_attention

from ._core import (
    attention_modules,
    check_attention_kwargs,
    check_supported,
    keep_mask,
    register,
    set_attention,
    set_module_attribute,
)

KEY = "hfx_softplus"


class UntrainedSoftplusWarning(UserWarning):
    """A softmax-pretrained model runs softplus attention for inference without having been trained with it."""


@dataclass
class SoftplusOptions:
    """Options of one model's softplus attention (shared by its attention modules)."""

    length_scale: bool = True  # lam_i = log N_i (N_i = visible keys of row i)
    power: float = 1.0  # 1: LSSA; > 1: LSSAR re-weighting exponent (paper: 3 at 1K, 15 at 8K)
    train_length: float | None = None  # lam_i = log N_i / log train_length (not in the paper; off)
    qk_norm: bool = True  # the paper's cosine logits with scale log(D)
    trained: bool = True  # the weights were trained with softplus attention (no warning)
    warned: bool = False


DEFAULTS = SoftplusOptions()


def softplus_attention_forward(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """The ``hfx_softplus`` attention function (transformers' contract: returns (B, Tq, H, D), None).

    Masks of any form through ``keep_mask`` (padding and sliding windows are in transformers' mask); GQA without
    repeating k/v; softcap / sink logits refused."""
    check_attention_kwargs("softplus", kwargs)
    opts = getattr(module, "hfx_softplus", DEFAULTS)
    if module.training:
        opts.trained = True
    elif not opts.trained and not opts.warned:
        opts.warned = True
        warnings.warn("softplus attention runs on a model that was not trained with it (a softmax-pretrained model "
                      "computes something else now): fine-tune it first, or pass trained=True to "
                      "hfx.attention.apply(model, 'softplus', ...) if its weights were trained with softplus",
                      UntrainedSoftplusWarning, stacklevel=2)
    if dropout and module.training:
        raise ValueError(f"hfx_softplus has no attention dropout (got {dropout}); set config.attention_dropout=0.0")
    tq, tk = query.shape[2], key.shape[2]
    mask = None if attention_mask is None else keep_mask(attention_mask, tq, tk, query.device)
    if opts.qk_norm:
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
        scale = math.log(query.shape[-1])
    else:
        scale = module.scaling if scaling is None else scaling
    out = softplus_attention(query, key, value, mask, scale=scale, length_scale=opts.length_scale,
                             power=opts.power, train_length=opts.train_length)
    return out.transpose(1, 2).contiguous(), None


register(KEY, softplus_attention_forward)


def apply(model: nn.Module, *, length_scale: bool = True, power: float = 1.0, train_length: float | None = None,
          qk_norm: bool = True, trained: bool = False) -> nn.Module:
    """Select softplus attention on ``model`` with these options, reversibly (``hfx.attention.revert``).

    ``length_scale=True`` (lam = log N_i), ``power=1.0`` (LSSA; > 1: LSSAR, paper 3 or 15), ``train_length=None``
    (lam = log N_i / log train_length when set), ``qk_norm=True`` (paper's cosine logits, scale log D), all from the
    paper via ``hfx_kernels.softplus_attention``; ``trained=False`` warns at the first inference forward before any
    training forward (see the module docstring).

    >>> hfx.attention.apply(model, "softplus", power=3.0)   # then train  # doctest: +SKIP
    """
    check_supported(model, "softplus")
    _check_options(power, train_length)  # the kernel's own check, at apply time rather than at the first forward
    opts = SoftplusOptions(bool(length_scale), float(power), train_length, bool(qk_norm), bool(trained))
    for module in attention_modules(model):
        set_module_attribute(model, module, "hfx_softplus", opts)
    set_attention(model, KEY)
    return model
