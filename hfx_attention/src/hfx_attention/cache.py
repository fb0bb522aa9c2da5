"""The policy-cache framework shared by attention sinks and H2O (spec C1, C2, A4): KV cache layers that keep a
fixed budget of slots chosen by a policy, the attention function that reads them, and the model patch that makes
plain ``forward``/``generate`` build the right cache.

How a step runs (transformers 4.56 – 5.24):

1. ``forward``/``generate`` (patched per instance by :func:`install`) build the hfx cache when none is passed and
   hand it the 2D padding mask of the new tokens (:meth:`PolicyCache.begin_forward`).
2. The decoder asks ``get_mask_sizes`` for the post-update kv length (kept + new) and ``get_seq_length`` for
   positions; both are answered without touching the state (``get_seq_length`` is cumulative: tokens seen).
3. Each attention module calls ``update``: the layer first evicts down to the policy's target (so eviction decided
   from the previous step's scores happens here, as in H2O's code), appends the new tokens and returns kept + new.
4. The attention function (:func:`policy_attention`) finds its layer through a weak handle on the module, rotates
   the **pre-RoPE** keys (rotary bypass) at their cache slot (``positions="cache"``, StreamingLLM's pos-shift: keys
   at 0..n-1 counting valid slots, the query at the number of valid cached tokens before it; every kept key again
   at each step) or, once, the new keys at their original position (``positions="original"``: written back, so the
   cache then holds rotated keys), masks invalid (padding) slots and, for H2O, adds each key's softmax mass (summed
   over query rows and the group's query heads) to the layer's scores.

Budget convention for both policies: a decode step attends to ``budget`` cached tokens, its own token included
(StreamingLLM's ``start_size + recent_size``); between steps the cache holds at most ``budget`` slots. A step with
``q`` new tokens first evicts down to ``budget - q`` (never below the sinks + heavy hitters), so a prefill longer
than the budget attends fully and is trimmed at the next step.

Per-slot state, shape (B, Hp, N) with Hp = 1 (same slots for every KV head: sinks) or H_kv (H2O): original
position, validity (False for left padding) and, for H2O, accumulated score. Every row keeps the same number of
slots; padding slots are evicted first, so a padded row keeps exactly the tokens it would keep unpadded.
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from hfx._compat import cache_argument, mask_query_length, passed_cache
from hfx.attention import applied

from ._core import (
    attention_modules,
    check_attention_kwargs,
    check_supported,
    repeat_kv,
    set_attention,
    set_module_attribute,
)
from .rotary import apply_rope, bypass_rotary, rope_cos_sin

POSITIONS = ("cache", "original")
POLICY_METHODS = ("sinks", "h2o")
_HANDLE = "_hfx_cache_layer"  # attribute of each attention module: weakref to the layer that last updated


# ----------------------------------------------------------------------------------------------------------------
# pure helpers (the policy math)
# ----------------------------------------------------------------------------------------------------------------


def first_valid(valid: Tensor, count: int) -> Tensor:
    """The first ``count`` valid slots of each row (the sinks): bool like ``valid``."""
    return valid & (valid.cumsum(-1) <= count)


def last_valid(valid: Tensor, count: int) -> Tensor:
    """The last ``count`` valid slots of each row (the recent window): bool like ``valid``."""
    return valid & (valid.flip(-1).cumsum(-1).flip(-1) <= count)


def keep_indices(priority: Tensor, count: int) -> Tensor:
    """Indices (ascending, so slot order is kept) of the ``count`` highest-priority slots along the last dim.
    +inf slots are always kept (callers keep their number <= count), -inf ones go first."""
    return priority.topk(count, dim=-1, sorted=False).indices.sort(dim=-1).values


def slot_positions(valid: Tensor) -> Tensor:
    """Cache-relative positions (pos-shift): valid slots numbered 0, 1, ... in slot order (padding skipped)."""
    return (valid.cumsum(-1) - 1).clamp(min=0)


def slot_keep_mask(valid: Tensor, q_len: int) -> Tensor:
    """(B, Hp, q_len, N) boolean mask, True = attend: the new queries sit in the last ``q_len`` slots and see the
    valid slots up to their own (causal in slot order); a query always sees its own slot, so a padding query has a
    finite (unused) output instead of a NaN that would reach the values of later layers."""
    n = valid.shape[-1]
    rows = torch.arange(n - q_len, n, device=valid.device)[:, None]
    cols = torch.arange(n, device=valid.device)[None, :]
    return (valid[..., None, :] & (cols <= rows)) | (cols == rows)


def validate_budget(method: str, num_sink_tokens: int, **budget: int) -> None:
    """Refuse negative sizes and a budget that cannot hold its sinks, naming the option to change."""
    if not isinstance(num_sink_tokens, int) or num_sink_tokens < 0:
        raise ValueError(f"hfx {method}: num_sink_tokens must be an int >= 0, got {num_sink_tokens!r}")
    for name, value in budget.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"hfx {method}: {name} must be an int >= 0, got {value!r}")


def validate_positions(method: str, positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"hfx {method}: positions must be one of {POSITIONS}, got {positions!r}")


# ----------------------------------------------------------------------------------------------------------------
# cache layers
# ----------------------------------------------------------------------------------------------------------------


class PolicyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose slots are chosen by a policy (subclasses: :meth:`priority`, :meth:`target`).

    ``keys``/``values``: (B, H_kv, N, D); keys pre-RoPE, or rotated once attended with ``positions="original"``.
    ``pos``/``valid``/``scores``: (B, Hp, N). ``cumulative``: tokens seen (what ``get_seq_length`` reports, so
    ``generate`` computes positions and slices inputs as with a dense cache). ``history`` (when ``record=True``): the
    (original positions, validity) of the slots each step attended.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    needs_scores = False
    per_head = False  # whether each KV head keeps its own slots

    def __init__(self, *, budget: int, num_sink_tokens: int, positions: str, record: bool = False):
        super().__init__()
        self.budget = budget
        self.num_sink_tokens = num_sink_tokens
        self.positions = positions
        self.history: list[tuple[Tensor, Tensor]] | None = [] if record else None
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.pos = self.valid = self.scores = None
        self.cumulative = 0
        self.is_initialized = False
        self.incoming_valid: Tensor | None = None  # (B, q) validity of the next update's tokens

    # -- policy --------------------------------------------------------------------------------------------------

    def min_kept(self) -> int:
        """Slots never evicted to make room for a long chunk (the sinks, and H2O's heavy hitters)."""
        return self.num_sink_tokens

    def target(self, q_len: int) -> int:
        """How many stored slots may stay before ``q_len`` new tokens are appended."""
        return max(self.budget - q_len, self.min_kept())

    def priority(self, q_len: int) -> Tensor:
        """(B, Hp, N) keep priority of the stored slots: +inf = must keep, -inf = evict first."""
        raise NotImplementedError

    # -- DynamicLayer API ------------------------------------------------------------------------------------------

    def stored(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def kept_before(self, q_len: int) -> int:
        return min(self.stored(), self.target(q_len))

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor | None = None) -> None:
        b, h, _, _ = key_states.shape
        hp = h if self.per_head else 1
        device = key_states.device
        self.device, self.dtype = device, key_states.dtype
        self.keys = key_states.new_zeros((b, h, 0, key_states.shape[-1]))
        value_states = key_states if value_states is None else value_states
        self.values = value_states.new_zeros((b, h, 0, value_states.shape[-1]))
        self.pos = torch.zeros((b, hp, 0), dtype=torch.long, device=device)
        self.valid = torch.zeros((b, hp, 0), dtype=torch.bool, device=device)
        score_dtype = torch.float64 if key_states.dtype == torch.float64 else torch.float32
        self.scores = torch.zeros((b, hp, 0), dtype=score_dtype, device=device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Evict down to :meth:`target`, append the new tokens, return kept + new (B, H_kv, n_kept + q, D)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q_len = key_states.shape[-2]
        self._evict(self.kept_before(q_len), q_len)
        b, hp = self.valid.shape[:2]
        valid = self.incoming_valid
        self.incoming_valid = None
        if valid is None:
            valid = torch.ones((b, q_len), dtype=torch.bool, device=self.valid.device)
        if valid.shape != (b, q_len):
            raise ValueError(f"hfx policy cache: the padding mask of the new tokens has shape {tuple(valid.shape)}, "
                             f"expected {(b, q_len)}")
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        # original positions of the new slots are filled in by the attention function (it gets position_ids)
        self.pos = torch.cat([self.pos, self.pos.new_full((b, hp, q_len), -1)], dim=-1)
        self.valid = torch.cat([self.valid, valid.to(self.valid.device)[:, None].expand(b, hp, q_len)], dim=-1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros((b, hp, q_len))], dim=-1)
        self.cumulative += q_len
        return self.keys, self.values

    def _evict(self, count: int, q_len: int) -> None:
        n = self.stored()
        if count >= n:
            return
        idx = keep_indices(self.priority(q_len), count)  # (B, Hp, count)
        self.pos, self.valid, self.scores = (t.gather(-1, idx) for t in (self.pos, self.valid, self.scores))
        b, h, _, d = self.keys.shape
        kv_idx = idx.expand(b, h, count)[..., None]
        self.keys = self.keys.gather(2, kv_idx.expand(b, h, count, d))
        self.values = self.values.gather(2, kv_idx.expand(b, h, count, self.values.shape[-1]))

    def get_mask_sizes(self, query) -> tuple[int, int]:
        """(kv length after the coming update, kv offset); ``query``: see :func:`hfx._compat.mask_query_length`."""
        q_len = mask_query_length(query)
        kept = self.kept_before(q_len)
        return kept + q_len, self.cumulative - kept

    def get_seq_length(self, *args) -> int:
        return self.cumulative

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, *args) -> None:
        raise NotImplementedError("an hfx policy cache evicts tokens and cannot be cropped (assisted/speculative "
                                  "decoding); generate without an assistant model")

    def _map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "pos", "valid", "scores"):
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # -- read by the attention function ----------------------------------------------------------------------------

    def layout(self, position_ids: Tensor | None, q_len: int) -> tuple[Tensor, Tensor, Tensor]:
        """Record the new tokens' original positions; return the rotary positions of the queries (B, Hp, q) and of
        the keys (B, Hp, N), and the keep mask (B, Hp, q, N) for this step."""
        b, _, n = self.valid.shape
        if position_ids is None:
            position_ids = torch.arange(self.cumulative - q_len, self.cumulative, device=self.pos.device)[None]
        self.pos[..., n - q_len:] = position_ids.to(self.pos.device).expand(b, q_len)[:, None]
        k_pos = slot_positions(self.valid) if self.positions == "cache" else self.pos
        if self.history is not None:
            self.history.append((self.pos.clone(), self.valid.clone()))
        return k_pos[..., n - q_len:], k_pos, slot_keep_mask(self.valid, q_len)

    def observe(self, mass: Tensor) -> None:
        """Add this step's softmax mass per key (B, H_kv, N) to the scores of the slots just returned."""
        self.scores += mass.to(self.scores.dtype)


class PolicyCache(Cache):
    """A ``Cache`` of :class:`PolicyLayer`\\ s built for one model patched by :func:`install`. Its ``update`` points
    each attention module's handle at the layer it updates, so the attention function always reads the cache in use
    (spec A4 "(a)"), even when several caches exist for the model."""

    method = "policy"

    def __init__(self, model: nn.Module, build_layer: Callable[[], PolicyLayer]):
        modules = attention_modules(model)
        if not all(hasattr(m, _HANDLE) for m in modules):
            raise ValueError(f"{type(self).__name__} needs a model prepared with "
                             f"hfx.attention.apply(model, {self.method!r}, ...) (rotary bypass + attention function)")
        super().__init__(layers=[build_layer() for _ in modules])
        self._modules = [weakref.ref(m) for m in modules]

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        module = self._modules[layer_idx]()
        if module is not None:
            object.__setattr__(module, _HANDLE, weakref.ref(self.layers[layer_idx]))
        return keys, values

    def begin_forward(self, attention_mask: Tensor | None, q_len: int) -> None:
        """Tell every layer which of the next ``q_len`` tokens are padding (from the 2D mask over past + new)."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"hfx {self.method}: a {attention_mask.dim()}D attention mask cannot be used with the "
                             "policy cache; pass the usual 2D padding mask")
        valid = None if attention_mask is None else attention_mask[:, -q_len:].bool()
        for layer in self.layers:
            layer.incoming_valid = valid


# ----------------------------------------------------------------------------------------------------------------
# the attention function
# ----------------------------------------------------------------------------------------------------------------


def active_layer(module: nn.Module, key: Tensor) -> PolicyLayer | None:
    """The policy layer whose ``update`` returned ``key`` (None when no hfx cache is in use)."""
    ref = getattr(module, _HANDLE, None)
    layer = ref() if ref is not None else None
    return layer if layer is not None and layer.keys is key else None


def rope_at(module: nn.Module, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin of the model's rotary embedding at ``positions`` (B, Hp, T): shape (B, Hp, T, D)."""
    b, hp, t = positions.shape
    cos, sin = rope_cos_sin(module, x, positions.reshape(b * hp, t))
    return cos.reshape(b, hp, t, -1), sin.reshape(b, hp, t, -1)


def to_query_heads(x: Tensor, groups: int) -> Tensor:
    """(B, Hp, ...) per-KV-head tensor -> broadcastable to (B, H, ...)."""
    return x if x.shape[1] == 1 else repeat_kv(x, groups)


def sdpa_gqa(query: Tensor, key: Tensor, value: Tensor, keep: Tensor, scaling: float, dropout: float = 0.0) -> Tensor:
    """SDPA with the KV heads shared by their query groups (no repeated copy of the cache: ``enable_gqa``, torch >=
    2.5; older torch repeats the KV heads)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    groups = query.shape[1] // key.shape[1]
    try:
        return sdpa(query, key, value, attn_mask=keep, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1)
    except TypeError:  # torch < 2.5
        return sdpa(query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=keep, dropout_p=dropout,
                    scale=scaling)


def attend_with_mass(query: Tensor, key: Tensor, value: Tensor, keep: Tensor, scaling: float, groups: int,
                     dropout: float = 0.0) -> tuple[Tensor, Tensor]:
    """Softmax attention (B, H, q, D) on a boolean keep mask broadcastable to (B, H, q, N), plus each key's softmax
    mass summed over the query rows and the group's query heads (B, H_kv, N). A prefill uses the ``attn_colsum``
    kernel for the mass (no q x N matrix kept); a decode step computes P explicitly, one KV head's query group at a
    time as a single matmul (query heads h = kv_head * groups + j, as ``repeat_kv`` orders them)."""
    b, h, q_len, d = query.shape
    if q_len > 1:
        from hfx_kernels.attn_colsum import attn_colsum

        return sdpa_gqa(query, key, value, keep, scaling, dropout), attn_colsum(query, key, keep, scale=scaling)
    hkv, n = key.shape[1], key.shape[2]
    grouped = query.reshape(b, hkv, groups * q_len, d)
    keep = keep.expand(b, h, q_len, n).reshape(b, hkv, groups * q_len, n)
    scores = (grouped @ key.transpose(-1, -2)) * scaling
    probs = scores.masked_fill(~keep, -math.inf).softmax(-1, dtype=torch.float32 if query.dtype != torch.float64
                                                         else torch.float64)
    mass = probs.sum(2)
    probs = torch.nn.functional.dropout(probs.to(query.dtype), p=dropout, training=dropout > 0)
    return (probs @ value).reshape(b, h, q_len, value.shape[-1]), mass


def rotated_keys(module: nn.Module, layer: PolicyLayer, key: Tensor, k_pos: Tensor, q_len: int) -> Tensor:
    """The layer's keys rotated at ``k_pos``. With ``positions="cache"`` slots move as tokens are evicted, so every
    kept key is rotated again at each step. With ``positions="original"`` a key's position never changes: only the
    ``q_len`` new keys are rotated, written back into the cache in place, so the cache holds rotated keys and a
    decode step costs no per-key rotary work (gathers on eviction keep them rotated)."""
    if layer.positions == "cache" or key.requires_grad:
        cos, sin = rope_at(module, key, k_pos)
        return apply_rope(key, cos, sin)
    new = key[..., key.shape[2] - q_len:, :]
    cos, sin = rope_at(module, new, k_pos[..., key.shape[2] - q_len:])
    new.copy_(apply_rope(new, cos, sin))
    return key


def policy_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     *, scaling: float | None = None, dropout: float = 0.0, method: str = "policy", **kwargs):
    """The attention function of sinks and H2O (registered as ``hfx_sinks``/``hfx_h2o``). Keys and queries arrive
    un-rotated (rotary bypass); with an hfx policy cache the layout comes from the cache layer, without one (a plain
    forward, e.g. training) it is ordinary causal attention at ``position_ids``."""
    check_attention_kwargs(method, kwargs)
    if torch.compiler.is_compiling():
        raise RuntimeError(f"hfx {method} evicts with data-dependent top-k/gather: it runs eagerly only; "
                           "do not torch.compile the model")
    scaling = module.scaling if scaling is None else scaling
    position_ids = kwargs.get("position_ids")
    groups = module.num_key_value_groups
    q_len = query.shape[2]
    layer = active_layer(module, key)
    if layer is None:
        if key.shape[2] != q_len:
            raise RuntimeError(f"hfx {method}: the keys come from a cache that is not an hfx policy cache; pass no "
                               f"cache (one is built) or hfx_attention.{method}'s cache object")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if position_ids is None:
            position_ids = torch.arange(q_len, device=query.device)[None]
        cos, sin = rope_cos_sin(module, query, position_ids)
        return sdpa_attention_forward(module, apply_rope(query, cos, sin), apply_rope(key, cos, sin), value,
                                      attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    q_pos, k_pos, keep = layer.layout(position_ids, q_len)
    key = rotated_keys(module, layer, key, k_pos, q_len)
    q_cos, q_sin = rope_at(module, query, q_pos)
    query = apply_rope(query, to_query_heads(q_cos, groups), to_query_heads(q_sin, groups))
    keep = to_query_heads(keep, groups)
    if layer.needs_scores:
        out, mass = attend_with_mass(query, key, value, keep, scaling, groups, dropout)
        layer.observe(mass)
    else:
        out = sdpa_gqa(query, key, value, keep, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------------------------------------------
# the model patch
# ----------------------------------------------------------------------------------------------------------------


def _refuse_compiled(model: nn.Module, method: str) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or torch.compiler.is_compiling():
        raise ValueError(f"hfx {method} evicts with data-dependent top-k/gather and runs eagerly only: apply it to "
                         "the model before (and instead of) torch.compile")


def install(model: nn.Module, method: str, key: str, build_cache: Callable[[], PolicyCache]) -> nn.Module:
    """Prepare ``model`` for a policy cache, reversibly: rotary bypass, the attention function ``key``, a handle
    attribute on every attention module, and per-instance ``forward``/``generate`` that build ``build_cache()``
    when no cache is passed (and refuse other caches, static caches and compilation)."""
    check_supported(model, method)
    _refuse_compiled(model, method)
    clash = [m for m in applied(model) if m in POLICY_METHODS]
    if clash:
        raise ValueError(f"hfx {method}: the model already has hfx {clash[0]} applied; "
                         "hfx.attention.revert(model) first")
    bypass_rotary(model)
    for module in attention_modules(model):
        set_module_attribute(model, module, _HANDLE, None)
    set_attention(model, key)

    forward = model.forward
    signature = inspect.signature(forward)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(forward)
    def hfx_forward(*args, **kwargs):
        _refuse_compiled(model, method)
        bound = dict(signature.bind_partial(*args, **kwargs).arguments)
        bound.update(bound.pop(var_kw, None) or {})
        cache = passed_cache(bound)
        if cache is None:
            use_cache = bound.get("use_cache")
            if use_cache is None:
                use_cache = getattr(model.config, "use_cache", True) and not model.training
            if use_cache:
                cache = build_cache()
                kwargs["past_key_values" if "past_key_values" in kwargs else cache_argument()] = cache
        if cache is not None:
            if not isinstance(cache, PolicyCache):
                raise TypeError(f"hfx {method} needs its own cache (hfx_attention.{method}), got "
                                f"{type(cache).__name__}; pass no cache and one is built")
            ids = bound.get("input_ids")
            ids = bound.get("inputs_embeds") if ids is None else ids
            cache.begin_forward(bound.get("attention_mask"), ids.shape[1])
        return forward(*args, **kwargs)

    generate = model.generate

    @functools.wraps(generate)
    def hfx_generate(*args, **kwargs):
        _refuse_compiled(model, method)
        config = kwargs.get("generation_config") or model.generation_config
        implementation = kwargs.get("cache_implementation") or getattr(config, "cache_implementation", None)
        if implementation is not None:
            raise ValueError(f"hfx {method} brings its own cache; cache_implementation={implementation!r} "
                             "(static/quantized/offloaded caches) cannot be combined with it")
        if passed_cache(kwargs) is None and kwargs.get("use_cache", True) is not False:
            kwargs[cache_argument()] = build_cache()
        return generate(*args, **kwargs)

    # shadow the class's methods on this instance only (revert removes the shadows)
    set_module_attribute(model, model, "forward", hfx_forward)
    set_module_attribute(model, model, "generate", hfx_generate)
    return model
