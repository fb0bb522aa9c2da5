"""Run under `torchrun --nproc_per_node 2`: optimizers on DTensor-sharded parameters (Shard(0) over 2 CPU processes,
gloo, as FSDP2 shards them; uneven shards included) against the same optimizers on whole tensors in this process.
Every rank writes the largest difference per optimizer, so the test can check that what spans shards is combined
across them: MARS's per-tensor norm (a per-shard norm would clip each half differently), GaLore 2's and Fira's subspace (a per-shard
sketch would give each rank its own basis), Fira's limiter norm (a per-shard one would limit each half
differently) and ECO's stochastic rounding noise (each shard must draw the whole tensor's noise on its rows)."""

import json
import sys

import torch
import torch.distributed as dist
from spec_reference import full_rank_gradient  # this script's folder is on sys.path
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from hfx.testing import finish_distributed
from hfx_optim import ECO, FRUGAL, MARS, Fira, GaLore2

BUILD = {
    "mars_adamw": lambda params: MARS(params, lr=0.1, weight_decay=0.1),
    "mars_lion": lambda params: MARS(params, lr=0.1, mars_type="lion"),
    "frugal_block": lambda params: FRUGAL([{"params": params, "hfx_target": True, "density": 0.5}], lr=0.1),
    "frugal_svd_right": lambda params: FRUGAL([{"params": params[:1], "hfx_target": True, "subspace": "svd",
                                                "proj_side": "right", "svd": "randomized", "density": 0.5,
                                                "update_gap": 2, "inactive_update_rule": "sgd"},
                                               {"params": params[1:]}], lr=0.1),
    "frugal_columns": lambda params: FRUGAL([{"params": params[:1], "hfx_target": True, "subspace": "columns",
                                              "density": 0.5, "update_gap": 2}, {"params": params[1:]}], lr=0.1),
    "galore2_right": lambda params: GaLore2([{"params": params[:1], "rank": 2, "update_proj_gap": 2},
                                             {"params": params[1:]}], lr=0.1, weight_decay=0.1),
    "eco_int8": lambda params: ECO([{"params": params[:1]}, {"params": params[1:], "quantize": False}], lr=0.1,
                                   weight_format="int8", scale_mode="block", block_size=2),
    "fira_right": lambda params: Fira([{"params": params[:1], "rank": 2, "update_proj_gap": 2, "svd": "randomized"},
                                       {"params": params[1:]}], lr=0.1, weight_decay=0.1),
}

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
results = {}
for name, build in BUILD.items():
    whole = [nn.Parameter(torch.linspace(-1, 1, 35).reshape(7, 5)), nn.Parameter(torch.linspace(0, 1, 5))]
    sharded = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in whole]
    runs = [build(whole), build(sharded)]
    for t in range(5):  # GaLore 2 refreshes before steps 1, 3 and 5
        for p, s in zip(whole, sharded):
            g = full_rank_gradient(p.shape, t) * 3  # norm > 1: MARS clips
            p.grad, s.grad = g, distribute_tensor(g, mesh, [Shard(0)])
        for opt in runs:
            opt.step()
    results[name] = max((s.full_tensor() - p.detach()).abs().max().item() for p, s in zip(whole, sharded))
with open(f"{sys.argv[1]}.rank{dist.get_rank()}", "w") as f:
    json.dump(results, f)
finish_distributed()
