"""Run under `torchrun --nproc_per_node 2`: 3 SFT steps with each hfx-optim optimizer over DDP (gloo); every rank
writes a checksum of its parameters, so the test can check that both ranks hold identical weights."""

import json
import sys

import torch
from trl import SFTConfig, SFTTrainer

import hfx
from hfx.testing import fast_training_args, finish_distributed, make_tiny_datasets, params_changed, snapshot_params

ARGS = {"galore2": {"rank": 4, "update_proj_gap": 2}, "fira": {"rank": 4, "update_proj_gap": 2},
        "frugal": {"update_gap": 2, "subspace": "randk"}}
model_path, names, out = sys.argv[1:4]
results = {}
for name in names.split(","):
    args = fast_training_args(hfx.extend(SFTConfig), f"{out}.{name}", max_steps=3, learning_rate=1e-2,
                              hfx_optimizer=name, hfx_optimizer_args=ARGS.get(name, {}), max_length=32)
    trainer = hfx.extend(SFTTrainer)(model=model_path, args=args,
                                     train_dataset=make_tiny_datasets()["language_modeling"])
    before = snapshot_params(trainer.model)
    trainer.train()
    flat = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    results[name] = {"world": trainer.accelerator.num_processes, "changed": len(params_changed(before, trainer.model)),
                     "sum": flat.sum().item(), "sumsq": (flat * flat).sum().item(), "first": flat[:8].tolist()}
with open(f"{out}.rank{trainer.accelerator.process_index}", "w") as f:
    json.dump(results, f)
finish_distributed()
