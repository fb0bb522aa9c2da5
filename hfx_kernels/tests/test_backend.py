"""Kernel dispatch (DESIGN §3): Triton on CUDA, torch elsewhere, forced by HFX_KERNELS or plugins.toml; Triton optional;
every kernel registered with a loadable implementation and reference."""

import subprocess
import sys
import textwrap

import pytest
import torch

import hfx
from hfx_kernels import _backend


def test_auto_takes_torch_on_cpu_tensors(isolated):
    assert hfx.kernel_backend() == "auto"
    assert not _backend.use_triton([torch.zeros(3)], "k")


def test_env_forces_a_backend(isolated, monkeypatch):
    monkeypatch.setenv("HFX_KERNELS", "torch")
    assert not _backend.use_triton([torch.zeros(3)], "k")
    monkeypatch.setenv("HFX_KERNELS", "cuda")
    with pytest.raises(ValueError, match="HFX_KERNELS must be one of auto, torch, triton"):
        _backend.use_triton([torch.zeros(3)], "k")


def test_plugins_toml_forces_a_backend(isolated):
    (isolated / "plugins.toml").write_text('[kernels]\nbackend = "torch"\n')
    assert hfx.kernel_backend() == "torch"


@pytest.mark.skipif(not _backend.triton_available(), reason="needs Triton")
def test_forced_triton_on_cpu_without_the_interpreter_says_how(isolated, monkeypatch):
    monkeypatch.setenv("HFX_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*HFX_KERNELS=auto"):
        _backend.use_triton([torch.zeros(3)], "adamw_step")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.use_triton([torch.zeros(3)], "adamw_step")


def test_without_triton_everything_imports_and_runs_on_torch(tmp_path):
    """Triton blocked (as on macOS/Windows or a torch-only install): every kernel module imports, the dispatch takes
    the torch path, and forcing Triton names the install command."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch, hfx_kernels
        for m in pkgutil.iter_modules(hfx_kernels.__path__):
            importlib.import_module("hfx_kernels." + m.name)
        from hfx_kernels.adamw import adamw_step
        p, g = [torch.zeros(3)], [torch.ones(3)]
        m, v = [torch.zeros(3)], [torch.zeros(3)]
        adamw_step(p, g, m, v, steps=1, lr=0.1, betas=(0.9, 0.999), eps=1e-12)
        assert torch.allclose(p[0], torch.full((3,), -0.1)), p
        import os
        os.environ["HFX_KERNELS"] = "triton"
        try:
            adamw_step(p, g, m, v, steps=2, lr=0.1, betas=(0.9, 0.999), eps=1e-12)
        except RuntimeError as err:
            assert "pip install 'hfx-kernels[triton]'" in str(err), err
        else:
            raise AssertionError("forcing Triton without it did not fail")
        print("ok")
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "HFX_KERNELS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_every_kernel_is_registered_with_an_implementation_and_a_reference(isolated):
    kernels = hfx.get_registry().contributions("kernel")
    assert {"adamw_step", "mars_adamw_step", "mars_lion_step", "sign_sgd_step", "projection_update",
                                  "requantize", "quantize", "dequantize"} <= {
        k.name for k in kernels}
    for k in kernels:
        assert k.available and k.plugin == "kernels"
        assert callable(k.load()) and callable(k.load("reference")), k.name
        assert k.extras["fuses"] and k.extras["dtypes"], k.name
