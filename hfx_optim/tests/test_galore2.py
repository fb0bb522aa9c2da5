"""GaLore2: an independent numpy float64 re-derivation of the spec's update (§3.1, §3.2) for every proj_type and
option, including subspace refreshes; the AdamW groups against torch.optim.AdamW; the conformance kit; Trainer/TRL
integration and resume across a refresh; DTensor refusal; input errors.

The reference below (and spec_reference.py) shares no code with hfx_optim: it is numpy, written from the spec's formulas, with its own
SVD, randomized SVD (Halko et al.), sign convention and seed derivation (the documented contract: a CPU
torch.Generator seeded with chained SplitMix64 values, drawing float64 normals).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from spec_reference import check_sharded_steps_like_plain, down, grad_t, rel, run_projected, subspace_schedule, up, w0
from torch import nn

import hfx
from hfx.testing import OptimizerConformance, tiny_model
from hfx_optim.galore2 import GaLore2, GaLore2Factory
from hfx_optim.targets import TARGET_FLAG, param_groups

# --------------------------------------------------------------------------------------------------
# Independent reference (numpy, float64)
# --------------------------------------------------------------------------------------------------


def adam_moments(m_, v_, r, b1, b2):
    return b1 * m_ + (1 - b1) * r, b2 * v_ + (1 - b2) * r * r


def adam_update(m_, v_, t, back, *, lr, b1, b2, eps, correct_bias, eps_mode):
    """The step lr * back(direction): spec §3.1 for eps_mode="hf", torch.optim.AdamW's form for "torch"."""
    bc1, bc2 = (1 - b1**t, 1 - b2**t) if correct_bias else (1.0, 1.0)
    if eps_mode == "hf":
        return lr * np.sqrt(bc2) / bc1 * back(m_ / (np.sqrt(v_) + eps))
    return lr * back((m_ / bc1) / (np.sqrt(v_ / bc2) + eps))


def decay(w, step, lr, wd, mode):
    return (w * (1 - lr * wd) - step) if mode == "before" else (w - step) * (1 - lr * wd)


DEFAULTS = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1, rank=2, update_proj_gap=2, scale=0.25,
                proj_type="std", svd="exact", oversample=2, power_iters=1, seed=0, moments_on_refresh="keep",
                correct_bias=True, eps_mode="hf", decay_mode="after")


def reference_galore(shape, steps: int, **options):
    """W (projected, decay group, param index 0) and a bias (AdamW, no-decay group) after ``steps`` steps."""
    o = {**DEFAULTS, **options}
    lr, (b1, b2), eps, wd = o["lr"], o["betas"], o["eps"], o["weight_decay"]
    kw = dict(lr=lr, b1=b1, b2=b2, eps=eps, correct_bias=o["correct_bias"], eps_mode=o["eps_mode"])
    m, n = shape
    w, b = w0(m, n), w0(m, 1)[:, 0]
    mw = vw = None
    mb, vb = np.zeros(m), np.zeros(m)
    tw = 0
    grads = (grad_t(m, n, t) for t in range(1, steps + 1))
    for t, (g, lb, rb, fresh) in enumerate(subspace_schedule(o, grads), 1):
        if fresh:
            mw = vw = np.zeros_like(down(g, lb, rb))
            tw = 0
        tw += 1
        mw, vw = adam_moments(mw, vw, down(g, lb, rb), b1, b2)
        step = o["scale"] * adam_update(mw, vw, tw, lambda x, lb=lb, rb=rb: up(x, lb, rb), **kw)
        w = decay(w, step, lr, wd, o["decay_mode"])
        gb = grad_t(m, 1, t)[:, 0]
        mb, vb = adam_moments(mb, vb, gb, b1, b2)
        b = decay(b, adam_update(mb, vb, t, lambda x: x, **kw), lr, 0.0, o["decay_mode"])
    return w, b, mw


def run_galore(shape, steps: int, dtype=torch.float64, cls=GaLore2, **options):
    return run_projected(cls, shape, steps, {**DEFAULTS, **options}, dtype)


PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SHAPES = ((5, 3), (3, 5), (12, 9), (9, 12))  # the larger ones make the randomized sketch (k = 4) smaller than n


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("moments", ["keep", "reset"])
@pytest.mark.parametrize(("shape", "svd"), [(s, "exact") for s in SHAPES] + [(s, "randomized") for s in SHAPES[2:]])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_reference_fp64(proj_type, shape, svd, moments):
    steps = 5  # refreshes before steps 1, 3 and 5
    w_ref, b_ref, m_ref = reference_galore(shape, steps, proj_type=proj_type, svd=svd, moments_on_refresh=moments)
    w, b, opt = run_galore(shape, steps, proj_type=proj_type, svd=svd, moments_on_refresh=moments)
    w_init = w0(*shape)
    assert rel(w, w_ref) < 1e-10 and rel(b, b_ref) < 1e-10
    assert rel(w - torch.from_numpy(w_init), w_ref - w_init) < 1e-9  # the update itself, not only the weights
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert (state["step"], state["refreshes"], state["last_refresh"]) == (5, 3, 4)
    assert state["adam_step"] == (1 if moments == "reset" else 5)
    assert state["exp_avg"].shape == m_ref.shape and rel(state["exp_avg"], m_ref) < 1e-10


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("options", [
    {"eps_mode": "torch"},
    {"decay_mode": "before"},
    {"correct_bias": False},
    {"eps_mode": "torch", "decay_mode": "before", "scale": 1.0},
    {"svd": "randomized", "oversample": 0, "power_iters": 0, "seed": 7},
    {"svd": "randomized", "oversample": 1, "power_iters": 2, "seed": 123456789},
    {"update_proj_gap": 1, "moments_on_refresh": "reset", "svd": "randomized"},
    {"update_proj_gap": 200},
    # eps >= 1e-7: with "full" and exact bases, L^T G Rt^T at a refresh is diagonal, its off-diagonal entries are
    # rounding noise (~1e-16) that Adam divides by eps, so two correct implementations differ by ~1e-16/eps
    {"rank": 3, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.0, "lr": 0.03},
])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_options_match_reference_fp64(options, proj_type):
    w_ref, b_ref, _ = reference_galore((9, 12), 4, proj_type=proj_type, **options)
    w, b, _ = run_galore((9, 12), 4, proj_type=proj_type, **options)
    assert rel(w, w_ref) < 1e-10 and rel(b, b_ref) < 1e-10


@pytest.mark.usefixtures("kernel_backend")
@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("shape", [(12, 9), (9, 12)])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_reference_fp32(proj_type, shape, svd):
    # "full": at a refresh L^T G Rt^T is diagonal and its off-diagonal entries are float32 rounding (~1e-7 |G|),
    # which Adam divides by eps; with eps=1e-6 that is an O(1e-2) relative change of the update, in any fp32
    # implementation. A larger eps keeps the comparison about the implementation, not about that amplification.
    eps = 1e-3 if proj_type == "full" else 1e-6
    w_ref, b_ref, _ = reference_galore(shape, 4, proj_type=proj_type, svd=svd, eps=eps)
    w, b, opt = run_galore(shape, 4, dtype=torch.float32, proj_type=proj_type, svd=svd, eps=eps)
    assert w.dtype == torch.float32 and opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.float32
    assert rel(w, w_ref) < 1e-6 and rel(b, b_ref) < 1e-6


def test_options_change_the_result():
    """Each option the reference test covers really changes the trajectory (so matching the reference means
    something)."""
    base, _, _ = run_galore((9, 12), 4)
    for options in ({"eps_mode": "torch"}, {"decay_mode": "before"}, {"correct_bias": False},
                    {"moments_on_refresh": "reset"}, {"svd": "randomized"}, {"seed": 1, "svd": "randomized"},
                    {"proj_type": "reverse_std"}, {"scale": 1.0}):
        other, _, _ = run_galore((9, 12), 4, **options)
        assert (other - base).abs().max() > 1e-9, options


@pytest.mark.usefixtures("kernel_backend")
def test_adamw_groups_equal_torch_adamw_in_torch_mode():
    """The non-projected groups, with eps_mode="torch", decay_mode="before", are torch.optim.AdamW."""
    torch.manual_seed(0)
    params = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    ours = [nn.Parameter(p.clone()) for p in params]
    theirs = [nn.Parameter(p.clone()) for p in params]
    hyper = dict(lr=0.02, betas=(0.85, 0.99), eps=1e-8, weight_decay=0.05)
    anchor = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))  # a projected group must exist
    opt = GaLore2([{"params": ours}, {"params": [anchor], "rank": 1}], eps_mode="torch", decay_mode="before", **hyper)
    ref = torch.optim.AdamW(theirs, foreach=False, **hyper)
    for t in range(4):
        for a, c in zip(ours, theirs):
            g = torch.sin(torch.arange(a.numel(), dtype=torch.float64) * (t + 1.3)).reshape(a.shape)
            a.grad, c.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, c in zip(ours, theirs):
        torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-15)


@pytest.mark.usefixtures("kernel_backend")
def test_lr_zero_warmup_step_changes_nothing_but_the_state():
    w, _, opt = run_galore((5, 3), 1, lr=0.0)
    assert torch.equal(w, torch.tensor(w0(5, 3)))
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == 1


@pytest.mark.usefixtures("kernel_backend")
def test_bf16_parameters_keep_bf16_state():
    w = nn.Parameter(torch.tensor(w0(12, 9), dtype=torch.bfloat16))
    opt = GaLore2([{"params": [w], "rank": 2}], lr=0.01)
    w.grad = torch.tensor(grad_t(12, 9, 1), dtype=torch.bfloat16)
    opt.step()
    state = opt.state[w]
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "proj_right")} == {torch.bfloat16}
    assert state["exp_avg"].shape == (12, 2) and state["proj_right"].shape == (2, 9)


# --------------------------------------------------------------------------------------------------
# Conformance kit (state round trip with weights_only; bit-identical resume across a refresh)
# --------------------------------------------------------------------------------------------------


class _GaLore2Conformance(OptimizerConformance):
    options: dict = {}

    def make_optimizer(self, model):
        # TinyMLP: fc1 16×8, fc2 4×16. update_proj_gap=2 puts a refresh at step 5, after the resume at step 3
        groups = param_groups(model, "all-linear", weight_decay=0.01,
                              target_options={"rank": 2, "update_proj_gap": 2, **self.options})
        return GaLore2(groups, lr=1e-2, scale=1.0)


class TestConformanceDefault(_GaLore2Conformance):
    options = {}


class TestConformanceExactReset(_GaLore2Conformance):
    options = {"svd": "exact", "moments_on_refresh": "reset"}


class TestConformanceFull(_GaLore2Conformance):
    options = {"proj_type": "full", "power_iters": 0}


class TestConformanceReverseStd(_GaLore2Conformance):
    options = {"proj_type": "reverse_std"}


# --------------------------------------------------------------------------------------------------
# Registry, facade, Trainer and TRL
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
def test_registered_and_resolved_through_the_facade(registered):
    registered("galore2", GaLore2, ("GaLore 2: Large-Scale LLM Pre-Training by Gradient Low-Rank Projection",
                                    "2504.20437"), factory=GaLore2Factory)
    cls, kwargs = hfx.optimizer("galore2", rank=4, target_modules="all-linear")
    assert cls is GaLore2Factory and kwargs == {"rank": 4, "target_modules": "all-linear"}


def test_factory_groups_and_forwarded_hyperparameters():
    model = tiny_model("qwen2")
    opt = GaLore2Factory()(model, target_modules=["q_proj", "down_proj"], rank=4, proj_type="right", lr=0.02,
                           betas=(0.8, 0.9), eps=1e-7, weight_decay=0.01)
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert q[TARGET_FLAG] and q["rank"] == 4 and q["proj_type"] == "right" and q["weight_decay"] == 0.01
    assert (q["betas"], q["eps"], q["lr"]) == ((0.8, 0.9), 1e-7, 0.02)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_proj.bias"):
        assert not by_name[name][TARGET_FLAG], name
    assert by_name["model.norm.weight"]["weight_decay"] == 0.0
    assert by_name["model.layers.0.self_attn.q_proj.bias"]["weight_decay"] == 0.0


def test_trainer_arguments_are_forwarded_to_the_factory(tmp_path):
    from transformers import TrainingArguments

    from hfx.compose import trainer_optimizer_defaults

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.03, adam_beta1=0.8, adam_beta2=0.95,
                             adam_epsilon=1e-7, weight_decay=0.02, report_to="none", use_cpu=True)
    assert trainer_optimizer_defaults(GaLore2Factory, args) == {
        "lr": 0.03, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.02}


@pytest.mark.floor
def test_sft_trainer_with_hfx_optimizer_galore2(registry, sft_trainer, train_all, tmp_path):
    trainer = sft_trainer(tmp_path, hfx_optimizer="galore2", learning_rate=1e-2, weight_decay=0.01, adam_beta1=0.8,
                          adam_epsilon=1e-7, hfx_optimizer_args={"rank": 4, "update_proj_gap": 1})
    opt = train_all(trainer)
    assert type(opt) is GaLore2 and trainer.state.global_step == 2
    targets = [g for g in opt.param_groups if g[TARGET_FLAG]]
    assert targets and all(g["rank"] == 4 and g["weight_decay"] == 0.01 for g in targets)
    assert all(g["betas"] == (0.8, 0.999) and g["eps"] == 1e-7 for g in opt.param_groups)  # forwarded, not dropped
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01, 0.0}  # HF's decay split kept
    params = dict(trainer.model.named_parameters())
    q = opt.state[params["model.layers.0.self_attn.q_proj.weight"]]
    assert q["refreshes"] == 2 and q["proj_right"].shape == (4, 32) and q["exp_avg"].shape == (32, 4)
    emb = opt.state[params["model.embed_tokens.weight"]]
    assert emb["exp_avg"].shape == (512, 32) and "proj_left" not in emb and "proj_right" not in emb


@pytest.mark.floor
def test_sft_trainer_with_optimizer_cls_and_kwargs(registry, sft_trainer, train_all, tmp_path):
    trainer = sft_trainer(tmp_path, extend_config=False,
                          trainer_kwargs={"optimizer_cls_and_kwargs": hfx.optimizer("galore2", rank=4, lr=1e-2)})
    assert type(train_all(trainer)) is GaLore2 and trainer.state.global_step == 2


# --------------------------------------------------------------------------------------------------
# DTensor (FSDP2): row shards take the right projection without gathering; other layouts are refused clearly
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["GaLore2", "Fira"])
def test_dtensor_row_shards_step_like_whole_matrices(cpu_mesh, cls):
    """One process (the shard is the whole matrix): the sharded path (local projection, row-sharded moments,
    sketch across shards, Fira's limiter norm summed over the mesh) gives the whole-matrix result through two
    refreshes, projected and AdamW groups alike. The slow 2-process test in test_ddp.py splits the rows for real."""
    from torch.distributed.tensor import DTensor, Shard

    from hfx_optim import Fira

    optimizer = {"GaLore2": GaLore2, "Fira": Fira}[cls]
    sharded, opt, plain_opt, plain = check_sharded_steps_like_plain(
        lambda ps: optimizer([{"params": [ps[0]], "rank": 2, "update_proj_gap": 2, "svd": "randomized"},
                              {"params": [ps[1]]}], lr=0.1, weight_decay=0.1),
        [(7, 5), (6,)], cpu_mesh)
    state = opt.state[sharded[0]]
    assert state["refreshes"] == 3 and isinstance(state["exp_avg"], DTensor)
    assert state["exp_avg"].placements == (Shard(0),) and tuple(state["exp_avg"].shape) == (7, 2)
    torch.testing.assert_close(state["proj_right"].full_tensor(), plain_opt.state[plain[0]]["proj_right"],
                               rtol=1e-5, atol=1e-6)


def test_dtensor_layouts_the_projection_cannot_take_are_refused(cpu_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    from hfx_optim import Fira

    def sharded(rows, cols, dim=0):
        return nn.Parameter(distribute_tensor(torch.ones(rows, cols), cpu_mesh, [Shard(dim)]))

    cases = [
        (GaLore2, sharded(4, 6), {}, r"'fc\.weight' \(shape 4×6\) is row-sharded \(FSDP2\) and proj_type='std' "
                                     r"projects its rows.*Pass proj_type='right'"),
        (GaLore2, sharded(6, 4), {"svd": "exact"}, r"svd='exact' needs the whole matrix; pass svd='randomized'"),
        (GaLore2, sharded(6, 4, dim=1), {}, r"placements \(Shard\(dim=1\),\).*takes row shards"),
        (Fira, sharded(6, 4), {}, r"'fc\.weight'.*svd='exact' needs the whole matrix"),  # Fira's default SVD
    ]
    for cls, w, options, message in cases:
        with pytest.raises(ValueError, match=message):
            cls([{"params": [("fc.weight", w)], "rank": 2, **options}])

    # FSDP2 swaps DTensors in after the optimizer is built: refused at step(), before any state changes
    plain = nn.Parameter(torch.ones(4, 6))
    opt = GaLore2([{"params": [("fc.weight", plain)], "rank": 2}])
    w = sharded(4, 6)
    opt.param_groups[0]["params"][0] = w
    w.grad = distribute_tensor(torch.ones(4, 6), cpu_mesh, [Shard(0)])
    with pytest.raises(ValueError, match=r"'fc\.weight'.*is row-sharded"):
        opt.step()
    assert not opt.state


# --------------------------------------------------------------------------------------------------
# Bad input names the parameter and the fix
# --------------------------------------------------------------------------------------------------


def matrix(rows=4, cols=3):
    return nn.Parameter(torch.ones(rows, cols))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"proj_type": "diag"}, r"unknown proj_type 'diag': use one of 'std', 'reverse_std', 'left', 'right', 'full'"),
    ({"lr": -1e-3}, r"lr must be a finite number >= 0, got -0\.001; pass a learning rate"),
    ({"lr": float("nan")}, r"lr must be a finite number >= 0"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\] must be in \[0, 1\), got 1\.0; pass e\.g\. betas=\(0\.9, 0\.999\)"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\] must be in \[0, 1\)"),
    ({"betas": 0.9}, r"betas must be a pair of floats"),
    ({"eps": -1.0}, r"eps must be a finite number >= 0"),
    ({"weight_decay": float("nan")}, r"weight_decay must be a finite number >= 0"),
    ({"rank": 0}, r"rank must be an int >= 1, got 0"),
    ({"rank": 2.0}, r"rank must be an int >= 1, got 2\.0"),
    ({"update_proj_gap": 0}, r"update_proj_gap must be an int >= 1"),
    ({"scale": -1}, r"scale must be a finite number >= 0"),
    ({"svd": "qr"}, r"unknown svd 'qr': use one of 'randomized', 'exact'"),
    ({"oversample": -1}, r"oversample must be an int >= 0"),
    ({"power_iters": 1.5}, r"power_iters must be an int >= 0"),
    ({"seed": -3}, r"seed must be an int >= 0"),
    ({"moments_on_refresh": "project"}, r"unknown moments_on_refresh 'project': use one of 'keep', 'reset'"),
    ({"eps_mode": "adam"}, r"unknown eps_mode 'adam': use one of 'hf', 'torch'"),
    ({"decay_mode": "never"}, r"unknown decay_mode 'never': use one of 'after', 'before'"),
    ({"correct_bias": "yes"}, r"correct_bias must be True or False"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaLore2([{"params": [matrix()], "rank": 1}], **kwargs)
    with pytest.raises(ValueError, match=message):  # the same check per group
        GaLore2([{"params": [matrix()], "rank": 1, **kwargs}])


def test_rank_larger_than_the_matrix_names_the_parameter():
    with pytest.raises(ValueError, match=r"rank=64 is larger than parameter 'model\.layers\.0\.self_attn\.q_proj\."
                                         r"weight' \(shape 32×32\) allows.*<= min\(rows, cols\) = 32.*rank=8"):
        GaLore2Factory()(tiny_model("qwen2"), rank=64)
    with pytest.raises(ValueError, match=r"rank=4 is larger than parameter #0 of its group \(shape 4×3\)"):
        GaLore2([{"params": [matrix()], "rank": 4}])


def test_non_matrix_in_a_projected_group_names_the_parameter():
    with pytest.raises(ValueError, match=r"parameter 'norm\.weight' \(shape 4\) is in a projected group but is not "
                                         r"2-D.*Leave it out of target_modules"):
        GaLore2([{"params": [("w", matrix()), ("norm.weight", nn.Parameter(torch.ones(4)))], "rank": 1}])


def test_flattened_parameter_at_step_time_is_refused():
    """FSDP1 (use_orig_params=False) and ZeRO hand the optimizer flat 1-D shards after construction."""
    w = matrix()
    opt = GaLore2([{"params": [("fc.weight", w)], "rank": 1}])
    w.data = w.data.flatten()
    w.grad = torch.ones(12)
    with pytest.raises(ValueError, match=r"'fc\.weight' \(shape 12\) is in a projected group but is not 2-D.*FSDP1"):
        opt.step()
    assert not opt.state


def test_no_projected_group_is_refused():
    with pytest.raises(ValueError, match=r"GaLore2 got no projected parameter group.*param_groups\(model.*"
                                         r"hfx\.optimizer\('galore2'"):
        GaLore2(nn.Linear(3, 4).parameters(), rank=2)


def test_bad_param_group_is_rejected_and_not_added():
    opt = GaLore2([{"params": [matrix()], "rank": 1}])
    with pytest.raises(ValueError, match=r"unknown proj_type"):
        opt.add_param_group({"params": [matrix()], "rank": 1, "proj_type": "diag"})
    assert len(opt.param_groups) == 1


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = GaLore2([{"params": [matrix()], "rank": 1}, {"params": emb.parameters()}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients.*nn\.Embedding\(\.\.\., sparse=False\)"):
        opt.step()
    assert not opt.state
