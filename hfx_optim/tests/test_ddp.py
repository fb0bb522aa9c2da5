"""Every hfx-optim optimizer under DDP (2 CPU processes, gloo): trains, and both ranks end with identical weights
(the projections, subspace choices and stochastic rounding draw the same on every rank). And the optimizers that
accept FSDP2 (DTensor) shards step on them like on whole tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hfx.registry import get_registry
from hfx.testing import shared_tiny_model_dir

HERE = Path(__file__).parent


def run_on_two_ranks(script: str, port: int, out: Path, *args: str, timeout: int = 600) -> list[dict]:
    """``torch.distributed.run`` of ``script`` on 2 CPU processes with ``out`` and ``args``; each rank writes a JSON
    object to ``{out}.rank{r}``: the two, in rank order."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(HERE / script), *args, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_all_optimizers_identical_on_both_ranks(tmp_path):
    names = sorted(c.name for c in get_registry().contributions("optimizer") if c.plugin == "optim")
    rank0, rank1 = run_on_two_ranks("ddp_train.py", 29531, tmp_path / "run", str(shared_tiny_model_dir("qwen2")),
                                    ",".join(names), timeout=900)
    assert sorted(rank0) == names
    for name in names:
        assert rank0[name]["world"] == 2 and rank0[name]["changed"] > 0, name
        assert rank0[name] == rank1[name], name  # bit-identical weights on both ranks


@pytest.mark.slow
def test_fsdp2_sharded_parameters_step_like_whole_ones(tmp_path):
    """DTensor parameters sharded over 2 processes (as FSDP2 shards them) step like whole tensors: MARS's per-tensor
    norm is all-reduced across the shards (with the gradient norm above 1, a per-shard clip would differ), and
    GaLore 2's and Fira's right basis is sketched across them (a per-shard basis would differ), through 3
    refreshes, Fira's limiter norm is summed over them, and ECO's quantized rows draw the whole tensor's noise."""
    for diffs in run_on_two_ranks("fsdp2_step.py", 29533, tmp_path / "fsdp2"):
        assert sorted(diffs) == ["eco_int8", "fira_right", "frugal_block", "frugal_columns", "frugal_svd_right",
                                 "galore2_right", "mars_adamw", "mars_lion"]
        assert max(diffs.values()) <= 1e-6, diffs  # ECO: a wrong noise offset would move weights by grid steps


@pytest.mark.slow
def test_fsdp2_fully_shard_training_matches_unsharded(tmp_path):
    """A tiny Llama under FSDP2's ``fully_shard`` (2 processes; optimizers from their name-aware factories, state
    created lazily from the DTensor parameters) trains like an unsharded copy fed the global batch: MARS, GaLore 2
    and Fira (right projection, through 2 refreshes), FRUGAL (block subspace) and ECO (int8 row scales)."""
    for diffs in run_on_two_ranks("fsdp2_train.py", 29535, tmp_path / "fsdp2_train"):
        assert sorted(diffs) == ["eco", "fira", "frugal", "galore2", "mars"]
        assert max(diffs.values()) <= 1e-5, diffs
