"""The `hfx.<Name>` facade: lazy, cached, helpful when a package is missing, and `import hfx` stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import hfx

pytestmark = pytest.mark.floor


def test_name_resolves_lazily_and_is_cached(with_test_plugin):
    assert "hfx_test_targets" not in sys.modules  # discovery imported only the plugin module
    cls = hfx.WrappedSGD
    assert "hfx_test_targets" in sys.modules
    from hfx_test_targets import WrappedSGD

    assert cls is WrappedSGD
    assert vars(hfx)["WrappedSGD"] is cls  # cached on the module: the next access skips __getattr__
    assert "WrappedSGD" in dir(hfx) and "extend" in dir(hfx)


def test_trainer_and_config_names(with_test_plugin):
    from hfx_test_trainers import ToySFTConfig, ToySFTTrainer

    assert hfx.ToySFTTrainer is ToySFTTrainer and hfx.ToySFTConfig is ToySFTConfig


def test_missing_extra_names_the_pip_command(isolated, monkeypatch):
    monkeypatch.setenv("HFX_DISABLE_PLUGINS", "trainers")
    with pytest.raises(AttributeError, match=r'hfx.SPINTrainer is provided by hfx-trainers.*pip install "hfx\[trainers\]"'):
        hfx.SPINTrainer  # noqa: B018


def test_unknown_name_is_a_plain_attribute_error(isolated):
    with pytest.raises(AttributeError, match=r"module 'hfx' has no attribute 'NoSuchThing'"):
        hfx.NoSuchThing  # noqa: B018
    assert not hasattr(hfx, "_private_thing")


IMPORT_PROBE = """
import json, sys, time
t = time.perf_counter()
import hfx
t_import = time.perf_counter() - t
reg = hfx.get_registry()
t_total = time.perf_counter() - t
print(json.dumps({"import": t_import, "discovery": t_total, "plugins": sorted(reg.plugins),
                  "heavy": [m for m in ("torch", "transformers", "trl") if m in sys.modules]}))
"""


def test_import_and_discovery_leave_heavy_modules_out():
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["heavy"] == []
    assert {"trainers", "optim", "attention", "kernels"} <= set(result["plugins"])
