"""hfx composition in two processes on the CPU (DDP over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGINS = Path(__file__).parent / "plugins"


@pytest.mark.slow
def test_extended_trainer_with_hfx_optimizer_under_ddp(tiny_model_dir, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    # `accelerate launch --cpu --num_processes 2` starts independent processes unless mpirun is set up, so use
    # torchrun: with use_cpu=True accelerate sees RANK/WORLD_SIZE and initialises DDP over gloo.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(PLUGINS / "ddp_train.py"), str(tiny_model_dir("qwen2")), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == {"world_size": 2, "optimizer": "WrappedSGD", "changed": result["changed"], "steps": 2}
    assert result["changed"] > 0
