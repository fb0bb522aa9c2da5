"""GRAPE: Group Representational Position Encoding (Zhang et al., arXiv 2512.07805; spec C3, C4) as grafts on a
pretrained RoPE model, with the RoPE, Position Interpolation, ALiBi and FoX presets.

Multiplicative GRAPE (GRAPE-M) moves q and k by G(n) = exp(n L) with L a sum of rank-2 skew generators; the exact
relative law <G(n)q, G(m)k> = <q, G(m-n)k> holds for any one-parameter subgroup. On the canonical planes of HF's
``rotate_half`` layout (e_j, e_{j+D/2}) with the log-uniform spectrum this *is* RoPE, so every variant below starts
from the model's own RoPE:

- ``"rope"``: the model's rotary itself, rotated inside the attention function (bit-identical to stock);
- ``"pi"``: Position Interpolation, the spectrum divided by ``factor`` (= HF ``rope_type="linear"``);
- ``"learned"``: learned frequencies ω_j = ω0_j exp(δ_j / log_freq_scale), δ = 0 at init (= RoPE exactly);
  ``basis=True`` adds a learned orthogonal change of planes P = exp(A - Aᵀ), A = 0 at init;
- ``"contextual"``: Type-I, a per-token phase increment ω_t from the layer input, phase Φ_t = Σ_{τ<t} ω_τ
  (exclusive cumsum) replacing the position; initialised at ω ≡ 1, i.e. RoPE.

Additive GRAPE (GRAPE-A) adds a relative bias b(i, j) to the logits, realised exactly by *appending dimensions* to q
and k so stock SDPA serves it (the row-constant part drops out of the softmax). On top of the model's RoPE by default
(``rope=False`` removes it, the papers' from-scratch form):

- ``"alibi"``: b = -s_h m_h (i - j), geometric slopes m_h; appended q: s_h m_h / scaling, k: j;
- ``"fox"``: Forgetting Transformer, b = s_h Σ_{l=j+1..i} log f_l, f_l = σ(w_fᵀ x_l + b_f) per KV head; key-only
  bias -s_h C_j with C = cumsum log f; appended q: s_h / scaling, k: -C_j;
- ``"keygated"``: b = -(i - j) s_h m_h softplus(uᵀ k_j / √D); appended q: (-ω_h i, ω_h) / scaling, k: (g_j, j g_j).

The per-head strengths s_h start at ``scale_init=0.0``: the graft is then exactly the base model (FoX's log f cannot
be exactly 0 at a finite, trainable gate bias, so FoX's exactness comes from s_h, not from b_f; b_f starts at
``fox_bias_init=5`` (f ≈ 0.993) so the gates still get gradients once s_h moves). ``scale_init=1.0`` gives the full
ALiBi / FoX / key-gated strength of the papers.

Keys are cached *before* rotation (rotary bypass) and without their appended dims; the attention function keeps, per
layer, what each cached key needs (its position, contextual phase or FoX cumulative sum), appends the new tokens'
values at every call and trims them as the cache does (a sliding window drops keys from the front, assisted decoding's
crop from the back), so decoding with a cache equals a full forward. It also keeps a few components of every cached
key, to follow the rows that beam search reorders in the cache.

The appended values are shifted by those of the call's last key (a per-row constant of the logits, so the softmax
does not change): near the diagonal they stay small, where bf16 would round an absolute position or a long FoX sum
(3001 -> 3008). In one long call (prefill, training) rows far from its last token keep that rounding.

    >>> import hfx
    >>> hfx.attention.apply(model, "grape", variant="learned")              # doctest: +SKIP
    >>> hfx.attention.apply(model, "grape", variant="pi", factor=4.0)       # doctest: +SKIP
    >>> hfx.attention.apply(model, "grape", variant="fox", scale_init=0.0)  # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hfx.attention import on_revert

from ._core import (
    attention_modules,
    check_attention_kwargs,
    check_supported,
    register,
    set_attention,
)
from .rotary import apply_rope, bypass_rotary, rope_cos_sin, rotate_half

KEY = "hfx_grape"
MULTIPLICATIVE = ("rope", "pi", "learned", "contextual")
ADDITIVE = ("alibi", "fox", "keygated")
VARIANTS = MULTIPLICATIVE + ADDITIVE
_STATE = "_hfx_grape_state"  # per-key values of the keys in the cache
_INPUT = "_hfx_grape_input"  # the layer input of the current call (FoX, contextual)
_SIGNATURE_DIMS = 4  # key components kept per cached key to recognise its cache row after a beam reorder

# --------------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------------


def rodrigues(x: Tensor, a: Tensor, b: Tensor, theta: Tensor) -> Tensor:
    """exp(θ L) x for the rank-2 generator L = a bᵀ - b aᵀ (any a, b, not only orthonormal), in O(d).

    With σ² = |a|²|b|² - (a·b)² (L² = -σ² on the plane of a, b): exp(θL) = I + sin(θσ)/σ L + (1 - cos(θσ))/σ² L².
    ``x`` (..., d), ``a``/``b`` (d,) or broadcastable, ``theta`` broadcastable to x's leading dims.

    >>> e = torch.eye(4, dtype=torch.float64)
    >>> rodrigues(e[0], e[2], e[0], torch.tensor(math.pi / 2)).round(decimals=6) + 0   # (x1, x2) -> (-x2, x1); + 0: no -0.
    tensor([0., 0., 1., 0.], dtype=torch.float64)
    """
    theta = torch.as_tensor(theta, dtype=x.dtype, device=x.device)[..., None]
    aa, bb, ab = (a * a).sum(-1, keepdim=True), (b * b).sum(-1, keepdim=True), (a * b).sum(-1, keepdim=True)
    sigma = (aa * bb - ab * ab).clamp(min=0).sqrt()
    ax, bx = (a * x).sum(-1, keepdim=True), (b * x).sum(-1, keepdim=True)
    lx = a * bx - b * ax  # L x
    l2x = a * (ab * bx - bb * ax) - b * (aa * bx - ab * ax)  # L² x = a (b·Lx) - b (a·Lx)
    angle = theta * sigma
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    c1 = torch.where(sigma > 0, torch.sin(angle) / safe, theta)  # sin(θσ)/σ -> θ as σ -> 0
    c2 = torch.where(sigma > 0, (1 - torch.cos(angle)) / safe**2, theta**2 / 2)
    return x + c1 * lx + c2 * l2x


def rotate_planes(x: Tensor, theta: Tensor) -> Tensor:
    """The commuting product of rotations by ``theta[..., j]`` in the canonical planes (e_j, e_{j+D/2}) with HF's
    sign (L_j = e_{j+D/2} e_jᵀ - e_j e_{j+D/2}ᵀ): Rodrigues per plane, x + sin θ L x + (1 - cos θ) L² x, which on
    these planes is x cos θ + rotate_half(x) sin θ. ``x`` (..., D), ``theta`` (..., D/2) broadcastable.

    >>> rotate_planes(torch.tensor([1.0, 0.0]), torch.tensor([math.pi / 2])).round() + 0   # + 0: no -0.
    tensor([0., 1.])
    """
    theta = torch.cat((theta, theta), dim=-1)
    return x * torch.cos(theta) + rotate_half(x) * torch.sin(theta)


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's geometric head slopes 2^(-8h/n) for h = 1..n; for n not a power of two, those of the closest lower
    power of two followed by every other slope of twice that power (the ALiBi paper's extension).

    >>> alibi_slopes(4)
    [0.25, 0.0625, 0.015625, 0.00390625]
    """

    def power_of_2(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return power_of_2(n_heads)
    low = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(low) + alibi_slopes(2 * low)[0::2][: n_heads - low]


def exclusive_cumsum(x: Tensor, dim: int = -1) -> Tensor:
    """Σ_{τ<t} x_τ along ``dim`` (0 at t = 0)."""
    return torch.cumsum(x, dim) - x


def relative_to_last(values: Tensor) -> Tensor:
    """Per-key values (..., Tk) minus the last key's, in their own (high) precision. The shift is a per-row constant
    of the logits (detached: its gradient through the softmax is zero)."""
    return values - values[..., -1:].detach()


def append_dims(query: Tensor, key: Tensor, q_extra: Tensor, k_extra: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate the extra dims to q (B, H, Tq, D) and k (B, Hkv, Tk, D), zero-padded together to a multiple of 8
    (what fused SDPA kernels like); zeros add nothing to q·k."""
    width = query.shape[-1] + q_extra.shape[-1]
    pad = -width % 8
    q_parts, k_parts = [query, q_extra.to(query.dtype)], [key, k_extra.to(key.dtype)]
    if pad:
        q_parts.append(query.new_zeros(*query.shape[:-1], pad))
        k_parts.append(key.new_zeros(*key.shape[:-1], pad))
    return torch.cat(q_parts, -1), torch.cat(k_parts, -1)


# --------------------------------------------------------------------------------------------------
# Parameters on each attention module
# --------------------------------------------------------------------------------------------------


class GrapeParameters(nn.Module):
    """The new parameters of one layer, registered as ``self_attn.grape`` (seen by the optimizer and state_dict)."""

    def __init__(self, variant: str, attn: nn.Module, hidden_size: int, opts: dict):
        super().__init__()
        self.variant = variant
        self.opts = opts
        heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
        dim = attn.head_dim
        weight = next(attn.parameters())
        like = dict(device=weight.device, dtype=weight.dtype)
        self.register_buffer("inv_freq0", attn.hfx_rotary.inv_freq.detach().clone(), persistent=False)
        self.attention_scaling = float(getattr(attn.hfx_rotary, "attention_scaling", 1.0))
        if variant in ("learned", "contextual"):
            rows = kv_heads if opts["per_head"] else 1
            self.log_freq_delta = nn.Parameter(torch.zeros(rows, dim // 2, **like))
            if opts["basis"]:
                self.basis_generator = nn.Parameter(torch.zeros(rows, dim, dim, **like))
        if variant == "contextual":
            self.omega_proj = nn.Linear(hidden_size, kv_heads if opts["per_head"] else 1, **like)
            nn.init.zeros_(self.omega_proj.weight)
            nn.init.constant_(self.omega_proj.bias, opts["omega_bias"])
        if variant in ADDITIVE:
            self.register_buffer("slopes", torch.tensor(alibi_slopes(heads), device=weight.device,
                                                        dtype=torch.float32), persistent=False)
            self.scale = nn.Parameter(torch.full((heads,), float(opts["scale_init"]), **like))
        if variant == "fox":
            self.forget_gate = nn.Linear(hidden_size, kv_heads, **like)
            nn.init.zeros_(self.forget_gate.weight)
            nn.init.constant_(self.forget_gate.bias, opts["fox_bias_init"])
        if variant == "keygated":
            u = torch.randn(kv_heads, dim, generator=torch.Generator().manual_seed(opts["seed"] + attn.layer_idx))
            self.gate_u = nn.Parameter((u / math.sqrt(dim)).to(**like))

    def frequencies(self) -> Tensor:
        """(1 | H_kv, D/2) angular frequencies in float32 (float64 for a float64 model)."""
        dtype = torch.promote_types(self.inv_freq0.dtype, torch.float32)
        freq = self.inv_freq0.to(dtype)[None]
        if self.variant == "pi":
            return freq / self.opts["factor"]
        if hasattr(self, "log_freq_delta"):  # ω0 exp(δ / scale): exactly ω0 at δ = 0
            return freq * torch.exp(self.log_freq_delta.to(dtype) / self.opts["log_freq_scale"])
        return freq

    def basis(self) -> Tensor | None:
        """Orthogonal P = exp(A - Aᵀ) per row of heads (identity at A = 0), or None. Without autograd (generation)
        the matrix exponential is kept until A changes in place (its version counter: optimizer steps,
        ``load_state_dict``; an edit through ``.data`` bypasses it), not redone per layer per decoded token."""
        if not hasattr(self, "basis_generator"):
            return None
        a = self.basis_generator
        if torch.is_grad_enabled() and a.requires_grad:
            return torch.linalg.matrix_exp(a - a.transpose(-1, -2))
        version = (a._version, a.data_ptr(), a.dtype, a.device)
        cached = self.__dict__.get("_basis_cache")
        if cached is None or cached[0] != version:
            with torch.no_grad():
                cached = self.__dict__["_basis_cache"] = (version, torch.linalg.matrix_exp(a - a.transpose(-1, -2)))
        return cached[1]

    def omega(self, x: Tensor) -> Tensor:
        """Contextual phase increment per token: (B, T, 1 | H_kv)."""
        z = self.omega_proj(x)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if self.opts["gate"] == "sigmoid":  # official code: σ(z / scale), here times omega_max
            return self.opts["omega_max"] * torch.sigmoid(z / self.opts["omega_scale"])
        return F.softplus(z)  # the official comment's form


# --------------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------------


def _positions(kwargs: dict, b: int, tq: int, tk: int, device) -> Tensor:
    pos = kwargs.get("position_ids")
    if pos is None:  # transformers always passes them to these families; keep a sane fallback
        pos = torch.arange(tk - tq, tk, device=device)[None]
    return pos.expand(b, tq)


def key_signature(key: Tensor) -> Tensor:
    """A few components of every key (B, Hkv, T, D), as (B, Hkv, c, T): exact copies, so a cache row that beam search
    moved (``index_select``) still matches its stored signature bit for bit, at a small fraction of the keys' size."""
    return key[..., :_SIGNATURE_DIMS].transpose(-1, -2).detach().clone()


def matching_rows(old: Tensor, new: Tensor) -> Tensor | None:
    """For each row of ``new`` (B1, ...), the index of a row of ``old`` (B0, ...) equal to it, or None if some row
    has none. Sorting both together (``torch.unique``) groups equal rows exactly; among equal old rows any will do."""
    both = torch.cat((old, new)).flatten(1)
    _, group = torch.unique(both, dim=0, return_inverse=True)
    owner = torch.full((both.shape[0],), -1, dtype=torch.long, device=both.device)
    owner[group[: old.shape[0]]] = torch.arange(old.shape[0], device=both.device)
    rows = owner[group[old.shape[0]:]]
    return None if bool((rows < 0).any()) else rows


def _cached_state(module: nn.Module, key: Tensor, tq: int, window: int | None) -> dict[str, Tensor] | None:
    """The stored per-key values (last dim = key axis) of the keys still in the cache, their rows matched to the
    cache's rows now: between calls beam search reorders, selects and repeats cache rows, which the cache does to
    its keys but not to this state. The rows are matched by the keys' signatures. Of the keys seen, a rolled sliding
    window (it keeps ``window - 1``) holds the last ones, a crop (assisted decoding) the first ones. None for a call
    that brings all its keys."""
    n = key.shape[2] - tq
    if n == 0:
        return None
    old = module.__dict__.get(_STATE)
    if old is not None and old["sig"].shape[-1] >= n:
        start = old["sig"].shape[-1] - n if window is not None and n >= window - 1 else 0
        kept = {name: value[..., start: start + n] for name, value in old.items()}
        cached = key[:, :, :n, :_SIGNATURE_DIMS].transpose(-1, -2)
        if torch.equal(kept["sig"], cached):
            return kept
        rows = matching_rows(kept["sig"], cached) if kept["sig"].shape[1:] == cached.shape[1:] else None
        if rows is not None:
            return {name: value.index_select(0, rows) for name, value in kept.items()}
    raise RuntimeError(
        "GRAPE keeps, per layer, the position/phase of every cached key, and this cache holds keys it did not see (a "
        "cache filled before hfx.attention.apply or shared between models): start a new cache (generate() does) "
        "after applying GRAPE"
    )


def _track(module: nn.Module, key: Tensor, old: dict[str, Tensor] | None, new: dict[str, Tensor]) -> dict[str, Tensor]:
    """The per-key values of every key of this call: the new tokens' values appended to the cached ones (``old``,
    from :func:`_cached_state`). Stored detached (the cache's own keys carry the graph), with the keys' signatures."""
    state = dict(new) if old is None else {k: torch.cat((old[k], v), -1) for k, v in new.items()}
    module.__dict__[_STATE] = {**{k: v.detach() for k, v in state.items()}, "sig": key_signature(key)}
    return state


def _rotate(x: Tensor, theta: Tensor, basis: Tensor | None, scaling: float) -> Tensor:
    """Rotate (B, H, T, D) by per-plane angles ``theta`` (B, H|1, T, D/2) in the planes of ``basis`` (H|1, D, D)."""
    if basis is not None:
        x = x @ basis  # Pᵀ x on row vectors
    y = rotate_planes(x.to(theta.dtype), theta) if theta.dtype != x.dtype else rotate_planes(x, theta)
    if scaling != 1.0:
        y = y * scaling
    if basis is not None:
        y = y @ basis.transpose(-1, -2).to(y.dtype)
    return y.to(x.dtype)


def grape_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """The ``hfx_grape`` attention function: GRAPE-M rotation and/or GRAPE-A appended dims, then SDPA.

    Needs ``hfx.attention.apply(model, "grape", variant=...)`` (the rotary bypass and the layer's parameters)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    check_attention_kwargs("grape", kwargs)
    params = getattr(module, "grape", None)
    if not isinstance(params, GrapeParameters):
        raise RuntimeError('hfx_grape needs its parameters and the rotary bypass: use hfx.attention.apply(model, '
                           '"grape", variant=...) instead of attn_implementation="hfx_grape"')
    variant, opts = params.variant, params.opts
    b, _, tq, _ = query.shape
    tk = key.shape[2]
    groups = query.shape[1] // key.shape[1]
    scaling = module.scaling if scaling is None else scaling
    pos = _positions(kwargs, b, tq, tk, query.device)
    old = _cached_state(module, key, tq, kwargs.get("sliding_window"))
    x = module.__dict__.pop(_INPUT, None)
    new = {"pos": pos.to(torch.float64)}
    if variant == "contextual":
        omega = params.omega(x).transpose(1, 2)  # (B, 1|Hkv, Tq)
        start = old["total"][..., -1:] if old is not None else 0.0
        new["phi"] = start + exclusive_cumsum(omega)
        new["total"] = start + torch.cumsum(omega, -1)
    if variant == "fox":
        z = params.forget_gate(x)
        logf = F.logsigmoid(z.to(torch.promote_types(z.dtype, torch.float32))).transpose(1, 2)  # (B, Hkv, Tq)
        start = old["fox"][..., -1:] if old is not None else 0.0
        new["fox"] = start + torch.cumsum(logf, -1)
    state = _track(module, key, old, new)

    # multiplicative part (or the model's own RoPE under an additive variant)
    if variant == "rope" or (variant in ADDITIVE and opts["rope"]):
        q_cos, q_sin = rope_cos_sin(module, query, pos)
        k_cos, k_sin = rope_cos_sin(module, key, state["pos"].to(pos.dtype))
        q_rot, k_rot = apply_rope(query, q_cos, q_sin), apply_rope(key, k_cos, k_sin)
    elif variant in MULTIPLICATIVE:
        freq = params.frequencies()  # (1|Hkv, D/2)
        k_phase = state["phi"] if variant == "contextual" else state["pos"].to(freq.dtype)[:, None]
        q_phase = k_phase[..., -tq:]
        k_theta = k_phase.to(freq.dtype)[..., None] * freq[None, :, None]  # (B, 1|Hkv, Tk, D/2)
        q_theta = q_phase.to(freq.dtype)[..., None] * freq[None, :, None]
        if q_theta.shape[1] > 1:
            q_theta = q_theta.repeat_interleave(groups, dim=1)
        basis = params.basis()
        q_basis = basis.repeat_interleave(groups, 0) if basis is not None and basis.shape[0] > 1 else basis
        q_rot = _rotate(query, q_theta, q_basis, params.attention_scaling)
        k_rot = _rotate(key, k_theta, basis, params.attention_scaling)
    else:
        q_rot, k_rot = query, key

    # additive part: appended dims so that scaling * (q_extra . k_extra) = b(i, j) + a per-row constant, with positions
    # and FoX sums taken relative to the call's last key (small near the diagonal: see the module docstring)
    if variant in ADDITIVE:
        cdt = torch.promote_types(query.dtype, torch.float32)
        slope = (params.scale.to(cdt) * params.slopes.to(cdt))[None, :, None, None]  # (1, H, 1, 1)
        kpos = relative_to_last(state["pos"]).to(cdt)[:, None, :]  # (B, 1, Tk): j - j_last
        if variant == "alibi":
            q_extra = slope.expand(b, -1, tq, 1) / scaling
            k_extra = kpos[..., None].expand(b, key.shape[1], tk, 1)
        elif variant == "fox":
            q_extra = params.scale.to(cdt)[None, :, None, None].expand(b, -1, tq, 1) / scaling
            k_extra = -relative_to_last(state["fox"]).to(cdt)[..., None]
        else:  # keygated: gates from the un-rotated keys; -(i - j) = -(i - j_last) + (j - j_last), no row constant
            gate = F.softplus((key.to(cdt) * params.gate_u.to(cdt)[None, :, None]).sum(-1) / math.sqrt(key.shape[-1]))
            k_extra = torch.stack((gate, kpos * gate), -1)
            qpos = (pos - state["pos"][:, -1:].detach()).to(cdt)[:, None, :, None]
            q_extra = torch.cat((-slope * qpos, slope.expand(b, -1, tq, 1)), -1) / scaling
        q_rot, k_rot = append_dims(q_rot, k_rot, q_extra, k_extra)
    return sdpa_attention_forward(module, q_rot, k_rot, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


register(KEY, grape_attention)

# --------------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------------


def _capture_input(module, args, kwargs):
    x = kwargs.get("hidden_states", args[0] if args else None)
    module.__dict__[_INPUT] = x


def apply(model: nn.Module, variant: str = "rope", *, factor: float | None = None, log_freq_scale: float = 16.0,
          per_head: bool = False, basis: bool = False, gate: str = "sigmoid", omega_scale: float = 16.0,
          init: str = "rope", rope: bool = True, scale_init: float = 0.0, fox_bias_init: float = 5.0,
          seed: int = 0) -> nn.Module:
    """Graft GRAPE onto ``model`` (Llama, Qwen2, Qwen3, Mistral), reversibly (``hfx.attention.revert``).

    - ``variant``: ``"rope"`` | ``"pi"`` | ``"learned"`` | ``"contextual"`` | ``"alibi"`` | ``"fox"`` | ``"keygated"``.
    - ``factor`` (pi, required): the Position Interpolation scale s (angles θ_j m / s).
    - ``log_freq_scale=16`` (learned, contextual): ω_j = ω0_j exp(δ_j / scale), the official code's learning-rate
      trick; ``per_head=False``: one spectrum (and contextual gate) shared by all heads, else one per KV head;
      ``basis=False`` (learned): also learn an orthogonal change of planes (commuting subspaces).
    - contextual: ``gate="sigmoid"`` (official code: ω = omega_max σ(z / omega_scale), ``omega_scale=16``) or
      ``"softplus"`` (the official comment: ω = softplus(z)); ``init="rope"`` starts at ω ≡ 1 (sigmoid: omega_max = 2,
      z = 0, exactly RoPE; softplus: z = softplus⁻¹(1), RoPE to rounding) or ``"official"`` (omega_max = 1,
      z = softplus⁻¹(1e-3): the from-scratch init, which changes a pretrained model).
    - additive: ``rope=True`` keeps the model's RoPE; ``scale_init=0`` starts exactly at the base model (1: the papers'
      full strength); ``fox_bias_init=5`` (FoX gate bias, f ≈ 0.993); ``seed`` for the key-gate directions u.

    >>> hfx.attention.apply(model, "grape", variant="contextual")   # doctest: +SKIP
    """
    check_supported(model, "grape")
    if variant not in VARIANTS:
        raise ValueError(f"GRAPE variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant == "pi" and not (isinstance(factor, (int, float)) and factor > 0):
        raise ValueError(f'variant="pi" needs factor=s > 0 (the context extension ratio), got {factor!r}')
    if variant != "pi" and factor is not None:
        raise ValueError(f'factor is the Position Interpolation scale: use it with variant="pi", not {variant!r}')
    if basis and variant != "learned":
        raise ValueError('basis=True (learned commuting subspaces) goes with variant="learned"')
    if gate not in ("sigmoid", "softplus") or init not in ("rope", "official"):
        raise ValueError(f'contextual gate must be "sigmoid" or "softplus" and init "rope" or "official"; '
                         f"got gate={gate!r}, init={init!r}")
    if log_freq_scale <= 0 or omega_scale <= 0:
        raise ValueError("log_freq_scale and omega_scale must be > 0")
    modules = attention_modules(model)
    if any(hasattr(m, "grape") for m in modules):
        raise ValueError("GRAPE is already applied to this model: hfx.attention.revert(model) first")
    if variant == "contextual":
        target = 1.0 if init == "rope" else 1e-3
        omega_max = 2.0 if gate == "sigmoid" and init == "rope" else 1.0
        omega_bias = 0.0 if gate == "sigmoid" and init == "rope" else math.log(math.expm1(target))
    else:
        omega_max = omega_bias = None
    opts = dict(factor=factor, log_freq_scale=float(log_freq_scale), per_head=per_head, basis=basis, gate=gate,
                omega_scale=float(omega_scale), omega_max=omega_max, omega_bias=omega_bias, rope=rope,
                scale_init=scale_init, fox_bias_init=float(fox_bias_init), seed=seed)
    bypass_rotary(model)
    hidden = model.config.hidden_size
    for module in modules:
        params = GrapeParameters(variant, module, hidden, opts)
        module.add_module("grape", params)
        on_revert(model, lambda m=module: (delattr(m, "grape"), m.__dict__.pop(_STATE, None)))
        if variant in ("contextual", "fox"):
            handle = module.register_forward_pre_hook(_capture_input, with_kwargs=True)
            on_revert(model, handle.remove)
    set_attention(model, KEY)
    return model
