"""GaLore projector math as pure functions on tensors, shared by :mod:`hfx_optim.galore2` and :mod:`hfx_optim.fira`.

A gradient ``G`` (m×n) is projected to a rank-``r`` subspace by a *left* basis ``L`` (m×r, orthonormal columns: the
top-r left singular vectors of ``G``), a *right* basis ``Rt`` (r×n, orthonormal rows: the top-r right singular
vectors), or both::

    left:  R = L^T G      (r×n)        back: L N
    right: R = G Rt^T     (m×r)        back: N Rt
    full:  R = L^T G Rt^T (r×r)        back: L N Rt

``proj_type`` chooses the side (:func:`projection_sides`): ``std`` projects the shorter side (right when m >= n, as
the official GaLore does), ``reverse_std`` the longer side, ``left``/``right`` always that side, ``full`` both.

The bases come from an exact SVD (:func:`exact_svd`) or from Halko–Martinsson–Tropp randomized SVD
(:func:`randomized_svd`: Gaussian sketch with oversampling, subspace iteration with re-orthonormalisation), which
is what GaLore 2 (arXiv 2504.20437) uses to make the subspace refresh cheap. The sketch is drawn from a CPU
``torch.Generator`` seeded by an integer (:func:`gaussian_sketch`, :func:`sketch_seed`), so optimizer state only
needs to keep ints to make a resumed run bit-identical, and every DDP rank draws the same sketch.

Every basis leaves :func:`compute_projectors` in a canonical sign (each singular vector's largest-magnitude entry is
positive): SVD routines may return either sign, and because GaLore keeps its Adam moments across a refresh the
sign would otherwise change the result from one LAPACK/cuSOLVER build (or from exact to randomized SVD) to another.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "PROJ_TYPES",
    "SVD_METHODS",
    "back_project_update",
    "canonical_signs",
    "compute_projectors",
    "exact_svd",
    "gaussian_sketch",
    "is_row_sharded",
    "low_rank_shape",
    "project",
    "project_back",
    "projection_sides",
    "randomized_svd",
    "sharded_right_basis",
    "sketch_seed",
    "sum_over",
    "svd_dtype",
]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("randomized", "exact")

_MASK64 = (1 << 64) - 1


def projection_sides(proj_type: str, shape: tuple[int, ...] | torch.Size) -> tuple[bool, bool]:
    """``(left, right)``: which bases a matrix of ``shape`` (m, n) is projected with under ``proj_type``.

    ``std`` projects the shorter side (m >= n: right, else left), ``reverse_std`` the longer one (m >= n: left,
    else right), ``left``/``right`` always that side, ``full`` both. The side is fixed by the shape here, never
    guessed later from the low-rank tensor's shape (the official ``reverse_std`` back-projection does that and
    picks the wrong branch when rank >= rows).
    """
    m, n = shape
    if proj_type == "std":
        return (m < n, m >= n)
    if proj_type == "reverse_std":
        return (m >= n, m < n)
    if proj_type == "left":
        return (True, False)
    if proj_type == "right":
        return (False, True)
    if proj_type == "full":
        return (True, True)
    raise ValueError(f"unknown proj_type {proj_type!r}: use one of {', '.join(repr(t) for t in PROJ_TYPES)}")


def low_rank_shape(shape: tuple[int, ...] | torch.Size, rank: int, sides: tuple[bool, bool]) -> tuple[int, int]:
    """Shape of the projected gradient (and of the Adam moments) for a matrix of ``shape`` at ``rank``."""
    m, n = shape
    left, right = sides
    return (rank if left else m, rank if right else n)


def project(grad: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``L^T G``, ``G Rt^T`` or ``L^T G Rt^T`` (whichever bases are given); ``grad`` itself when neither is."""
    out = grad
    if left is not None:
        out = left.mT @ out
    if right is not None:
        out = out @ right.mT
    return out


def project_back(low: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``L N``, ``N Rt`` or ``L N Rt``: the full-size matrix of a low-rank one (``low`` itself without bases)."""
    out = low
    if left is not None:
        out = left @ out
    if right is not None:
        out = out @ right
    return out


def svd_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the subspace is computed in: float64 for float64 input, float32 otherwise (the official GaLore
    runs its SVD in float32, also for bf16/fp16 weights, and casts the basis back)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sketch_seed(seed: int, *streams: int) -> int:
    """A well-mixed 63-bit seed for ``torch.Generator.manual_seed`` from ``seed`` and stream indices (e.g. the
    parameter's index, then the refresh count), so nearby inputs give unrelated generator streams::

        x = seed;  for v in streams: x = splitmix64(x + v);  return x >> 1

    where ``splitmix64(s)`` is the first output of Vigna's SplitMix64 generator in state ``s`` (mod 2**64)."""
    x = seed & _MASK64
    for value in streams:
        x = (x + 0x9E3779B97F4A7C15 + (value & _MASK64)) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def gaussian_sketch(rows: int, cols: int, seed: int, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    """A standard-normal ``rows × cols`` matrix drawn in float64 from a CPU generator seeded with ``seed``, then cast
    to ``dtype`` and moved to ``device``. Drawing on the CPU in one dtype makes the sketch the same on every device,
    rank and parameter dtype; it is ``n × (r + p)`` numbers, small next to the SVD it replaces."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return omega.to(dtype=dtype, device=device)


def exact_svd(a: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``a`` truncated to ``rank``: ``(U[:, :rank], S[:rank], Vh[:rank])``, in ``a``'s dtype."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def randomized_svd(
    a: Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int | None = None,
    sketch: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``rank`` randomized SVD of ``a`` (m×n), Halko, Martinsson & Tropp 2011 (Alg. 4.4 + 5.1)::

        k = min(rank + oversample, m, n)
        Q = qr(A Ω).Q                                 Ω: n×k Gaussian sketch
        repeat power_iters times:  Q = qr(A qr(A^T Q).Q).Q
        B = Q^T A  (k×n);  B = Ub S Vh;  U = Q Ub

    Returns ``(U[:, :rank], S[:rank], Vh[:rank])`` in ``a``'s dtype. Exact (to rounding) when ``a`` has rank
    <= k. The sketch is ``sketch`` (n×k) if given, else :func:`gaussian_sketch` with ``seed``.
    Cost O(m·n·k·(2·power_iters + 2)) against O(m·n·min(m, n)) for :func:`exact_svd`.
    """
    m, n = a.shape
    k = min(rank + oversample, m, n)
    if not 1 <= rank <= k:
        raise ValueError(f"randomized_svd: rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    if sketch is None:
        if seed is None:
            raise ValueError("randomized_svd needs a seed (or an explicit sketch) so the result is reproducible")
        sketch = gaussian_sketch(n, k, seed, dtype=a.dtype, device=a.device)
    elif tuple(sketch.shape) != (n, k):
        raise ValueError(f"randomized_svd: sketch must be {n}×{k} (n × min(rank + oversample, m, n)), "
                         f"got {tuple(sketch.shape)}")
    q = torch.linalg.qr(a @ sketch.to(dtype=a.dtype, device=a.device)).Q
    for _ in range(power_iters):
        # re-orthonormalise after each multiplication: plain (A A^T)^q A Ω loses the small directions to rounding
        z = torch.linalg.qr(a.mT @ q).Q
        q = torch.linalg.qr(a @ z).Q
    ub, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def canonical_signs(basis: Tensor) -> Tensor:
    """``basis`` with each column's sign flipped so that its largest-magnitude entry is positive (first one on ties).
    Singular vectors are defined up to sign; this fixes one."""
    idx = basis.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(basis.gather(0, idx))
    return basis * torch.where(signs == 0, torch.ones_like(signs), signs)


def compute_projectors(
    grad: Tensor,
    rank: int,
    proj_type: str,
    *,
    method: str = "randomized",
    oversample: int = 8,
    power_iters: int = 2,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """The GaLore bases ``(left, right)`` of a 2-D ``grad`` for ``proj_type``: ``left`` is m×r, ``right`` r×n, the
    unused one None. Computed in :func:`svd_dtype` precision with ``method`` "exact" or "randomized" (``seed``
    required), signs made canonical (:func:`canonical_signs`), returned in ``dtype`` (default ``grad.dtype``).

    Randomized: a one-sided projection sketches the side it needs (the right basis is the left singular basis of
    ``grad^T``, which is more accurate than the ``Vh`` of a left sketch); ``full`` takes both from one sketch of
    ``grad``.
    """
    if grad.ndim != 2:
        raise ValueError(f"compute_projectors needs a 2-D gradient, got shape {tuple(grad.shape)}")
    if method not in SVD_METHODS:
        raise ValueError(f"unknown svd method {method!r}: use one of {', '.join(repr(m) for m in SVD_METHODS)}")
    m, n = grad.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}] for a {m}×{n} matrix, got {rank}")
    want_left, want_right = projection_sides(proj_type, grad.shape)
    a = grad.detach().to(svd_dtype(grad.dtype))
    if method == "exact":
        u, _, vh = exact_svd(a, rank)
    elif want_left:
        u, _, vh = randomized_svd(a, rank, oversample=oversample, power_iters=power_iters, seed=seed)
    else:
        v, _, _ = randomized_svd(a.mT, rank, oversample=oversample, power_iters=power_iters, seed=seed)
        u, vh = None, v.mT
    out_dtype = dtype or grad.dtype
    left = canonical_signs(u).to(out_dtype).contiguous() if want_left else None
    right = canonical_signs(vh.mT).mT.to(out_dtype).contiguous() if want_right else None
    return left, right


def is_row_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor sharded by rows on a 1-D mesh (``Shard(0)``: FSDP2's layout), the layout the
    gather-free right projection takes."""
    from torch.distributed.tensor import Shard

    return t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),)


def sum_over(mesh) -> Callable[[Tensor], Tensor]:
    """A function that sums a tensor over the processes of a 1-D device ``mesh`` (in place, returned): what turns a
    row shard's partial sum (e.g. Fira's residual norm squared) into the whole matrix's."""
    import torch.distributed as dist

    def reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t, group=mesh.get_group())
        return t

    return reduce


def sharded_right_basis(grad: Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2, seed: int) -> Tensor:
    """The right GaLore basis (r×n, canonical signs) of a row-sharded DTensor gradient (m×n, ``Shard(0)``), the same
    on every rank: :func:`randomized_svd` of ``grad^T`` step by step, with the same sketch, so it equals
    :func:`compute_projectors` on the whole matrix up to the order of the sums (hfx optimizer spec §3.2, FSDP2
    without gathering the gradient). Only small matrices cross ranks: ``G^T Ω`` and ``G^T Z`` are all-reduced
    (n×k each) and ``G Q`` is gathered (m×k), with k = rank + oversample; G itself never moves."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = grad.device_mesh
    a = grad.detach().to(svd_dtype(grad.dtype))
    m, n = a.shape
    k = min(rank + oversample, m, n)
    rows = lambda t: distribute_tensor(t, mesh, [Shard(0)])  # noqa: E731 - replicated m×k -> row shards (a slice)
    times = lambda q: (a @ DTensor.from_local(q, mesh, [Replicate()], run_check=False)).full_tensor()  # noqa: E731
    q = torch.linalg.qr((a.mT @ rows(gaussian_sketch(m, k, seed, dtype=a.dtype, device=a.device))).full_tensor()).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(times(q)).Q
        q = torch.linalg.qr((a.mT @ rows(z)).full_tensor()).Q
    ub, _, _ = torch.linalg.svd(times(q).mT, full_matrices=False)
    v = (q @ ub)[:, :rank]
    return canonical_signs(v).mT.to(grad.dtype).contiguous()


def back_project_update(p: Tensor, direction: Tensor, left: Tensor | None, right: Tensor | None, *, alpha: float,
                        decay: float, decay_mode: str, extra: Tensor | None = None, beta: float = 1.0,
                        extra_scale: Tensor | None = None) -> None:
    """``p <- p * decay - (alpha * back(direction) + beta * extra * extra_scale)`` (decay ``decay_mode`` the update,
    ``extra_scale`` per row or column, optional) through
    :func:`hfx_kernels.projection.projection_update`: ``back`` is ``L N`` (``a = L``, ``b = N``), ``N Rt``
    (``a = N``, ``b = Rt``) or, two-sided, ``(L N) Rt`` with ``L N`` formed in torch."""
    if left is not None and right is not None:
        a, b = left.to(direction.dtype) @ direction, right
    elif left is not None:
        a, b = left, direction
    else:
        a, b = direction, right
    from hfx_kernels.projection import projection_update  # the epilogue kernel (Triton on CUDA)

    projection_update(p, a, b, alpha=alpha, extra=extra, beta=beta, decay=decay, decay_mode=decay_mode,
                      extra_scale=extra_scale)
