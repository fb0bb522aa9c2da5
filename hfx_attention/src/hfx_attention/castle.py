"""CASTLE: causal attention with lookahead keys (Song, Sun, Yuan, Gu, arXiv 2509.07301; spec C6), grafted onto a
pretrained model.

Every attention module keeps its causal projections (q^C, k^C, v^C = the model's q/k/v, with RoPE and Qwen3's q/k
norms as before) and gains lookahead projections q^U, k^U, v^U. When predicting at position t, position s ≤ t has
the lookahead key::

    u_s^(t) = Σ_{s < j ≤ t} σ(q^U_s · k^U_j / √d) · v^U_j          (u_t^(t) = 0: it only sees tokens up to t)

and the logits are ``ℓ[t, s] = q^C_t · k^C_s / √d − SiLU(q^C_t · u_s^(t) / √d)``, softmax over s ≤ t, values v^C.
W_vU starts at zero, so U ≡ 0, SiLU(0) = 0 and the grafted model is exactly the pretrained one; the gradient of
W_vU is not zero there (SiLU'(0) = 1/2), so training leaves the graft point.

**Parallel form** (training, prefill), O(T²d) without a T×T×d tensor: with A[t, j] = q^C_t·v^U_j (j ≤ t) and
W[s, j] = σ(q^U_s·k^U_j/√d) (j > s), q^C_t·u_s^(t) = Σ_j A[t, j] W[s, j]. Query rows are taken in blocks of
``block_size``: earlier blocks' j enter through the running state U (= u^(block start − 1), T × d), the block's own j
through an nb × nb × T product, then U += W_block V_block.

**Decode**: :class:`CastleLayer` keeps k^C, v^C, q^U and U (not append-only: every step adds
σ(q^U_s·k^U_t/√d)·v^U_t to every U_s). After ``apply``, any empty plain ``DynamicLayer`` the module meets (the cache
``generate`` or ``forward(use_cache=True)`` creates) is replaced by a CastleLayer, so ``generate`` works unchanged; or
pass :class:`CastleCache` yourself. Cropping (assisted decoding) is refused: U cannot be un-summed.

**GQA**: q^U, k^U, v^U have one head per KV head (H_kv), so U is per KV head and shared by its group's query heads,
as k^C is: the cache costs 2× a GQA KV cache (k^C, v^C, q^U, U).

**Unverified** (spec Part F; the paper text could not be read here, only third-party summaries and the
``lucidrains/lookahead-keys-attention`` reference, which uses this same formula): whether the paper gives every head
both terms (implemented: yes) or splits heads/dimensions half causal, half lookahead; the exact scaling constants
(implemented: 1/√d inside σ and inside SiLU); whether q^U/k^U carry RoPE (implemented: no position encoding on the
lookahead side; positions enter through the causal term).

    >>> hfx.attention.apply(model, "castle")            # exact graft: logits unchanged  # doctest: +SKIP
    >>> hfx.attention.apply(model, "castle", block_size=128)                            # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from hfx._compat import passed_cache

from ._core import (
    attention_modules,
    check_attention_kwargs,
    check_supported,
    keep_mask,
    register,
    repeat_kv,
    replace_attention_modules,
    set_attention,
)
from .rotary import apply_rope

KEY = "hfx_castle"
DEFAULT_BLOCK = 64


# --------------------------------------------------------------------------------------------------
# The math: small pure functions on (B, heads, T, d) tensors
# --------------------------------------------------------------------------------------------------


def lookahead_scores(q_c: Tensor, q_u: Tensor, k_u: Tensor, v_u: Tensor, u0: Tensor, *, scale: float,
                     valid: Tensor | None = None, block_size: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """q^C_t · u_s^(t) for the new query rows t against every position s, and the updated lookahead keys.

    q_c (B, H, Tq, d): queries of the Tq new tokens, which sit at positions P..P+Tq-1 with P = Tk - Tq;
    q_u (B, Hkv, Tk, d): lookahead queries of all positions (cached + new); k_u, v_u (B, Hkv, Tq, d): lookahead keys
    and values of the new tokens; u0 (B, Hkv, Tk, d): lookahead keys before the new tokens (zeros at new positions);
    ``valid`` (B|1, Tq) bool: new tokens that are real (padding never enters a lookahead key).
    Returns S (B, H, Tq, Tk) with S[t, s] = q^C_t · u_s^(t) (not yet scaled), and u^(last new token) (B, Hkv, Tk, d).
    """
    heads, q_len = q_c.shape[1], q_c.shape[2]
    kv_heads, kv_len = q_u.shape[1], q_u.shape[2]
    offset = kv_len - q_len
    q = q_c.unflatten(1, (kv_heads, heads // kv_heads))  # (B, Hkv, G, Tq, d): a group shares its U
    positions = torch.arange(kv_len, device=q_c.device)
    u, rows = u0, []
    for start in range(0, q_len, block_size):
        stop = min(start + block_size, q_len)
        qb, kb, vb = q[..., start:stop, :], k_u[:, :, start:stop], v_u[:, :, start:stop]
        new = torch.arange(start, stop, device=q_c.device)
        # j ≤ t inside the block (earlier j are already summed in u), and only real tokens j
        a = qb @ vb[:, :, None].transpose(-1, -2)  # (B, Hkv, G, nb, nb)
        a_keep = new[None, :] <= new[:, None]
        w_keep = positions[:, None] < (offset + new)[None, :]  # s < j: u_s only looks at later tokens
        if valid is not None:
            a_keep = a_keep & valid[:, None, None, None, start:stop]
            w_keep = w_keep & valid[:, None, None, start:stop]
        a = a.masked_fill(~a_keep, 0.0)
        w = torch.sigmoid(scale * (q_u @ kb.transpose(-1, -2))).masked_fill(~w_keep, 0.0)  # (B, Hkv, Tk, nb)
        rows.append(qb @ u[:, :, None].transpose(-1, -2) + a @ w[:, :, None].transpose(-1, -2))
        u = u + w @ vb
    scores = torch.cat(rows, dim=-2) if rows else q.new_zeros(*q.shape[:-1], kv_len)
    return scores.flatten(1, 2), u


def castle_logits(q_c: Tensor, k_c: Tensor, s_u: Tensor, scale: float) -> Tensor:
    """ℓ = q^C·k^C/√d − SiLU(q^C·u/√d), (B, H, Tq, Tk); k_c has H_kv heads (GQA)."""
    k = repeat_kv(k_c, q_c.shape[1] // k_c.shape[1])
    return scale * (q_c @ k.transpose(-1, -2)) - F.silu(scale * s_u)


@dataclass
class Lookahead:
    """What the CASTLE module hands its attention function besides q^C/k^C/v^C; ``updated`` is filled in."""

    queries: Tensor  # q^U of all positions (B, Hkv, Tk, d)
    keys: Tensor  # k^U of the new tokens (B, Hkv, Tq, d)
    values: Tensor  # v^U of the new tokens (B, Hkv, Tq, d)
    state: Tensor  # U before the new tokens (B, Hkv, Tk, d)
    block_size: int = DEFAULT_BLOCK
    updated: Tensor | None = None


def castle_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, lookahead=None,
                     **kwargs):
    """CASTLE attention with transformers' function contract (registered as ``"hfx_castle"``); ``key``/``value``
    are k^C/v^C of all positions, ``lookahead`` the :class:`Lookahead` the module built. Returns (B, Tq, H, d)."""
    check_attention_kwargs("castle", kwargs)
    if lookahead is None:
        raise ValueError("attn_implementation='hfx_castle' needs CASTLE's lookahead projections; graft them with "
                         "hfx.attention.apply(model, 'castle')")
    q_len, kv_len = query.shape[2], key.shape[2]
    keep = keep_mask(attention_mask, q_len, kv_len, query.device)  # (B|1, 1, Tq, Tk)
    new = torch.arange(q_len, device=query.device)
    valid = keep[:, 0, new, kv_len - q_len + new]  # a new token that sees itself is not padding
    s_u, lookahead.updated = lookahead_scores(query, lookahead.queries, lookahead.keys, lookahead.values,
                                              lookahead.state, scale=scaling, valid=valid,
                                              block_size=lookahead.block_size)
    logits = castle_logits(query, key, s_u, scaling).masked_fill(~keep, float("-inf"))
    # softmax in float32 at least (as transformers' eager attention), back in the model's dtype for the values;
    # rows with nothing visible (padding) give 0, not NaN
    probs = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)).nan_to_num(0.0)
    probs = F.dropout(probs.to(value.dtype), p=dropout, training=dropout > 0)
    out = probs @ repeat_kv(value, query.shape[1] // value.shape[1])
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


class CastleLayer(DynamicLayer):
    """A cache layer for CASTLE: ``keys``/``values`` = k^C/v^C (so lengths and masks work as for any dynamic
    layer), plus ``lookahead_queries`` (q^U) and ``lookahead_keys`` (U), which change at every step."""

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.lookahead_queries = self.lookahead_keys = None

    def extend(self, keys: Tensor, values: Tensor, queries: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Append k^C, v^C, q^U of new tokens; returns all k^C, v^C, q^U and U with zeros at the new positions."""
        fresh = keys.new_zeros(queries.shape)
        if self.keys is None or self.keys.numel() == 0:
            self.keys, self.values, self.lookahead_queries, self.lookahead_keys = keys, values, queries, fresh
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        else:
            self.keys = torch.cat((self.keys, keys), dim=-2)
            self.values = torch.cat((self.values, values), dim=-2)
            self.lookahead_queries = torch.cat((self.lookahead_queries, queries), dim=-2)
            self.lookahead_keys = torch.cat((self.lookahead_keys, fresh), dim=-2)
        return self.keys, self.values, self.lookahead_queries, self.lookahead_keys

    def update(self, *args, **kwargs):
        raise RuntimeError("CastleLayer is filled by the CASTLE attention module (extend), not by cache.update; "
                           "this layer sits in a model that is not (or no longer) CASTLE")

    def _map(self, fn) -> None:
        if self.keys is not None and self.keys.numel():
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.lookahead_queries, self.lookahead_keys = fn(self.lookahead_queries), fn(self.lookahead_keys)

    def reorder_cache(self, beam_idx) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, *args, **kwargs) -> None:
        raise ValueError("CASTLE's lookahead keys sum over later tokens and cannot be cropped; assisted or "
                         "speculative decoding is not supported with CASTLE")

    def reset(self) -> None:
        self.keys = self.values = self.lookahead_queries = self.lookahead_keys = None
        self.is_initialized = False

    def offload(self):
        raise ValueError("CASTLE's cache does not support offloading; generate without cache offloading")


class CastleCache(DynamicCache):
    """A cache of :class:`CastleLayer`, one per decoder layer: ``model(ids, cache=CastleCache(model))``
    (``past_key_values=`` before transformers 5.24)."""

    def __init__(self, model):
        Cache.__init__(self, layers=[CastleLayer() for _ in range(model.config.num_hidden_layers)])


def castle_layer(cache, layer_idx: int):
    """The CastleLayer of ``cache`` for ``layer_idx``; an empty plain DynamicLayer (the one ``generate`` or a
    ``forward(use_cache=True)`` creates) is replaced by a fresh CastleLayer."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"CASTLE needs a transformers Cache with layers; got {type(cache).__name__}")
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while replicate is not None and len(layers) <= layer_idx:
        layers.append(replicate())
    layer = layers[layer_idx]
    if isinstance(layer, CastleLayer):
        return layer
    if type(layer) is DynamicLayer and layer.get_seq_length() == 0:
        layers[layer_idx] = CastleLayer()
        return layers[layer_idx]
    raise ValueError(f"CASTLE keeps lookahead keys in CastleLayer cache layers, but layer {layer_idx} of the cache is "
                     f"a {type(layer).__name__}; use the default dynamic cache or hfx_attention.castle.CastleCache(model)"
                     " (static, sliding-window, quantized and offloaded caches are not supported)")


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


class HfxCastleAttention(nn.Module):
    """A Llama/Qwen2/Qwen3/Mistral ``self_attn`` with CASTLE lookahead keys: the source's ``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj`` (and Qwen3 ``q_norm``/``k_norm``) plus ``q_u_proj``, ``k_u_proj``, ``v_u_proj``
    (hidden -> H_kv·d, no bias; ``v_u_proj`` zero-initialised)."""

    def __init__(self, source: nn.Module, *, block_size: int = DEFAULT_BLOCK):
        super().__init__()
        config = source.config
        self.config, self.layer_idx = config, source.layer_idx
        self.head_dim, self.num_key_value_groups = source.head_dim, source.num_key_value_groups
        self.scaling, self.attention_dropout, self.is_causal = source.scaling, source.attention_dropout, True
        self.block_size = block_size
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            setattr(self, name, getattr(source, name, None))
        weight = source.k_proj.weight
        kw = {"dtype": weight.dtype, "device": weight.device, "bias": False}
        kv_dim = config.num_key_value_heads * self.head_dim
        self.q_u_proj = nn.Linear(config.hidden_size, kv_dim, **kw)
        self.k_u_proj = nn.Linear(config.hidden_size, kv_dim, **kw)
        self.v_u_proj = nn.Linear(config.hidden_size, kv_dim, **kw)
        with torch.no_grad():
            std = getattr(config, "initializer_range", 0.02)
            self.q_u_proj.weight.normal_(0.0, std)
            self.k_u_proj.weight.normal_(0.0, std)
            self.v_u_proj.weight.zero_()  # exact graft: U = 0, SiLU(0) = 0

    def _heads(self, x: Tensor, proj, norm=None) -> Tensor:
        y = proj(x).unflatten(-1, (-1, self.head_dim))
        return (y if norm is None else norm(y)).transpose(1, 2)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                cache=None, cache_position=None, **kwargs):
        batch, q_len = hidden_states.shape[:2]
        cos, sin = position_embeddings
        query = apply_rope(self._heads(hidden_states, self.q_proj, self.q_norm), cos, sin)
        key = apply_rope(self._heads(hidden_states, self.k_proj, self.k_norm), cos, sin)
        value = self._heads(hidden_states, self.v_proj)
        q_u = self._heads(hidden_states, self.q_u_proj)
        k_u, v_u = self._heads(hidden_states, self.k_u_proj), self._heads(hidden_states, self.v_u_proj)
        cache = passed_cache({"cache": cache, "past_key_values": past_key_values})
        layer = None
        if cache is not None:
            layer = castle_layer(cache, self.layer_idx)
            key, value, q_u_all, state = layer.extend(key, value, q_u)
        else:
            q_u_all, state = q_u, torch.zeros_like(v_u)
        lookahead = Lookahead(q_u_all, k_u, v_u, state, self.block_size)
        kwargs.pop("sliding_window", None)
        out, weights = castle_attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                        dropout=self.attention_dropout if self.training else 0.0,
                                        lookahead=lookahead, **kwargs)
        if layer is not None:
            layer.lookahead_keys = lookahead.updated
        return self.o_proj(out.reshape(batch, q_len, -1)), weights

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, kv_groups={self.num_key_value_groups}, block_size={self.block_size}"


# --------------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------------


def apply(model, *, block_size: int = DEFAULT_BLOCK):
    """Graft CASTLE lookahead keys onto every attention module of ``model`` (reversibly: ``hfx.attention.revert``);
    exact at init (W_vU = 0). ``block_size``: query rows per block of the parallel form (memory vs. loop count).
    Returns ``model``.

        >>> hfx.attention.apply(model, "castle")  # doctest: +SKIP
    """
    check_supported(model, "castle")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"castle: block_size must be a positive integer, got {block_size!r}")
    for module in attention_modules(model):
        # Qwen2/Qwen3 keep a per-layer window on the module; Mistral reads config.sliding_window
        window = module.sliding_window if hasattr(module, "sliding_window") else getattr(module.config,
                                                                                          "sliding_window", None)
        if window is not None:
            raise ValueError("castle does not support sliding-window attention layers (its lookahead keys sum over "
                             "every later token); use a config without a sliding window (sliding_window=None / "
                             "use_sliding_window=False)")
    replace_attention_modules(model, lambda source: HfxCastleAttention(source, block_size=block_size)
                              .train(source.training))
    set_attention(model, KEY)
    return model


register(KEY, castle_attention)
