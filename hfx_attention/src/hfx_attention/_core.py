"""What every hfx attention method shares: the supported model families, registration with transformers (function
*and* mask), reversible patching of a model's attention modules, and the mask/GQA plumbing of attention functions.

Version differences stay in ``hfx._compat``; everything here works on transformers 4.56 – 5.24.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn

from hfx import compose
from hfx.attention import on_revert

# One implementation each, in hfx.compose (plain attention contributions use them too):
register = compose.register_function  # register(key, function, mask="sdpa"): function *and* mask, returns key
set_attention = compose.set_attention  # set_attention(model, key): select the registered key, reversibly

# model_type -> what the decoder looks like; all four keep `model.model.layers[i].self_attn` and a shared
# `model.model.rotary_emb`, call the attention function with `position_ids` in kwargs and take (cos, sin) rotary.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def check_supported(model: nn.Module, method: str) -> None:
    """Refuse a model family the method was not built and tested for, naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"hfx attention {method!r} does not support {type(model).__name__} (model_type={model_type!r}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def decoder(model: nn.Module) -> nn.Module:
    """The base decoder (``LlamaModel`` …) of a ``*ForCausalLM`` or of the base model itself."""
    base = getattr(model, "model", model)
    if not hasattr(base, "layers"):
        raise ValueError(f"{type(model).__name__} has no decoder layers at `.model.layers`")
    return base


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``self_attn`` module of every decoder layer, in layer order."""
    return [layer.self_attn for layer in decoder(model).layers]


def replace_attention_modules(model: nn.Module, build: Callable[[nn.Module], nn.Module]) -> list[nn.Module]:
    """Replace every layer's ``self_attn`` by ``build(old)``, reversibly; returns the new modules."""
    new_modules = []
    for layer in decoder(model).layers:
        old = layer.self_attn
        new = build(old)
        layer.self_attn = new
        on_revert(model, lambda layer=layer, old=old: setattr(layer, "self_attn", old))
        new_modules.append(new)
    return new_modules


def set_module_attribute(model: nn.Module, module: nn.Module, name: str, value) -> None:
    """``object.__setattr__(module, name, value)`` (not registered as a submodule or parameter), reversibly: revert
    restores the instance's own previous value or removes the attribute, so a class attribute, method or submodule of
    that name shows through again."""
    had, old = name in module.__dict__, module.__dict__.get(name)
    object.__setattr__(module, name, value)
    on_revert(model, lambda: object.__setattr__(module, name, old) if had else object.__delattr__(module, name))


def causal_keep(q_len: int, kv_len: int, device=None) -> Tensor:
    """Bottom-right-aligned causal mask (q_len, kv_len), True = attend: query i sits at key position
    ``kv_len - q_len + i`` (a prefill continuing a cache, or one decode step)."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= rows


def keep_mask(attention_mask: Tensor | None, q_len: int, kv_len: int, device=None) -> Tensor:
    """Any mask transformers hands an attention function as a boolean (B|1, 1|H, q_len, kv_len), True = attend.

    ``None`` (transformers skips building a plain causal mask) is bottom-right causal; a boolean mask is taken as
    is; an additive float mask (0 / dtype-min) keeps the entries above half the dtype's minimum."""
    if attention_mask is None:
        return causal_keep(q_len, kv_len, device)[None, None]
    if attention_mask.dtype == torch.bool:
        mask = attention_mask
    else:
        mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return mask[..., -q_len:, -kv_len:] if mask.dim() == 4 else mask


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * groups, T, D): each KV head repeated for the query heads of its group."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def check_attention_kwargs(method: str, kwargs: dict) -> None:
    """Refuse options an hfx attention function does not implement rather than ignore them."""
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"hfx attention {method!r} does not implement {name!r} (Gemma2 soft-capping / gpt-oss "
                             "sink logits); use it on a supported model type: " + ", ".join(SUPPORTED_MODEL_TYPES))


def cache_bytes(cache, names: Collection[str] | None = None) -> int:
    """Bytes of the tensors a cache's layers hold: every one (keys and values, plus what a policy keeps beside them:
    slot positions, scores, CASTLE's lookahead state, TPA's packed factors), or only the attributes in ``names``
    (``("keys", "values")``: the part a dense cache also holds); 0 for layers not filled yet.

    >>> cache_bytes(model(ids, use_cache=True).past_key_values)  # doctest: +SKIP
    """
    return sum(value.numel() * value.element_size() for layer in cache.layers for name, value in vars(layer).items()
               if isinstance(value, Tensor) and (names is None or name in names))
