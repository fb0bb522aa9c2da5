"""FRUGAL: an independent numpy float64 re-derivation of the spec's update (§5.1) for every subspace and every
state-free rule, across subspace refreshes; the exact partition of the gradient; the conformance kit (bit-identical
resume across a refresh); Trainer/TRL integration; input errors. The float64 reference tests run on both kernel paths
(the ``kernel_backend`` fixture: torch, and Triton or its CPU interpreter).

The reference (here and in spec_reference.py) shares no code with hfx_optim: numpy math written from the spec's formulas, its own SVD and sign
convention, its own block schedule, and its own derivation of the random choices from the documented seed contract
(a CPU torch.Generator seeded with chained SplitMix64 values; ``randperm`` for coordinates and random blocks,
float64 normals then QR for random projections). torch is used only as that random-number generator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from spec_reference import canon, check_sharded_steps_like_plain, grad_t, refresh_seed, splitmix64, torch_sketch, w0
from torch import nn

import hfx
from hfx._compat import trainer_has_factory_protocol
from hfx.testing import OptimizerConformance, tiny_model, unwrap_optimizer
from hfx_optim.frugal import FRUGAL, FRUGALFactory, Subspace, split_gradient
from hfx_optim.targets import TARGET_FLAG

# --------------------------------------------------------------------------------------------------
# Independent reference (numpy, float64)
# --------------------------------------------------------------------------------------------------


def block_draw_seed(seed: int, group_index: int, refresh: int) -> int:
    """Documented contract: sketch_seed(seed, group_index, refresh) = splitmix64(splitmix64(seed + g) + r) >> 1."""
    return splitmix64(splitmix64(seed + group_index) + refresh) >> 1


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def choose(kind: str, g: np.ndarray, rho: float, proj_side: str, seed: int) -> dict:
    """A subspace per spec §5.1: {"left"/"right": basis} (projection) or {"mask": bool array} (coordinates)."""
    m, n = g.shape
    if kind in ("svd", "random"):
        left = {"std": m < n, "reverse_std": m >= n, "left": True, "right": False}[proj_side]
        side = m if left else n
        r = round(rho * side)
        if kind == "svd":
            u, _, vt = np.linalg.svd(g)
            basis = u[:, :r] if left else vt[:r].T
            basis = canon(basis)  # the sign convention matters only when moments survive a refresh
        else:
            basis = np.linalg.qr(torch_sketch(side, r, seed))[0]
        return {"left": basis} if left else {"right": basis.T}
    total, k = {"columns": (n, int(rho * n)), "rows": (m, int(rho * m)), "randk": (m * n, int(rho * m * n))}[kind]
    chosen = torch.randperm(total, generator=generator(seed))[:k].numpy()
    mask = np.zeros(total, dtype=bool)
    mask[chosen] = True
    if kind == "columns":
        return {"mask": np.broadcast_to(mask[None, :], (m, n))}
    if kind == "rows":
        return {"mask": np.broadcast_to(mask[:, None], (m, n))}
    return {"mask": mask.reshape(m, n)}


def down(g, sub):
    if "mask" in sub:
        return g[sub["mask"]]
    return sub["left"].T @ g if "left" in sub else g @ sub["right"].T


def up(x, sub, shape):
    if "mask" in sub:
        out = np.zeros(shape)
        out[sub["mask"]] = x
        return out
    return sub["left"] @ x if "left" in sub else x @ sub["right"]


def adam(state, r, *, b1, b2, eps):
    """torch.optim.AdamW's direction (spec §5.1 AdamW_step without lr); updates state's moments and t."""
    state["t"] += 1
    state["m"] = b1 * state["m"] + (1 - b1) * r
    state["v"] = b2 * state["v"] + (1 - b2) * r * r
    t = state["t"]
    return (state["m"] / (1 - b1**t)) / (np.sqrt(state["v"]) / np.sqrt(1 - b2**t) + eps)


def state_free(x, rule):
    return {"sign_sgd": np.sign(x), "sgd": x, "no": np.zeros_like(x)}[rule]


SHAPES = [(5, 4), (4, 6), (4, 3)]  # right-projected (m >= n), left-projected (m < n), and a third for the blocks
BIAS = 3
OPTIONS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, density=0.5, update_gap=2,
               proj_params_lr_scale=0.8, inactive_lr_scale=0.5, inactive_update_rule="sign_sgd", subspace="svd",
               proj_side="std", block_order="descending", reset_statistics=True, seed=0)
STEPS = 5  # subspaces chosen before steps 1, 3 and 5


def reference_frugal(steps: int = STEPS, shapes=SHAPES, **options):
    """Final weights of the split matrices (group 0, param indices 0..) and of a bias (AdamW group, no decay), plus
    the subspace (or block set) used at each step."""
    o = {**OPTIONS, **options}
    lr, (b1, b2), eps, wd = o["lr"], o["betas"], o["eps"], o["weight_decay"]
    lr_full, rho, kind = lr * o["proj_params_lr_scale"], o["density"], o["subspace"]
    lr_free = lr_full * o["inactive_lr_scale"]
    ws = [w0(m, n) for m, n in shapes]
    states = [{} for _ in shapes]
    bias = w0(BIAS, 1)[:, 0]
    bias_state = {"t": 0, "m": 0.0, "v": 0.0}
    active, used = [], []
    for step in range(1, steps + 1):
        refresh = (step - 1) // o["update_gap"]
        due = (step - 1) % o["update_gap"] == 0
        if kind == "block" and due:
            count, k = len(shapes), round(rho * len(shapes))
            if o["block_order"] == "descending":  # walk from the last tensor backwards, cyclically
                active = sorted({count - 1 - (refresh * k + j) % count for j in range(k)})
            else:
                active = sorted(torch.randperm(count, generator=generator(block_draw_seed(o["seed"], 0, refresh)))
                                [:k].tolist())
            states = [{} for _ in shapes]  # every tensor of the group starts afresh
        used.append(list(active) if kind == "block" else [])
        for i, (m, n) in enumerate(shapes):
            g, st = grad_t(m, n, step), states[i]
            if kind != "block" and due:
                st["sub"] = choose(kind, g, rho, o["proj_side"], refresh_seed(o["seed"], i, refresh))
                if o["reset_statistics"] or "m" not in st:
                    low_shape = down(g, st["sub"]).shape
                    st.update(t=0, m=np.zeros(low_shape), v=np.zeros(low_shape))
            ws[i] = ws[i] * (1 - lr * wd)  # decoupled, before the update, unscaled lr
            if kind == "block":
                if i in active:
                    if "m" not in st:
                        st.update(t=0, m=np.zeros((m, n)), v=np.zeros((m, n)))
                    ws[i] = ws[i] - lr_full * adam(st, g, b1=b1, b2=b2, eps=eps)
                else:
                    ws[i] = ws[i] - lr_free * state_free(g, o["inactive_update_rule"])
                continue
            sub = st["sub"]
            used[-1].append(sub)
            r = down(g, sub)
            ws[i] = ws[i] - lr_full * up(adam(st, r, b1=b1, b2=b2, eps=eps), sub, (m, n))
            ws[i] = ws[i] - lr_free * state_free(g - up(r, sub, (m, n)), o["inactive_update_rule"])
        gb = grad_t(BIAS, 1, step)[:, 0]
        bias = bias - lr * adam(bias_state, gb, b1=b1, b2=b2, eps=eps)  # AdamW group: weight decay 0, no scales
    return ws, bias, used


# --------------------------------------------------------------------------------------------------
# The implementation on the same inputs
# --------------------------------------------------------------------------------------------------


def run_frugal(steps: int = STEPS, shapes=SHAPES, dtype=torch.float64, record=False, **options):
    o = {**OPTIONS, **options}
    mats = [nn.Parameter(torch.tensor(w0(m, n), dtype=dtype)) for m, n in shapes]
    bias = nn.Parameter(torch.tensor(w0(BIAS, 1)[:, 0], dtype=dtype))
    names = [f"w{i}" for i in range(len(shapes))]
    hyper = {k: o.pop(k) for k in ("lr", "betas", "eps", "weight_decay")}
    opt = FRUGAL([{"params": list(zip(names, mats, strict=True)), TARGET_FLAG: True, **o},
                  {"params": [("bias", bias)], "weight_decay": 0.0}], **hyper)
    states = []
    for step in range(1, steps + 1):
        for p, (m, n) in zip(mats, shapes, strict=True):
            p.grad = torch.tensor(grad_t(m, n, step), dtype=dtype)
        bias.grad = torch.tensor(grad_t(BIAS, 1, step)[:, 0], dtype=dtype)
        opt.step()
        if record:
            states.append(([{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()}
                            for p in mats], list(opt.param_groups[0].get("block_active", []))))
    return [p.detach().double().numpy() for p in mats], bias.detach().double().numpy(), opt, states


def assert_rel(got, want, tol, what):
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


SUBSPACES = ["svd", "random", "columns", "rows", "randk", "block"]
RULES = ["sign_sgd", "sgd", "no"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("subspace", SUBSPACES)
def test_matches_float64_reference_across_refreshes(subspace, rule, kernel_backend):
    want_ws, want_bias, _ = reference_frugal(subspace=subspace, inactive_update_rule=rule)
    got_ws, got_bias, _, _ = run_frugal(subspace=subspace, inactive_update_rule=rule)
    for i, (got, want) in enumerate(zip(got_ws, want_ws, strict=True)):
        w_init = w0(*SHAPES[i])
        assert_rel(got, want, 1e-10, f"W{i}")
        assert_rel(got - w_init, want - w_init, 1e-10, f"W{i} displacement")  # the update itself, not just W
    assert_rel(got_bias, want_bias, 1e-10, "bias")
    assert_rel(got_bias - w0(BIAS, 1)[:, 0], want_bias - w0(BIAS, 1)[:, 0], 1e-10, "bias displacement")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("subspace", SUBSPACES)
def test_float32_within_kernel_tolerance_of_float64_reference(subspace, rule):
    want_ws, want_bias, _ = reference_frugal(subspace=subspace, inactive_update_rule=rule)
    got_ws, got_bias, _, _ = run_frugal(subspace=subspace, inactive_update_rule=rule, dtype=torch.float32)
    for i, (got, want) in enumerate(zip(got_ws, want_ws, strict=True)):
        assert_rel(got, want, 1e-6, f"W{i}")
    assert_rel(got_bias, want_bias, 1e-6, "bias")


@pytest.mark.parametrize(("subspace", "options"), [
    ("svd", {"reset_statistics": False}),  # moments carried into the new basis (needs the sign convention)
    ("columns", {"reset_statistics": False}),
    ("svd", {"proj_side": "reverse_std", "density": 0.25}),
    ("random", {"proj_side": "left", "seed": 7}),
    ("svd", {"proj_params_lr_scale": 1.0, "inactive_lr_scale": 0.1, "weight_decay": 0.0}),
    ("block", {"block_order": "random", "seed": 3}),
    ("block", {"density": 1.0}),
    ("randk", {"density": 0.2, "update_gap": 3}),
    ("block", {"proj_params_lr_scale": 0.0}),  # no update on the split group, only its decay (unscaled lr)
])
def test_matches_reference_with_options(subspace, options):
    want_ws, want_bias, _ = reference_frugal(subspace=subspace, **options)
    got_ws, got_bias, _, _ = run_frugal(subspace=subspace, **options)
    for i, (got, want) in enumerate(zip(got_ws, want_ws, strict=True)):
        assert_rel(got - w0(*SHAPES[i]), want - w0(*SHAPES[i]), 1e-10, f"W{i} displacement")
    assert_rel(got_bias, want_bias, 1e-10, "bias")


def test_randomized_svd_equals_exact_when_the_sketch_covers_the_matrix():
    # k = min(rank + oversample, m, n) = min(m, n): the sketch spans the whole range, so rSVD is exact
    want_ws, _, _ = reference_frugal(subspace="svd")
    got_ws, _, _, _ = run_frugal(subspace="svd", svd="randomized", oversample=8, power_iters=1)
    for i, (got, want) in enumerate(zip(got_ws, want_ws, strict=True)):
        assert_rel(got - w0(*SHAPES[i]), want - w0(*SHAPES[i]), 1e-9, f"W{i} displacement")


def test_spec_block_schedule_descending(kernel_backend):
    # spec §11 frugal_ref.py: [4x3, 3x5], rho 0.5, T 2, descending -> active [B], [B], then [A] at step 3
    shapes = [(4, 3), (3, 5)]
    _, _, used = reference_frugal(steps=3, shapes=shapes, subspace="block", lr=1e-3)
    assert used == [[1], [1], [0]]
    got_ws, _, _, states = run_frugal(steps=3, shapes=shapes, subspace="block", lr=1e-3, record=True)
    assert [active for _, active in states] == [[1], [1], [0]]
    want_ws, _, _ = reference_frugal(steps=3, shapes=shapes, subspace="block", lr=1e-3)
    for got, want in zip(got_ws, want_ws, strict=True):
        assert_rel(got, want, 1e-10, "W")


def test_block_state_lives_only_on_active_tensors():
    _, _, opt, states = run_frugal(subspace="block", record=True)
    # 3 tensors, round(0.5 * 3) = 2 active; descending, cyclic: {2, 1}, {0, 2}, {1, 0}
    assert [active for _, active in states] == [[1, 2], [1, 2], [0, 2], [0, 2], [0, 1]]
    for per_param, active in states:
        for i, st in enumerate(per_param):
            assert bool(st) == (i in active), (i, active, st.keys())
    # a tensor active across a refresh (index 2 at step 3) restarts from zero moments: its step counts anew
    assert states[2][0][2]["step"] == 1 and states[1][0][2]["step"] == 2
    group = opt.param_groups[0]
    assert (group["block_steps"], group["block_refreshes"]) == (5, 3)


@pytest.mark.parametrize("subspace", ["svd", "random", "columns", "rows", "randk"])
def test_subspace_state_and_schedule(subspace):
    _, _, _, states = run_frugal(subspace=subspace, record=True)
    key = {"svd": None, "random": None}.get(subspace, "coord_index")
    changed = []
    for i, (m, n) in enumerate(SHAPES):
        per_step = [per_param[i] for per_param, _ in states]
        assert [st["refreshes"] for st in per_step] == [1, 1, 2, 2, 3]
        assert [st["adam_step"] for st in per_step] == [1, 2, 1, 2, 1]  # reset_statistics restarts the correction
        assert [st["step"] for st in per_step] == [1, 2, 3, 4, 5]
        if key is None:
            key_i = "proj_left" if m < n else "proj_right"  # std: the shorter side
            basis = per_step[0][key_i]
            r = round(0.5 * min(m, n))
            assert basis.shape == ((m, r) if m < n else (r, n))
            gram = basis.mT @ basis if m < n else basis @ basis.mT
            torch.testing.assert_close(gram, torch.eye(r, dtype=gram.dtype), rtol=0, atol=1e-12)
        else:
            key_i = key
            idx = per_step[0][key_i]
            total, k = {"columns": (n, n // 2), "rows": (m, m // 2), "randk": (m * n, m * n // 2)}[subspace]
            assert idx.dtype == torch.int64 and len(idx) == k and len(set(idx.tolist())) == k
            assert bool((idx[1:] > idx[:-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < total
        assert torch.equal(per_step[0][key_i], per_step[1][key_i])  # fixed between refreshes
        changed.append(not torch.equal(per_step[1][key_i], per_step[2][key_i]))
    # chosen again at the refresh: a new gradient's SVD or a new random draw (two small random coordinate sets may
    # coincide by chance, so for those one change among the matrices is asked)
    assert all(changed) if subspace in ("svd", "random") else any(changed)


@pytest.mark.parametrize("subspace", ["random", "columns", "randk", "block"])
def test_random_choices_ignore_the_global_rng_and_follow_seed(subspace):
    extra = {"block_order": "random"} if subspace == "block" else {}
    results = []
    for global_seed, seed in ((0, 0), (123, 0), (0, 5)):
        torch.manual_seed(global_seed)
        ws, _, _, _ = run_frugal(subspace=subspace, seed=seed, density=0.34, **extra)
        results.append(ws)
    assert all(np.array_equal(a, b) for a, b in zip(results[0], results[1], strict=True))  # global RNG: no effect
    assert not all(np.array_equal(a, b) for a, b in zip(results[0], results[2], strict=True))  # seed: an effect


def test_complete_svd_basis_has_no_state_free_noise():
    # density 1 with svd: the basis spans the whole side, G - P P^T G is zero, and sign() must not turn its
    # rounding noise into +-lr steps: the result equals the run without a state-free update
    a, _, _, _ = run_frugal(subspace="svd", density=1.0, inactive_update_rule="sign_sgd")
    b, _, _, _ = run_frugal(subspace="svd", density=1.0, inactive_update_rule="no")
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("subspace", ["block", "columns", "rows", "randk"])
def test_density_one_without_refresh_is_torch_adamw(subspace):
    # every coordinate state-full and no refresh after the first: FRUGAL is AdamW (torch.optim.AdamW's formula)
    got, got_bias, _, _ = run_frugal(subspace=subspace, density=1.0, update_gap=100, proj_params_lr_scale=1.0)
    mats = [nn.Parameter(torch.tensor(w0(m, n))) for m, n in SHAPES]
    bias = nn.Parameter(torch.tensor(w0(BIAS, 1)[:, 0]))
    opt = torch.optim.AdamW([{"params": mats}, {"params": [bias], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.1, foreach=False)
    for step in range(1, STEPS + 1):
        for p, (m, n) in zip(mats, SHAPES, strict=True):
            p.grad = torch.tensor(grad_t(m, n, step))
        bias.grad = torch.tensor(grad_t(BIAS, 1, step)[:, 0])
        opt.step()
    for a, p in zip(got, mats, strict=True):
        assert_rel(a, p.detach().numpy(), 1e-12, "W")
    assert_rel(got_bias, bias.detach().numpy(), 1e-12, "bias")


def test_coordinates_survive_a_bfloat16_checkpoint():
    # torch's load_state_dict casts state tensors to the parameter's dtype; indices above 256 are not bf16 numbers
    from hfx.testing import check_weights_only_roundtrip

    def make():
        w = nn.Parameter(torch.ones(4, 600, dtype=torch.bfloat16))
        return w, FRUGAL([{"params": [("w", w)], TARGET_FLAG: True}], subspace="columns", density=0.5, lr=1e-2)

    w, opt = make()
    w.grad = torch.tensor(grad_t(4, 600, 1), dtype=torch.bfloat16)
    opt.step()
    index = opt.state[w]["coord_index"]
    assert opt.state[w]["exp_avg"].dtype == torch.bfloat16 and int(index.max()) > 256
    w2, resumed = make()
    resumed.load_state_dict(check_weights_only_roundtrip(opt.state_dict()))
    assert resumed.state[w2]["coord_index"].dtype == torch.int64 and torch.equal(resumed.state[w2]["coord_index"], index)


# --------------------------------------------------------------------------------------------------
# The split partitions the gradient
# --------------------------------------------------------------------------------------------------


def subspace_from_state(subspace, st):
    if subspace in ("svd", "random"):
        return Subspace(left=st.get("proj_left"), right=st.get("proj_right"))
    return Subspace(index=st["coord_index"], dim={"columns": 1, "rows": 0, "randk": None}[subspace])


@pytest.mark.parametrize("subspace", ["svd", "random", "columns", "rows", "randk"])
def test_split_partitions_the_gradient(subspace):
    _, _, opt, _ = run_frugal(steps=1, subspace=subspace)
    for i, (m, n) in enumerate(SHAPES):
        st = opt.state[opt.param_groups[0]["params"][i]]
        sub = subspace_from_state(subspace, st)
        g = torch.tensor(grad_t(m, n, 7))  # any gradient, not the one the subspace came from
        full, rest = split_gradient(g, sub)
        if subspace in ("svd", "random"):
            torch.testing.assert_close(full + rest, g, rtol=0, atol=1e-14)
            basis = st.get("proj_left")
            if basis is not None:  # full lies in span(L); rest is orthogonal to it
                torch.testing.assert_close(basis @ (basis.mT @ full), full, rtol=0, atol=1e-14)
                torch.testing.assert_close(basis.mT @ rest, torch.zeros(basis.shape[1], n, dtype=g.dtype),
                                           rtol=0, atol=1e-14)
            else:
                basis = st["proj_right"]
                torch.testing.assert_close((full @ basis.mT) @ basis, full, rtol=0, atol=1e-14)
                torch.testing.assert_close(rest @ basis.mT, torch.zeros(m, basis.shape[0], dtype=g.dtype),
                                           rtol=0, atol=1e-14)
        else:
            assert torch.equal(full + rest, g)  # bit-exact: each entry is in exactly one part
            mask = torch.zeros(m * n if subspace == "randk" else (m, n), dtype=torch.bool)
            idx = st["coord_index"]
            if subspace == "columns":
                mask[:, idx] = True
            elif subspace == "rows":
                mask[idx, :] = True
            else:
                mask[idx] = True
            mask = mask.reshape(m, n)
            assert torch.equal(full, torch.where(mask, g, 0.0)) and torch.equal(rest, torch.where(mask, 0.0, g))


def test_split_of_blocks():
    g = torch.tensor(grad_t(4, 3, 1))
    full, rest = split_gradient(g, Subspace())  # active block: everything state-full
    assert torch.equal(full, g) and not rest.any()
    full, rest = split_gradient(g, None)  # inactive block: everything state-free
    assert not full.any() and torch.equal(rest, g)


# --------------------------------------------------------------------------------------------------
# Conformance kit (TinyMLP through the factory: fc1/fc2 weights split, biases AdamW, T = 2 so the resume test
# crosses a refresh)
# --------------------------------------------------------------------------------------------------


class _FRUGALConformance(OptimizerConformance):
    options: dict = {}

    def make_optimizer(self, model):
        return FRUGALFactory()(model, lr=1e-2, density=0.5, update_gap=2, **self.options)


class TestConformanceBlock(_FRUGALConformance):
    options = {}


class TestConformanceBlockRandomSGD(_FRUGALConformance):
    options = {"block_order": "random", "inactive_update_rule": "sgd", "weight_decay": 0.01}


class TestConformanceSVD(_FRUGALConformance):
    options = {"subspace": "svd", "weight_decay": 0.01}


class TestConformanceRandomizedSVD(_FRUGALConformance):
    options = {"subspace": "svd", "svd": "randomized", "oversample": 1, "power_iters": 1}


class TestConformanceRandom(_FRUGALConformance):
    options = {"subspace": "random", "inactive_update_rule": "sgd"}


class TestConformanceColumns(_FRUGALConformance):
    options = {"subspace": "columns", "reset_statistics": False}


class TestConformanceRows(_FRUGALConformance):
    options = {"subspace": "rows"}


class TestConformanceRandK(_FRUGALConformance):
    options = {"subspace": "randk"}


# --------------------------------------------------------------------------------------------------
# Registry, facade, factory, Trainer and TRL
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
def test_registered_and_resolved_through_the_facade(registered):
    registered("frugal", FRUGAL, ("FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable "
                                  "Training", "2411.07837"), factory=FRUGALFactory)
    cls, kwargs = hfx.optimizer("frugal", density=0.25, subspace="svd")
    assert cls is FRUGALFactory and kwargs == {"density": 0.25, "subspace": "svd"}


def test_factory_groups_and_forwarded_hyperparameters():
    model = tiny_model("qwen2")
    opt = FRUGALFactory()(model, target_modules=["q_proj", "down_proj"], density=0.25, subspace="columns", lr=0.02,
                          betas=(0.8, 0.9), eps=1e-7, weight_decay=0.01, inactive_lr_scale=0.1)
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert q[TARGET_FLAG] and q["density"] == 0.25 and q["subspace"] == "columns" and q["weight_decay"] == 0.01
    assert (q["betas"], q["eps"], q["lr"], q["inactive_lr_scale"]) == ((0.8, 0.9), 1e-7, 0.02, 0.1)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_proj.bias"):
        assert not by_name[name][TARGET_FLAG], name
    assert by_name["model.norm.weight"]["weight_decay"] == 0.0  # HF's no-decay group kept


@pytest.mark.floor
def test_sft_trainer_with_hfx_optimizer_frugal(registry, sft_trainer, train_all, tmp_path):
    trainer = sft_trainer(tmp_path, hfx_optimizer="frugal", learning_rate=1e-2, weight_decay=0.01, adam_beta1=0.8,
                          hfx_optimizer_args={"density": 0.25, "subspace": "svd", "update_gap": 1})
    opt = train_all(trainer)
    assert type(opt) is FRUGAL and trainer.state.global_step == 2
    targets = [g for g in opt.param_groups if g[TARGET_FLAG]]
    assert targets and all(g["density"] == 0.25 and g["weight_decay"] == 0.01 for g in targets)
    assert all(g["betas"] == (0.8, 0.999) for g in opt.param_groups)  # forwarded from TrainingArguments
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01, 0.0}  # HF's decay split kept
    params = dict(trainer.model.named_parameters())
    q = opt.state[params["model.layers.0.self_attn.q_proj.weight"]]  # 32x32: std -> right, rank round(0.25*32)=8
    assert q["refreshes"] == 2 and q["proj_right"].shape == (8, 32) and q["exp_avg"].shape == (32, 8)
    emb = opt.state[params["model.embed_tokens.weight"]]
    assert tuple(emb["exp_avg"].shape) == tuple(params["model.embed_tokens.weight"].shape)


@pytest.mark.floor
def test_sft_trainer_with_default_block_frugal(registry, sft_trainer, train_all, tmp_path):
    trainer = sft_trainer(tmp_path, hfx_optimizer="frugal", learning_rate=1e-2)
    opt = train_all(trainer)
    assert type(opt) is FRUGAL and trainer.state.global_step == 2
    (group,) = [g for g in opt.param_groups if g[TARGET_FLAG]]
    count = len(group["params"])  # 2 layers x 7 Linear weights; round(0.25 * 14) = 4 active, the last ones
    assert group["block_active"] == list(range(count - 4, count)) and group["block_steps"] == 2


def trainer_run(sft_trainer, output_dir, resume_from=None):
    trainer = sft_trainer(output_dir, max_steps=4, learning_rate=1e-2, save_strategy="steps", save_steps=2,
                          lr_scheduler_type="constant", hfx_optimizer="frugal",
                          hfx_optimizer_args={"subspace": "randk", "density": 0.25, "update_gap": 2})
    trainer.train(resume_from_checkpoint=resume_from)
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, unwrap_optimizer(trainer.optimizer)


@pytest.mark.floor
def test_trainer_resume_across_a_refresh_is_bit_identical(registry, sft_trainer, tmp_path):
    # checkpoint after step 2; the resumed run draws new coordinates before step 3 from the seeds in optimizer.pt
    straight, _ = trainer_run(sft_trainer, tmp_path / "straight")
    resumed, opt = trainer_run(sft_trainer, tmp_path / "resumed",
                               resume_from=str(tmp_path / "straight" / "checkpoint-2"))
    states = [st for st in opt.state.values() if "coord_index" in st]
    assert states and all(st["refreshes"] == 2 and st["coord_index"].dtype == torch.int64 for st in states)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


@pytest.mark.skipif(not trainer_has_factory_protocol(),
                    reason="a plain transformers < 5 Trainer has no factory protocol; hfx.extend(Trainer) has")
def test_sft_trainer_with_optimizer_cls_and_kwargs(registry, sft_trainer, train_all, tmp_path):
    factory = hfx.optimizer("frugal", density=0.25, subspace="random", lr=1e-2)
    trainer = sft_trainer(tmp_path, extend_config=False, extend_trainer=False,
                          trainer_kwargs={"optimizer_cls_and_kwargs": factory})
    assert type(train_all(trainer)) is FRUGAL and trainer.state.global_step == 2


# --------------------------------------------------------------------------------------------------
# Bad input names the parameter and the fix; nothing falls back silently
# --------------------------------------------------------------------------------------------------


def named_group(**options):
    options = {"subspace": "columns", "density": 0.5, **options}
    return [{"params": [("layer.weight", nn.Parameter(torch.ones(8, 4)))], TARGET_FLAG: True, **options}]


@pytest.mark.parametrize(("options", "message"), [
    ({"subspace": "galore"}, r"unknown subspace 'galore' \(param group of 'layer\.weight'\): use one of 'block', "
                             r"'svd', 'random', 'columns', 'rows', 'randk'"),
    ({"subspace": "randperm"}, r"subspace 'randperm'.*'layer\.weight'.*subspace='columns' \(or 'rows'\)"),
    ({"density": 0.0}, r"density must be a finite number in \(0, 1\], got 0\.0 \(param group of 'layer\.weight'\); "
                       r".*density=0\.25"),
    ({"density": 1.5}, r"density must be a finite number in \(0, 1\], got 1\.5"),
    ({"density": float("nan")}, r"density must be a finite number in \(0, 1\]"),
    ({"density": "0.25"}, r"density must be a finite number"),
    ({"lr": -1e-3}, r"lr must be a finite number in \[0, inf\), got -0\.001 \(param group of 'layer\.weight'\); "
                    r"pass a learning rate"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\] must be in \[0, 1\), got 1\.0 \(param group of 'layer\.weight'\)"),
    ({"betas": 0.9}, r"betas must be a pair of floats"),
    ({"eps": -1.0}, r"eps must be a finite number in \[0, inf\)"),
    ({"update_gap": 0}, r"update_gap must be an int >= 1, got 0 .*'layer\.weight'"),
    ({"proj_side": "full"}, r"proj_side 'full'.*not supported.*'std'"),
    ({"inactive_update_rule": "adam"}, r"unknown inactive_update_rule 'adam'.*'sign_sgd', 'sgd', 'no'"),
    ({"block_order": "ascending"}, r"unknown block_order 'ascending'.*'descending', 'random'"),
    ({"inactive_lr_scale": -0.1}, r"inactive_lr_scale must be a finite number in \[0, inf\)"),
    ({"reset_statistics": "yes"}, r"reset_statistics must be True or False"),
    ({"svd": "lanczos"}, r"unknown svd 'lanczos'.*'randomized', 'exact'"),
    ({"seed": -1}, r"seed must be an int >= 0"),
])
def test_bad_group_options(options, message):
    with pytest.raises(ValueError, match=message):
        FRUGAL(named_group(**options))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"subspace": "svdd"}, r"unknown subspace 'svdd': use one of"),  # the constructor's value, checked first
    ({"density": 0}, r"density must be a finite number in \(0, 1\], got 0"),
    ({"betas": (0.9, 1.2)}, r"betas\[1\] must be in \[0, 1\), got 1\.2; pass e\.g\. betas=\(0\.9, 0\.999\)"),
])
def test_bad_constructor_defaults(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FRUGAL(named_group(), **kwargs)


def test_non_matrix_in_a_per_matrix_subspace_names_the_parameter():
    def group():
        return [{"params": [("norm.weight", nn.Parameter(torch.ones(8)))], TARGET_FLAG: True}]

    with pytest.raises(ValueError, match=r"'norm\.weight' \(shape 8\) is not 2-D, but subspace='svd' splits matrices. "
                                         r"Use subspace='block'"):
        FRUGAL(group(), subspace="svd")
    FRUGAL(group(), subspace="block", density=1.0)  # whole tensors of any shape are fine


def test_too_small_a_density_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match=r"density=0\.1 gives parameter 'layer\.weight' \(shape 8×4\) no state-full "
                                         r"coordinate with subspace='svd'.*raise density"):
        FRUGAL(named_group(subspace="svd", density=0.1))  # round(0.1 * 4) = 0
    with pytest.raises(ValueError, match=r"round\(0\.25 \* 1\) = 0 of the 1 tensor\(s\).*'layer\.weight'.*"
                                         r"density > 0\.5"):
        FRUGAL(named_group(subspace="block", density=0.25))
    with pytest.raises(ValueError, match=r"asks for rank 6 of parameter 'layer\.weight' \(shape 8×4\).*"
                                         r"min\(rows, cols\) = 4.*proj_side='std'"):
        FRUGAL(named_group(subspace="svd", density=0.75, proj_side="reverse_std"))
    FRUGAL(named_group(subspace="random", density=0.75, proj_side="reverse_std"))  # a random basis can be 6 of 8


def test_no_split_group_is_refused():
    with pytest.raises(ValueError, match=r"no parameter group to split, so it would be plain AdamW.*param_groups"):
        FRUGAL([nn.Parameter(torch.ones(2, 2))])
    opt = FRUGAL([{"params": [nn.Parameter(torch.ones(4, 4))], "is_proj_params": True}], density=1.0)  # official
    assert opt.param_groups[0][TARGET_FLAG]


def test_bad_param_group_is_rejected_and_not_added():
    opt = FRUGAL(named_group())
    with pytest.raises(ValueError, match=r"unknown subspace 'sgd'"):
        opt.add_param_group({"params": [("other.weight", nn.Parameter(torch.ones(2, 2)))], TARGET_FLAG: True,
                             "subspace": "sgd"})
    assert len(opt.param_groups) == 1


def test_sparse_gradients_are_refused_before_any_state_changes():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = FRUGAL([{"params": list(emb.named_parameters()), TARGET_FLAG: True, "density": 1.0}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients \(parameter 'weight'.*sparse=False"):
        opt.step()
    assert not opt.state and opt.param_groups[0]["block_steps"] == 0


# --------------------------------------------------------------------------------------------------
# DTensor (FSDP2): row shards take a right basis or chosen columns; other layouts are refused clearly
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("subspace", "options"), [
    ("svd", {"proj_side": "right", "svd": "randomized"}),
    ("random", {"proj_side": "right"}),
    ("columns", {}),
    ("block", {}),
])
def test_dtensor_row_shards_step_like_whole_matrices(cpu_mesh, subspace, options):
    """One process (the shard is the whole matrix): sharded = plain through two refreshes; the slow 2-process test
    in test_ddp.py splits the rows for real."""
    check_sharded_steps_like_plain(
        lambda ps: FRUGAL([{"params": ps, "hfx_target": True, "subspace": subspace, "density": 0.5, "update_gap": 2,
                            "inactive_update_rule": "sgd", **options}], lr=0.1, weight_decay=0.1),
        [(7, 8), (6, 5)], cpu_mesh)


@pytest.mark.parametrize(("options", "message"), [
    ({"subspace": "rows"}, r"subspace='rows' picks rows or entries across the shards.*subspace='columns'"),
    ({"subspace": "randk"}, r"subspace='randk' picks rows or entries"),
    ({"subspace": "svd", "svd": "randomized"}, r"proj_side='std' projects its rows.*Pass proj_side='right'"),
    ({"subspace": "svd", "proj_side": "right", "svd": "exact"}, r"svd='exact' needs the whole matrix"),
])
def test_dtensor_subspaces_that_cross_shards_are_refused(cpu_mesh, options, message):
    from torch.distributed.tensor import Shard, distribute_tensor

    w = nn.Parameter(distribute_tensor(torch.ones(4, 6), cpu_mesh, [Shard(0)]))  # std projects the 4 rows
    with pytest.raises(ValueError, match=r"'fc\.weight'.*" + message):
        FRUGAL([{"params": [("fc.weight", w)], "hfx_target": True, "density": 0.5, **options}])
