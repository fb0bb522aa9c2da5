"""Run under `torchrun --nproc_per_node 2`: an hfx-extended SFTTrainer with an hfx optimizer over
DDP (gloo). Rank 0 writes what it saw to argv[2]."""

import json
import sys

import hfx_test_plugin
from trl import SFTConfig, SFTTrainer

import hfx
from hfx.registry import load, reset
from hfx.testing import fast_training_args, finish_distributed, make_tiny_datasets, params_changed, snapshot_params

model_path, out = sys.argv[1], sys.argv[2]
reset(load(plugins=[("testplugin", hfx_test_plugin)]))
args = fast_training_args(hfx.extend(SFTConfig), out + ".run", hfx_optimizer="test_sgd", per_device_train_batch_size=2)
trainer = hfx.extend(SFTTrainer)(model=model_path, args=args, train_dataset=make_tiny_datasets()["language_modeling"])
before = snapshot_params(trainer.model)
trainer.train()
if trainer.accelerator.is_main_process:
    with open(out, "w") as f:
        json.dump({"world_size": trainer.accelerator.num_processes,
                   "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
                   "changed": len(params_changed(before, trainer.model)),
                   "steps": trainer.state.global_step}, f)
finish_distributed()
