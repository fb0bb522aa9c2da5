"""TPA: Tensor Product Attention (Zhang et al., arXiv 2501.06425; spec C5) with a factorized KV cache.

For token t with hidden state x, each of Q, K, V is a normalised sum of rank-1 products of a **head factor**
a_r(x) ∈ R^H and a **dimension factor** b_r(x) ∈ R^d::

    K_t = (1/R_K) Σ_r a^K_r(x_t) ⊗ b^K_r(x_t)            (an H × d matrix: row i is head i's key)

Factors are linear in x ("contextual"); RoPE acts on the d axis and a only mixes heads by scalars, so RoPE is
applied to the b factors of Q and K and the cache keeps the *rotated* b^K. Per token and layer the cache holds
(R_K + R_V)(H + d) numbers instead of GQA's 2·H_kv·d (:func:`tpa_cache_bytes`).

``init``:

- ``"random"`` (default): a fresh contextual TPA, Xavier-initialised factors, ranks ``q_rank=6``, ``rank=2`` (the
  official "small" T6 config, tensorgi/TPA); the model's ``o_proj`` is kept. It must be trained: on a model whose
  parameters are all frozen it is refused unless ``allow_untrained=True``.
- ``"gqa"``: the exact conversion of the model's GQA attention (paper: MHA/MQA/GQA are non-contextual TPAs). K/V
  rank R = number of KV groups (``num_key_value_heads``), a_r = R·[head in group r], b_r = the group's k/v
  projection; Q with rank H and one-hot a. Logits equal the source model's. No cache saving (that needs R < groups
  and training); ``contextual=True`` adds zero-initialised contextual weights to the constant head factors, so the
  converted model starts exact and can learn contextual factors.
- ``"svd"`` (experimental, lossy for rank < groups): the best rank-R approximation (SVD across the distinct heads) of
  the k/v (and q, if ``q_rank`` < H) projections, as non-contextual factors.

Qwen3 normalises q and k per head (RMSNorm over d) before RoPE; here the norm is applied to every b factor of Q and
K. That is exact for ``init="gqa"`` (every head then equals one b factor) and a design choice otherwise (the head
factors carry the scale).

Decode (one query token, no gradient) contracts with the cached factors through ``hfx_kernels.tpa_decode``; prefill
materialises K and V from the factors and runs SDPA.

    >>> hfx.attention.apply(model, "tpa", init="gqa")        # exact; logits unchanged  # doctest: +SKIP
    >>> hfx.attention.apply(model, "tpa", q_rank=6, rank=2)  # fresh TPA to train       # doctest: +SKIP
    >>> tpa_cache_bytes(model, seq_len=4096)                 # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hfx._compat import passed_cache
from hfx_kernels.tpa_decode import tpa_decode, tpa_materialize

from ._core import (
    check_attention_kwargs,
    check_supported,
    keep_mask,
    register,
    replace_attention_modules,
    set_attention,
)
from .rotary import apply_rope

KEY = "hfx_tpa"
INITS = ("random", "gqa", "svd")
DEFAULT_Q_RANK = 6  # official "small" T6 config (tensorgi/TPA): q_rank 6, K/V rank 2
DEFAULT_RANK = 2


# --------------------------------------------------------------------------------------------------
# The math: small pure functions
# --------------------------------------------------------------------------------------------------


def rope_factor(b: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on dimension factors b (B, T, R, d) with HF's (cos, sin) of shape (B, T, d) (rotate_half layout).
    RoPE is linear in d and the head factors are scalars, so this equals RoPE on the materialised heads."""
    return apply_rope(b, cos[:, :, None], sin[:, :, None])  # broadcast over the rank axis


def pack_factors(a: Tensor, b: Tensor) -> Tensor:
    """a (B, T, H, R), b (B, T, R, d) -> one (B, 1, T, R·d + H·R) tensor: DynamicLayer only concatenates on dim -2,
    so the factors ride in any transformers cache layer unchanged."""
    return torch.cat((b.flatten(-2), a.flatten(-2)), dim=-1)[:, None]


def unpack_factors(packed: Tensor, heads: int, rank: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_factors`: (B, 1, T, R·d + H·R) -> a (B, T, H, R), b (B, T, R, d)."""
    x = packed[:, 0]
    b, a = x.split((rank * head_dim, heads * rank), dim=-1)
    return a.unflatten(-1, (heads, rank)), b.unflatten(-1, (rank, head_dim))


def factor_cache_numbers(heads: int, head_dim: int, k_rank: int, v_rank: int) -> int:
    """Numbers cached per token per layer by TPA: (R_K + R_V)(H + d) (GQA: 2·H_kv·d)."""
    return (k_rank + v_rank) * (heads + head_dim)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float, dropout: float = 0.0) -> Tensor:
    """SDPA on (B, H, T, d) tensors with a boolean keep mask; rows with nothing to attend (left padding) attend to
    everything instead of producing NaN (their outputs are never used, but NaN would leak through 0·NaN)."""
    keep = keep | ~keep.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout, scale=scale)


# --------------------------------------------------------------------------------------------------
# Attention function (registered as "hfx_tpa")
# --------------------------------------------------------------------------------------------------


def tpa_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Attention on packed TPA factors (what :class:`HfxTPAAttention` caches), transformers' function contract.

    ``query`` is the materialised, rotated Q (B, H, Tq, d); ``key``/``value`` are packed factors (B, 1, Tk, ·)."""
    check_attention_kwargs("tpa", kwargs)
    if not isinstance(module, HfxTPAAttention):
        raise ValueError("attn_implementation='hfx_tpa' needs TPA's factor projections; convert the model with "
                         "hfx.attention.apply(model, 'tpa', init='gqa' | 'random' | 'svd')")
    heads, d = module.num_heads, module.head_dim
    a_k, b_k = unpack_factors(key, heads, module.k_rank, d)
    a_v, b_v = unpack_factors(value, heads, module.v_rank, d)
    q_len, kv_len = query.shape[2], key.shape[2]
    keep = keep_mask(attention_mask, q_len, kv_len, query.device)
    if q_len == 1 and not (torch.is_grad_enabled() and query.requires_grad):
        # decode: contract q with the cached factors, never materialising K/V (FlashTPA-style)
        out = tpa_decode(query, a_k, b_k, a_v, b_v, keep, scale=scaling)
    else:
        out = softmax_attention(query, tpa_materialize(a_k, b_k), tpa_materialize(a_v, b_v), keep, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def check_dynamic_cache(cache, layer_idx: int) -> None:
    """The packed factors (B, 1, T, R·d + H·R) fit any dynamic cache layer; a static cache pre-allocates
    (B, H_kv, T_max, d) and cannot hold them."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers) and not isinstance(layers[layer_idx], DynamicLayer):
        raise ValueError(f"TPA caches packed factors and needs a dynamic cache, but layer {layer_idx} of the cache is "
                         f"a {type(layers[layer_idx]).__name__}; generate without cache_implementation='static' "
                         "(or pass a DynamicCache)")


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


class HeadFactor(nn.Module):
    """Head factors a_r(x) ∈ R^H for r < R as (B, T, H, R): ``weight @ x`` (contextual, when ``weight`` exists)
    plus a constant ``bias`` (non-contextual TPA, or the exact-graft starting point of a contextual one)."""

    def __init__(self, hidden: int, heads: int, rank: int, *, contextual: bool, constant: Tensor | None,
                 dtype=None, device=None):
        super().__init__()
        self.heads, self.rank = heads, rank
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(heads * rank, hidden, **kw)) if contextual else None
        self.bias = None if constant is None else nn.Parameter(constant.reshape(heads * rank).to(**kw).clone())
        if self.weight is None and self.bias is None:
            raise ValueError("a head factor needs contextual weights or a constant")

    def forward(self, x: Tensor) -> Tensor:
        out = self.bias.expand(*x.shape[:-1], -1) if self.weight is None else F.linear(x, self.weight, self.bias)
        return out.unflatten(-1, (self.heads, self.rank))


class HfxTPAAttention(nn.Module):
    """TPA replacing a Llama/Qwen2/Qwen3/Mistral ``self_attn`` (same call signature on transformers 4.56 – 5.24).

    Parameters: ``a_q/a_k/a_v`` (:class:`HeadFactor`), ``b_q/b_k/b_v`` (``Linear(hidden, R·d)``), the source's
    ``o_proj`` and, for Qwen3, its ``q_norm``/``k_norm`` (applied to the b factors)."""

    def __init__(self, source: nn.Module, *, q_rank: int, k_rank: int, v_rank: int, contextual: bool,
                 constant: bool):
        super().__init__()
        config = source.config
        self.config, self.layer_idx = config, source.layer_idx
        self.head_dim, self.num_heads = source.head_dim, config.num_attention_heads
        self.num_key_value_groups = 1  # materialised K/V have one head per query head
        self.scaling, self.attention_dropout, self.is_causal = source.scaling, source.attention_dropout, True
        self.q_rank, self.k_rank, self.v_rank = q_rank, k_rank, v_rank
        weight = source.o_proj.weight
        kw = {"dtype": weight.dtype, "device": weight.device}
        hidden, heads, d = config.hidden_size, self.num_heads, self.head_dim
        bias = source.k_proj.bias is not None  # Qwen2 has q/k/v biases
        for name, rank in (("q", q_rank), ("k", k_rank), ("v", v_rank)):
            setattr(self, f"a_{name}", HeadFactor(hidden, heads, rank, contextual=contextual,
                                                  constant=torch.ones(heads, rank) if constant else None, **kw))
            setattr(self, f"b_{name}", nn.Linear(hidden, rank * d, bias=bias, **kw))
        self.o_proj = source.o_proj
        self.q_norm = getattr(source, "q_norm", None)
        self.k_norm = getattr(source, "k_norm", None)

    def _factors(self, x: Tensor, name: str, norm, cos, sin) -> tuple[Tensor, Tensor]:
        rank = getattr(self, f"{name}_rank")
        a = getattr(self, f"a_{name}")(x)
        b = getattr(self, f"b_{name}")(x).unflatten(-1, (rank, self.head_dim))
        if norm is not None:
            b = norm(b)
        if cos is not None:
            b = rope_factor(b, cos, sin)
        return a, b

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                cache=None, cache_position=None, **kwargs):
        batch, q_len = hidden_states.shape[:2]
        cos, sin = position_embeddings
        a_q, b_q = self._factors(hidden_states, "q", self.q_norm, cos, sin)
        a_k, b_k = self._factors(hidden_states, "k", self.k_norm, cos, sin)
        a_v, b_v = self._factors(hidden_states, "v", None, None, None)
        key, value = pack_factors(a_k, b_k), pack_factors(a_v, b_v)
        cache = passed_cache({"cache": cache, "past_key_values": past_key_values})
        if cache is not None:
            check_dynamic_cache(cache, self.layer_idx)
            key, value = cache.update(key, value, self.layer_idx)
        kwargs.pop("sliding_window", None)  # windows arrive baked into the SDPA-style mask
        out, weights = tpa_attention(self, tpa_materialize(a_q, b_q), key, value, attention_mask,
                                     scaling=self.scaling, dropout=self.attention_dropout if self.training else 0.0,
                                     **kwargs)
        return self.o_proj(out.reshape(batch, q_len, -1)), weights

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, q_rank={self.q_rank}, k_rank={self.k_rank}, " \
               f"v_rank={self.v_rank}"


# --------------------------------------------------------------------------------------------------
# Initialisation from a GQA module
# --------------------------------------------------------------------------------------------------


def _distinct_heads(linear: nn.Linear, rows: int, head_dim: int) -> Tensor:
    """A projection as one row per distinct head: (rows, head_dim · (in + bias))."""
    w = linear.weight.detach().reshape(rows, head_dim, -1)
    if linear.bias is not None:
        w = torch.cat((w, linear.bias.detach().reshape(rows, head_dim, 1)), dim=-1)
    return w.reshape(rows, -1)


def indicator_factors(heads: int, groups: int) -> Tensor:
    """GQA as a non-contextual TPA (paper): a (H, R=groups) with a[h, r] = R if head h is in group r else 0.
    groups = H is MHA (one-hot), groups = 1 is MQA (all ones)."""
    member = torch.arange(heads) // (heads // groups)
    return groups * F.one_hot(member, groups).to(torch.float64)


def svd_factors(rows: Tensor, heads: int, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-R approximation (Frobenius, across the distinct heads) of per-head projections ``rows``
    (G, N) as non-contextual TPA factors: a (H, R) with head h reading row h // (H/G), and B (R, N) such that
    (1/R) Σ_r a[h, r] B_r ≈ rows[h // (H/G)]. Exact (up to rounding) when rank = G."""
    u, s, vt = torch.linalg.svd(rows.to(torch.float64), full_matrices=False)
    member = torch.arange(heads) // (heads // rows.shape[0])
    return rank * u[member, :rank], s[:rank, None] * vt[:rank]


@torch.no_grad()
def _graft(module: HfxTPAAttention, source: nn.Module, init: str) -> None:
    heads, d = module.num_heads, module.head_dim
    kv_heads = module.config.num_key_value_heads
    for name, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
        rank = getattr(module, f"{name}_rank")
        per_head = _distinct_heads(getattr(source, f"{name}_proj"), rows, d)
        if init == "gqa" or (name == "q" and rank == heads):
            a, b = indicator_factors(heads, rows), per_head.to(torch.float64)
        else:
            a, b = svd_factors(per_head, heads, rank)
        b = b.reshape(rank * d, -1)
        linear: nn.Linear = getattr(module, f"b_{name}")
        if linear.bias is not None:
            linear.bias.copy_(b[:, -1])
            b = b[:, :-1]
        linear.weight.copy_(b)
        factor: HeadFactor = getattr(module, f"a_{name}")
        factor.bias.copy_(a.reshape(-1))
        if factor.weight is not None:
            factor.weight.zero_()  # contextual part starts at zero: the graft is exact


@torch.no_grad()
def _random_init(module: HfxTPAAttention) -> None:
    for name in ("q", "k", "v"):
        nn.init.xavier_uniform_(getattr(module, f"a_{name}").weight)
        linear = getattr(module, f"b_{name}")
        nn.init.xavier_uniform_(linear.weight)
        if linear.bias is not None:
            linear.bias.zero_()


# --------------------------------------------------------------------------------------------------
# apply / cache size
# --------------------------------------------------------------------------------------------------


def _positive(name: str, value) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"tpa: {name} must be a positive integer, got {value!r}")
    return value


def resolve_ranks(config, init: str, q_rank=None, rank=None, k_rank=None, v_rank=None) -> tuple[int, int, int]:
    """(q_rank, k_rank, v_rank) for ``init``, checked against the head layout (errors name the fix)."""
    for name, value in (("q_rank", q_rank), ("rank", rank), ("k_rank", k_rank), ("v_rank", v_rank)):
        _positive(name, value)
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    if init == "gqa":
        if q_rank not in (None, heads):
            raise ValueError(f"tpa init='gqa' reproduces the query projection with q_rank = num_attention_heads "
                             f"({heads}); got q_rank={q_rank}. Drop q_rank, or use init='svd' / init='random'.")
        default = groups
    elif init == "svd":
        if q_rank is not None and q_rank > heads:
            raise ValueError(f"tpa init='svd': q_rank={q_rank} exceeds num_attention_heads ({heads}); use q_rank <= "
                             f"{heads} (q_rank = {heads}, the default, keeps the queries exact)")
        q_rank = heads if q_rank is None else q_rank
        default = min(DEFAULT_RANK, groups)
    else:
        q_rank = DEFAULT_Q_RANK if q_rank is None else q_rank
        default = DEFAULT_RANK
    k_rank = k_rank or rank or default
    v_rank = v_rank or rank or default
    if init == "gqa" and (k_rank != groups or v_rank != groups):
        raise ValueError(f"tpa init='gqa' is exact only with K/V rank = number of KV groups (num_key_value_heads = "
                         f"{groups}); got k_rank={k_rank}, v_rank={v_rank}. Drop rank, or use init='svd' for a lossy "
                         f"rank < {groups}, or init='random' to train a TPA of any rank.")
    if init == "svd" and max(k_rank, v_rank) > groups:
        raise ValueError(f"tpa init='svd' approximates the {groups} KV heads: rank must be <= {groups}, got "
                         f"k_rank={k_rank}, v_rank={v_rank} (init='random' trains any rank)")
    return q_rank or heads, k_rank, v_rank


def apply(model, *, init: str = "random", q_rank: int | None = None, rank: int | None = None,
          k_rank: int | None = None, v_rank: int | None = None, contextual: bool | None = None,
          allow_untrained: bool = False):
    """Replace every attention module of ``model`` with :class:`HfxTPAAttention` (reversibly: ``hfx.attention.revert``).

    ``init``: ``"random"`` (fresh contextual TPA, ranks 6/2 by default), ``"gqa"`` (exact conversion, K/V rank =
    number of KV groups, Q rank = H) or ``"svd"`` (lossy, rank <= KV groups). ``rank`` sets both K and V ranks;
    ``k_rank``/``v_rank`` override it. ``contextual`` (default: True for random, False otherwise) adds
    x-dependent head factors. Returns ``model``.

        >>> hfx.attention.apply(model, "tpa", init="gqa")  # doctest: +SKIP
    """
    check_supported(model, "tpa")
    if init not in INITS:
        raise ValueError(f"tpa: init must be one of {', '.join(INITS)}; got {init!r}")
    contextual = (init == "random") if contextual is None else bool(contextual)
    if init == "random" and not contextual:
        raise ValueError("tpa init='random' builds contextual factors; contextual=False applies to init='gqa'/'svd'")
    if init == "random" and not allow_untrained and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("tpa init='random' gives an untrained attention, but every parameter of the model is frozen. "
                         "Train it (unfreeze the parameters), use init='gqa' for an exact conversion, or pass "
                         "allow_untrained=True.")
    ranks = resolve_ranks(model.config, init, q_rank, rank, k_rank, v_rank)

    def build(source):
        module = HfxTPAAttention(source, q_rank=ranks[0], k_rank=ranks[1], v_rank=ranks[2], contextual=contextual,
                                 constant=init != "random")
        if init == "random":
            _random_init(module)
        else:
            _graft(module, source, init)
        return module.train(source.training)

    replace_attention_modules(model, build)
    set_attention(model, KEY)
    return model


def from_gqa(model, *, contextual: bool = False):
    """Convert a pretrained GQA (or MHA / MQA) model into TPA exactly: its logits are unchanged (spec C5, K/V rank =
    number of KV groups). ``contextual=True`` adds zero-initialised x-dependent head factors to train from there.
    Same as ``hfx.attention.apply(model, "tpa", init="gqa")``; undone by ``hfx.attention.revert``.

        >>> from_gqa(AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B"))  # doctest: +SKIP
    """
    import hfx

    return hfx.attention.apply(model, "tpa", init="gqa", contextual=contextual)


def tpa_cache_bytes(model, seq_len: int, batch: int = 1) -> int:
    """Bytes the factor cache of a TPA ``model`` holds for ``batch`` sequences of ``seq_len`` tokens:
    Σ_layers (R_K + R_V)(H + d) · seq_len · batch · element size (GQA: 2·H_kv·d per token and layer).

        >>> tpa_cache_bytes(model, 4096)  # doctest: +SKIP
    """
    total = 0
    for module in model.modules():
        if isinstance(module, HfxTPAAttention):
            numbers = factor_cache_numbers(module.num_heads, module.head_dim, module.k_rank, module.v_rank)
            total += numbers * seq_len * batch * module.o_proj.weight.element_size()
    if not total and seq_len and batch:
        raise ValueError("tpa_cache_bytes: the model has no TPA attention; apply it with hfx.attention.apply(model, "
                         "'tpa', ...)")
    return total


register(KEY, tpa_attention)
