"""Fixtures of the hfx-kernels tests (the hfx test kit's come from the root conftest)."""

import pytest
import torch

from hfx_kernels.testing import kernel_device


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A clean working directory (no plugins.toml), no HFX_KERNELS, and a registry rebuilt on first use."""
    import hfx.registry

    monkeypatch.chdir(tmp_path)
    for var in ("HFX_PLUGINS_TOML", "HFX_DISABLE_PLUGINS", "HFX_DISABLE_PLUGIN_AUTOLOAD", "HFX_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    hfx.registry.reset()
    yield tmp_path
    hfx.registry.reset()


@pytest.fixture
def on_kernel_device():
    """Plain tensors are made where the kernels run: CUDA when there is a GPU, else the CPU (Triton's interpreter)."""
    previous = torch.get_default_device()
    torch.set_default_device(kernel_device())
    yield
    torch.set_default_device(previous)
