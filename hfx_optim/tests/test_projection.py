"""GaLore projector math (hfx_optim.projection): randomized SVD against an independent numpy Halko reference and
against the exact SVD on exactly low-rank input, seeding, projection sides and shapes, canonical signs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hfx_optim.projection import (
    PROJ_TYPES,
    canonical_signs,
    compute_projectors,
    exact_svd,
    gaussian_sketch,
    project,
    project_back,
    projection_sides,
    randomized_svd,
    sketch_seed,
)

# --------------------------------------------------------------------------------------------------
# Independent references (numpy, float64)
# --------------------------------------------------------------------------------------------------


def closed_form_sketch(n: int, k: int) -> np.ndarray:
    """The spec's deterministic sketch (§11): Omega(a, b) = sin(1.37 * a * (b + 1) + 0.11)."""
    a, b = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    return np.sin(1.37 * a * (b + 1) + 0.11)


def reference_rsvd(a: np.ndarray, rank: int, omega: np.ndarray, power_iters: int):
    """Halko, Martinsson, Tropp (2011) Alg. 4.4 (subspace iteration) + Alg. 5.1 (direct SVD), in numpy."""
    q, _ = np.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    ub, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vt[:rank]


def low_rank(m: int, n: int, r: int, seed: int = 0, decay: float = 0.5) -> torch.Tensor:
    """An exactly rank-r float64 matrix with distinct singular values 1, decay, decay^2, ..."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(r, dtype=torch.float64)
    return (u * s) @ v.T


def spectrum_matrix(m: int, n: int, decay: float, seed: int = 0) -> torch.Tensor:
    """A full-rank float64 matrix with singular values decay^i."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (u * decay ** torch.arange(k, dtype=torch.float64)) @ v.T


def splitmix64(state: int) -> int:
    """First output of Vigna's SplitMix64 in ``state`` (textbook C code, in Python)."""
    mask = (1 << 64) - 1
    z = (state + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def max_principal_angle_sin(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin of the largest principal angle between the column spaces of orthonormal a and b."""
    cos = torch.linalg.svdvals(a.T @ b)
    return float(torch.sqrt(torch.clamp(1 - cos.min() ** 2, min=0)))


# --------------------------------------------------------------------------------------------------
# Randomized SVD
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("power_iters", "oversample"), [(0, 0), (1, 2), (2, 8)])
@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])
def test_rsvd_is_exact_on_exactly_low_rank_input(shape, power_iters, oversample):
    a = low_rank(*shape, r=5)
    u, s, vh = randomized_svd(a, 5, oversample=oversample, power_iters=power_iters, seed=3)
    ue, se, vhe = exact_svd(a, 5)
    assert torch.linalg.norm(u @ u.T - ue @ ue.T) < 1e-12  # the same left subspace
    assert torch.linalg.norm(vh.T @ vh - vhe.T @ vhe) < 1e-12
    torch.testing.assert_close(s, se, rtol=1e-12, atol=1e-14)
    recon = (u * s) @ vh
    assert torch.linalg.norm(recon - a) / torch.linalg.norm(a) < 1e-12
    assert torch.linalg.norm(u.T @ u - torch.eye(5, dtype=a.dtype)) < 1e-12


@pytest.mark.parametrize("power_iters", [0, 1, 2])
def test_rsvd_matches_numpy_halko_reference_with_a_given_sketch(power_iters):
    a = spectrum_matrix(14, 10, decay=0.7)
    rank, k = 3, 5
    omega = closed_form_sketch(10, k)
    u, s, vh = randomized_svd(a, rank, oversample=k - rank, power_iters=power_iters, sketch=torch.from_numpy(omega))
    ur, sr, vtr = reference_rsvd(a.numpy(), rank, omega, power_iters)
    np.testing.assert_allclose(s.numpy(), sr, rtol=1e-12)
    np.testing.assert_allclose((u @ u.T).numpy(), ur @ ur.T, atol=1e-12)  # sign-free comparison
    np.testing.assert_allclose((vh.T @ vh).numpy(), vtr.T @ vtr, atol=1e-12)
    exact = exact_svd(a, rank)[1]
    assert (s <= exact * (1 + 1e-12)).all()  # a sketch never overestimates the singular values


def test_power_iterations_improve_the_subspace_on_a_decaying_spectrum():
    a = spectrum_matrix(80, 60, decay=0.9)
    exact_u = exact_svd(a, 6)[0]
    errors = [max_principal_angle_sin(randomized_svd(a, 6, oversample=2, power_iters=q, seed=0)[0], exact_u)
              for q in (0, 1, 2)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5 * errors[0]


def test_same_seed_is_bit_identical_and_seeds_differ():
    a = spectrum_matrix(30, 20, decay=0.9).float()
    first = randomized_svd(a, 4, oversample=2, power_iters=1, seed=11)
    again = randomized_svd(a, 4, oversample=2, power_iters=1, seed=11)
    other = randomized_svd(a, 4, oversample=2, power_iters=1, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[1], other[1])
    for proj_type in PROJ_TYPES:
        p1 = compute_projectors(a, 4, proj_type, oversample=2, power_iters=1, seed=5)
        p2 = compute_projectors(a, 4, proj_type, oversample=2, power_iters=1, seed=5)
        assert all(x is y is None or torch.equal(x, y) for x, y in zip(p1, p2))


def test_gaussian_sketch_is_device_and_dtype_independent():
    s64 = gaussian_sketch(7, 3, 42, dtype=torch.float64)
    s32 = gaussian_sketch(7, 3, 42, dtype=torch.float32)
    expected = torch.randn(7, 3, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    assert torch.equal(s64, expected)  # the documented draw: CPU generator, float64, then cast
    assert torch.equal(s32, expected.float())


def test_sketch_seed_is_chained_splitmix64():
    assert splitmix64(1234567) == 6457827717110365317  # SplitMix64's published first output for seed 1234567
    assert sketch_seed(1234567, 0) == 6457827717110365317 >> 1
    assert sketch_seed(5, 2, 7) == splitmix64(splitmix64(5 + 2) + 7) >> 1
    seeds = {sketch_seed(0, i, k) for i in range(20) for k in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)


# --------------------------------------------------------------------------------------------------
# Projectors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("proj_type", "tall", "wide"), [
    ("std", (False, True), (True, False)),          # the shorter side: right for m >= n, left for m < n
    ("reverse_std", (True, False), (False, True)),
    ("left", (True, False), (True, False)),
    ("right", (False, True), (False, True)),
    ("full", (True, True), (True, True)),
])
def test_projection_sides(proj_type, tall, wide):
    assert projection_sides(proj_type, (6, 4)) == tall
    assert projection_sides(proj_type, (4, 6)) == wide
    assert projection_sides(proj_type, (5, 5)) == tall  # square counts as m >= n


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_projectors_are_orthonormal_and_project_as_documented(shape, proj_type, method):
    m, n = shape
    g = spectrum_matrix(m, n, decay=0.8)
    left, right = compute_projectors(g, 3, proj_type, method=method, seed=1)
    want_left, want_right = projection_sides(proj_type, shape)
    assert (left is not None, right is not None) == (want_left, want_right)
    eye = torch.eye(3, dtype=torch.float64)
    low = g.numpy()
    if left is not None:
        assert left.shape == (m, 3) and torch.allclose(left.T @ left, eye, atol=1e-12)
        low = left.numpy().T @ low
    if right is not None:
        assert right.shape == (3, n) and torch.allclose(right @ right.T, eye, atol=1e-12)
        low = low @ right.numpy().T
    r = project(g, left, right)
    np.testing.assert_allclose(r.numpy(), low, atol=1e-12)
    back = r.numpy()
    if left is not None:
        back = left.numpy() @ back
    if right is not None:
        back = back @ right.numpy()
    np.testing.assert_allclose(project_back(r, left, right).numpy(), back, atol=1e-12)


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])
def test_randomized_projectors_equal_exact_ones_on_low_rank_input(shape, proj_type):
    g = low_rank(*shape, r=4)
    exact = compute_projectors(g, 4, proj_type, method="exact")
    rand = compute_projectors(g, 4, proj_type, method="randomized", oversample=0, power_iters=0, seed=9)
    for e, r in zip(exact, rand):
        assert (e is None) == (r is None)
        if e is not None:  # canonical signs make the bases themselves equal, not just their spans
            torch.testing.assert_close(r, e, rtol=0, atol=1e-10)


def test_projectors_match_numpy_svd_with_canonical_signs():
    g = spectrum_matrix(9, 6, decay=0.6)
    u, _, vt = np.linalg.svd(g.numpy(), full_matrices=False)
    u, v = u[:, :2].copy(), vt[:2].T.copy()
    for basis in (u, v):  # each singular vector: largest-magnitude entry positive
        for k in range(2):
            if basis[np.argmax(np.abs(basis[:, k])), k] < 0:
                basis[:, k] *= -1
    left, right = compute_projectors(g, 2, "full", method="exact")
    np.testing.assert_allclose(left.numpy(), u, atol=1e-12)
    np.testing.assert_allclose(right.numpy(), v.T, atol=1e-12)


def test_canonical_signs_makes_the_largest_entry_positive():
    x = torch.tensor([[0.1, -3.0, 0.0], [-2.0, 1.0, 0.0], [1.0, 2.0, 0.0]])
    y = canonical_signs(x)
    assert torch.equal(y, torch.tensor([[-0.1, 3.0, 0.0], [2.0, -1.0, 0.0], [-1.0, -2.0, 0.0]]))


def test_projectors_are_computed_in_float32_for_low_precision_and_returned_in_dtype():
    g = spectrum_matrix(16, 8, decay=0.8)
    ref = compute_projectors(g, 2, "std", method="exact")[1]
    low = compute_projectors(g.bfloat16(), 2, "std", method="exact")[1]
    assert low.dtype == torch.bfloat16
    assert (low.double() - ref).abs().max() < 2e-2  # bf16 input and output, float32 SVD in between


@pytest.mark.parametrize(("call", "message"), [
    (lambda: projection_sides("diag", (3, 3)), r"unknown proj_type 'diag': use one of 'std', 'reverse_std'"),
    (lambda: compute_projectors(torch.ones(3), 1, "std"), r"needs a 2-D gradient"),
    (lambda: compute_projectors(torch.ones(3, 4), 4, "std", seed=0), r"rank must be in \[1, min\(m, n\)\] = \[1, 3\]"),
    (lambda: compute_projectors(torch.ones(3, 4), 1, "std", method="qr"), r"unknown svd method 'qr'"),
    (lambda: randomized_svd(torch.ones(4, 4), 2), r"needs a seed"),
    (lambda: randomized_svd(torch.ones(4, 4), 2, oversample=1, sketch=torch.ones(4, 2)), r"sketch must be 4×3"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
