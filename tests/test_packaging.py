"""Each distribution builds a wheel on its own and installs into a fresh venv; with only hfx and hfx-optim installed,
an optimizer resolves and a trainer name says which extra to install (slow: builds wheels, installs torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTS = {"hfx": ROOT, "hfx-kernels": ROOT / "hfx_kernels", "hfx-optim": ROOT / "hfx_optim",
         "hfx-attention": ROOT / "hfx_attention", "hfx-trainers": ROOT / "hfx_trainers"}

PROBE = """
import json, sys
import hfx
result = {"plugins": {n: (i.dist, i.status) for n, i in hfx.get_registry().plugins.items()}}
try:
    result["MARS"] = hfx.MARS.__module__
except AttributeError as e:
    result["MARS"] = "AttributeError: " + str(e)
try:
    hfx.SPINTrainer
    result["SPINTrainer"] = "resolved"
except AttributeError as e:
    result["SPINTrainer"] = str(e)
print(json.dumps(result))
"""


def sh(*cmd, cwd=None):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_wheels_build_alone_and_install_in_a_fresh_venv(tmp_path):
    wheels = tmp_path / "wheels"
    for name, src in DISTS.items():
        # --no-build-isolation: hatchling comes from the dev environment, so the build needs no network
        sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, src)
        assert list(wheels.glob(f"{name.replace('-', '_')}-0.1.0-py3-none-any.whl")), name
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    wheel = {name: next(wheels.glob(f"{name.replace('-', '_')}-*.whl")) for name in DISTS}
    # hfx-optim with its hfx dependencies (hfx, hfx-kernels: the optimizers' step kernels), without Triton
    sh(py, "-m", "pip", "install", "-q", "--no-deps", wheel["hfx"], wheel["hfx-kernels"], wheel["hfx-optim"])
    sh(py, "-m", "pip", "install", "-q", "pluggy", "packaging", "torch==2.13.0")  # hfx's and MARS's dependencies

    only_optim = json.loads(sh(py, "-c", PROBE, cwd=tmp_path).stdout)
    assert only_optim["plugins"]["optim"] == ["hfx-optim", "loaded"]
    assert "trainers" not in only_optim["plugins"]
    assert only_optim["MARS"] == "hfx_optim.mars"
    assert 'pip install "hfx[trainers]"' in only_optim["SPINTrainer"]

    sh(py, "-m", "pip", "install", "-q", "--no-deps", wheel["hfx-attention"], wheel["hfx-trainers"])
    everything = json.loads(sh(py, "-c", PROBE, cwd=tmp_path).stdout)
    assert {n: d for n, (d, s) in everything["plugins"].items() if s == "loaded"} == {
        "hfx.builtin": None, "kernels": "hfx-kernels", "optim": "hfx-optim", "attention": "hfx-attention",
        "trainers": "hfx-trainers"}
    hfx_cli = sh(venv / "bin" / "hfx", "plugins", "list", cwd=tmp_path).stdout
    assert "hfx-trainers" in hfx_cli
