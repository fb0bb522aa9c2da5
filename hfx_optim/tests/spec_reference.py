"""What the GaLore2, Fira and FRUGAL tests share: the spec's inputs (§11), the documented seed contract, the SVD sign
convention and GaLore's projection and subspace schedule for the independent float64 references (numpy; torch only as
the documented random-number generator; no code from hfx_optim), and :func:`run_projected`, which feeds the same
inputs to the implementation. Imported by name: the conftest beside it puts this folder on sys.path."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> int:
    z = (state + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def refresh_seed(seed: int, param_index: int, refresh: int) -> int:
    """Documented contract: state seed = splitmix64(seed + i) >> 1; the k-th draw uses splitmix64(state + k) >> 1."""
    return splitmix64((splitmix64(seed + param_index) >> 1) + refresh) >> 1


def torch_sketch(rows: int, cols: int, seed: int) -> np.ndarray:
    """The documented sketch: float64 normals from a CPU torch.Generator seeded with ``seed``."""
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()


def grid(m, n):
    return np.meshgrid(np.arange(m), np.arange(n), indexing="ij")


def w0(m: int, n: int) -> np.ndarray:
    """Spec §11: W0[i, j] = 0.5 cos(0.9 i - 0.4 j + 0.3); a bias uses j = 0."""
    i, j = grid(m, n)
    return 0.5 * np.cos(0.9 * i - 0.4 * j + 0.3)


def grad_t(m: int, n: int, t: int, amp: float = 1.0) -> np.ndarray:
    """Spec §11: G_t[i, j] = amp (sin(0.7 (i+1)(j+1) + 1.1 t) + 0.3 cos(1.3 i - 0.6 j t))."""
    i, j = grid(m, n)
    return amp * (np.sin(0.7 * (i + 1) * (j + 1) + 1.1 * t) + 0.3 * np.cos(1.3 * i - 0.6 * j * t))


def canon(basis: np.ndarray) -> np.ndarray:
    """Spec §3.1's convention: each column's largest-magnitude entry positive."""
    basis = basis.copy()
    for k in range(basis.shape[1]):
        if basis[np.argmax(np.abs(basis[:, k])), k] < 0:
            basis[:, k] *= -1
    return basis


def sides(proj_type: str, m: int, n: int) -> tuple[bool, bool]:
    """(left, right) per spec §3.1: std projects the shorter side (right when m >= n), reverse_std the longer."""
    return {"std": (m < n, m >= n), "reverse_std": (m >= n, m < n), "left": (True, False),
            "right": (False, True), "full": (True, True)}[proj_type]


def halko(a: np.ndarray, rank: int, omega: np.ndarray, power_iters: int):
    """Randomized SVD (Halko et al.) of ``a`` from the sketch ``omega``: the top-``rank`` (U, V^T)."""
    q, _ = np.linalg.qr(a @ omega)
    for _ in range(power_iters):
        q, _ = np.linalg.qr(a @ np.linalg.qr(a.T @ q)[0])
    ub, _, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :rank], vt[:rank]


def bases(g: np.ndarray, rank: int, proj_type: str, svd: str, oversample: int, power_iters: int, seed: int):
    """``(left m×r or None, right r×n or None)``: the top-``rank`` singular bases of ``g`` on the sides ``proj_type``
    projects, exact or randomized (spec §3.1, §3.2), in the sign convention."""
    m, n = g.shape
    left, right = sides(proj_type, m, n)
    k = min(rank + oversample, m, n)
    if svd == "exact":
        u, _, vt = np.linalg.svd(g, full_matrices=False)
    elif left:  # one sketch of G gives both bases for "full"
        u, vt = halko(g, rank, torch_sketch(n, k, seed), power_iters)
    else:  # right only: the left singular basis of G^T
        v, _ = halko(g.T, rank, torch_sketch(m, k, seed), power_iters)
        u, vt = None, v.T
    return (canon(u[:, :rank]) if left else None), (canon(vt[:rank].T).T if right else None)


def subspace_schedule(o: dict, grads):
    """GaLore's subspace schedule (spec §3.1) for the parameter at index 0 over the gradients G_1, G_2, ...: per step
    ``(g, lb, rb, fresh)``, with the bases recomputed from G every ``update_proj_gap`` steps and ``fresh`` where the
    Adam moments restart (the first refresh, and every refresh with ``moments_on_refresh="reset"``)."""
    lb = rb = None
    for t, g in enumerate(grads, 1):
        due = (t - 1) % o["update_proj_gap"] == 0
        if due:
            lb, rb = bases(g, o["rank"], o["proj_type"], o["svd"], o["oversample"], o["power_iters"],
                           refresh_seed(o["seed"], 0, (t - 1) // o["update_proj_gap"]))
        yield g, lb, rb, due and (t == 1 or o["moments_on_refresh"] == "reset")


def down(g, lb, rb):
    """GaLore's projection R = L^T G, G Rt^T or L^T G Rt^T."""
    out = g if lb is None else lb.T @ g
    return out if rb is None else out @ rb.T


def up(x, lb, rb):
    """GaLore's back-projection L N, N Rt or L N Rt."""
    out = x if lb is None else lb @ x
    return out if rb is None else out @ rb


def rel(x: torch.Tensor, ref: np.ndarray) -> float:
    """Max relative error of ``x`` against ``ref``."""
    return float(np.abs(x.double().numpy() - ref).max() / np.abs(ref).max())


def run_projected(cls, shape, steps: int, options: dict, dtype=torch.float64, amps=None):
    """The implementation on the reference's inputs: ``cls`` over ``layer.weight`` (param index 0, projected by the
    ``rank`` in its group, the official GaLore style; the other options through the constructor) and ``layer.bias``
    (an AdamW group without decay), for ``steps`` steps of G_t (times ``amps[t - 1]``). Returns (W, bias, optimizer)."""
    o = dict(options)
    m, n = shape
    w = nn.Parameter(torch.tensor(w0(m, n), dtype=dtype))
    b = nn.Parameter(torch.tensor(w0(m, 1)[:, 0], dtype=dtype))
    rank = o.pop("rank")
    opt = cls([{"params": [("layer.weight", w)], "rank": rank}, {"params": [("layer.bias", b)], "weight_decay": 0.0}],
              **o)
    for t in range(1, steps + 1):
        amp = 1.0 if amps is None else amps[t - 1]
        w.grad = torch.tensor(grad_t(m, n, t, amp), dtype=dtype)
        b.grad = torch.tensor(grad_t(m, 1, t, amp)[:, 0], dtype=dtype)
        opt.step()
    return w.detach(), b.detach(), opt


def full_rank_gradient(shape, t: int) -> torch.Tensor:
    """A deterministic full-rank gradient for step ``t`` (cos(a i + b) alone has rank 2, which would leave Fira's
    residual at the rounding level, where its limiter compares noise); used by the DTensor/FSDP2 tests."""
    i = torch.arange(int(np.prod(shape)), dtype=torch.float32)
    return (torch.cos(i * (t + 1) + t) + 0.5 * torch.sin(0.37 * (t + 1) * i * i)).reshape(shape)


def check_sharded_steps_like_plain(build, shapes, mesh, steps: int = 5):
    """Seeded parameters of ``shapes``, plain and row-sharded (``Shard(0)`` DTensors on ``mesh``), each set given to
    ``build`` (a list of parameters -> optimizer) and stepped ``steps`` times with :func:`full_rank_gradient`; asserts
    the sharded ones end equal to the plain ones (1e-6) and returns ``(sharded params, sharded optimizer,
    plain optimizer)`` for further checks of the state."""
    from torch.distributed.tensor import Shard, distribute_tensor

    def params():
        gen = torch.Generator().manual_seed(0)
        return [nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]

    plain, sharded = params(), [nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in params()]
    plain_opt, sharded_opt = build(plain), build(sharded)
    for t in range(steps):
        for p, s in zip(plain, sharded):
            g = full_rank_gradient(p.shape, t)
            p.grad, s.grad = g, distribute_tensor(g, mesh, [Shard(0)])
        plain_opt.step()
        sharded_opt.step()
    for p, s in zip(plain, sharded):
        torch.testing.assert_close(s.full_tensor(), p.detach(), rtol=1e-6, atol=1e-6)
    return sharded, sharded_opt, plain_opt, plain
