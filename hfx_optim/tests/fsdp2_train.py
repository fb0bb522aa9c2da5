"""Run under `torchrun --nproc_per_node 2`: a tiny Llama wrapped with FSDP2's ``fully_shard`` (per decoder layer and
the root, 2 CPU processes, gloo) takes 3 steps with each optimizer that accepts shards, built by its name-aware
factory as Trainer builds it, next to an unsharded copy fed the global batch. Every rank writes the largest
difference between the two per optimizer: FSDP2 averages the gradients of the ranks' half-batches, so the sharded
run must match the unsharded one to rounding."""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import hfx
from hfx._compat import is_optimizer_factory
from hfx.testing import finish_distributed

# The options that keep each one on its shard-capable path. eps=1e-4 and FRUGAL's SGD state-free rule keep the
# comparison at rounding level: with eps=1e-8 Adam (and sign) turn last-bit differences of near-zero gradients (the
# sharded run averages two half-batch gradients) into differences of a sizable fraction of a step.
OPTIMIZERS = {
    "mars": {"eps": 1e-4},
    "galore2": {"rank": 4, "proj_type": "right", "update_proj_gap": 2, "eps": 1e-4},
    "fira": {"rank": 4, "proj_type": "right", "update_proj_gap": 2, "svd": "randomized", "eps": 1e-4},
    "frugal": {"subspace": "block", "density": 0.5, "update_gap": 2, "inactive_update_rule": "sgd", "eps": 1e-4},
    "eco": {"eps": 1e-4, "scale_mode": "row"},
}


def build(name: str, model: torch.nn.Module):
    target, kwargs = hfx.optimizer(name, lr=1e-2, **OPTIMIZERS[name])
    return target()(model, **kwargs) if is_optimizer_factory(target) else target(model.parameters(), **kwargs)


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
results = {}
for name in OPTIMIZERS:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    whole = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    runs = [(model, build(name, model)), (whole, build(name, whole))]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # GaLore 2 and FRUGAL refresh before steps 1 and 3
        ids = torch.randint(0, config.vocab_size, (2 * world, 12), generator=gen)
        for net, opt, batch in ((*runs[0], ids[2 * rank:2 * rank + 2]), (*runs[1], ids)):
            net(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
    results[name] = max((p.full_tensor() - q.detach()).abs().max().item()
                        for p, q in zip(model.parameters(), whole.parameters()))
with open(f"{sys.argv[1]}.rank{rank}", "w") as f:
    json.dump(results, f)
finish_distributed()
