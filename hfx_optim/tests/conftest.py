"""Fixtures of the hfx-optim tests (the hfx test kit's come from the root conftest). This folder goes on sys.path for
``spec_reference``, the reference pieces the GaLore2, Fira and FRUGAL tests share."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import hfx
from hfx.testing import (
    apply_offline_env,
    fast_training_args,
    make_tiny_datasets,
    params_changed,
    shared_tiny_model_dir,
    snapshot_params,
    unwrap_optimizer,
)

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """A fresh plugin registry, offline and in an empty working directory (no plugins.toml but one a test writes)."""
    import hfx.registry

    apply_offline_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for var in ("HFX_DISABLE_PLUGINS", "HFX_DISABLE_PLUGIN_AUTOLOAD", "HFX_PLUGINS_TOML"):
        monkeypatch.delenv(var, raising=False)
    hfx.registry.reset()
    yield hfx.get_registry()
    hfx.registry.reset()


@pytest.fixture
def registered(registry):
    """``registered(name, cls, paper, factory=None)``: assert that the optim plugin declares the optimizer ``name``
    (available, with ``paper``, with ``[optim.<name>]`` options), that ``hfx`` and ``hfx_optim`` export ``cls`` under
    its name and that ``hfx_optim`` exports ``factory``."""
    import hfx_optim

    def check(name: str, cls: type, paper: tuple[str, str], factory: type | None = None) -> None:
        contribution = registry.get("optimizer", name)
        assert contribution.available and contribution.plugin == "optim"
        assert contribution.paper == paper
        assert name in registry.option_values("optim")  # plugins.toml [optim.<name>] defaults are accepted
        assert getattr(hfx, cls.__name__) is cls and getattr(hfx_optim, cls.__name__) is cls
        assert factory is None or getattr(hfx_optim, factory.__name__) is factory

    return check


@pytest.fixture
def sft_trainer():
    """``sft_trainer(output_dir, **config)``: an SFTTrainer on the shared tiny Qwen2 and the tiny language-modeling set,
    with the kit's fast settings and ``max_length=32``. Config and trainer are hfx-extended unless
    ``extend_config``/``extend_trainer`` is False; ``trainer_kwargs`` go to the trainer."""
    from trl import SFTConfig, SFTTrainer

    def make(output_dir, *, extend_config: bool = True, extend_trainer: bool = True, trainer_kwargs=None, **config):
        config_cls = hfx.extend(SFTConfig) if extend_config else SFTConfig
        trainer_cls = hfx.extend(SFTTrainer) if extend_trainer else SFTTrainer
        args = fast_training_args(config_cls, output_dir, **{"max_length": 32, **config})
        return trainer_cls(model=str(shared_tiny_model_dir("qwen2")), args=args,
                           train_dataset=make_tiny_datasets()["language_modeling"], **(trainer_kwargs or {}))

    return make


@pytest.fixture
def train_all():
    """``train_all(trainer)``: train, assert that every step ran and every trainable parameter changed, and return the
    optimizer (unwrapped from accelerate)."""

    def run(trainer):
        before = snapshot_params(trainer.model)
        trainer.train()
        assert trainer.state.global_step == trainer.args.max_steps
        changed = params_changed(before, trainer.model)
        assert set(changed) == set(before), f"unchanged: {sorted(set(before) - set(changed))}"
        return unwrap_optimizer(trainer.optimizer)

    return run


@pytest.fixture
def cpu_mesh(tmp_path):
    """A one-process gloo device mesh on the CPU, for DTensor (FSDP2-style) parameters."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.fixture(params=["torch", "triton"])
def kernel_backend(request, monkeypatch):
    """Runs a test on both kernel paths (``HFX_KERNELS``): torch, and Triton (its interpreter on a CPU-only machine;
    skipped where Triton cannot run). The optimizers' results must not depend on the path."""
    if request.param == "triton":
        from hfx_kernels.testing import triton_runnable_on_cpu

        ok, why = triton_runnable_on_cpu()
        if not ok:
            pytest.skip(why)
    monkeypatch.setenv("HFX_KERNELS", request.param)
    return request.param
