"""Cross-package test fixtures: offline environment, a fresh plugin registry, and fake installed distributions."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
                     "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

PLUGINS_DIR = Path(__file__).parent / "plugins"
if str(PLUGINS_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGINS_DIR))  # test-only plugin modules and their targets



@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A clean working directory (no plugins.toml), no hfx env switches, and a registry rebuilt on first use."""
    import hfx.registry

    monkeypatch.chdir(tmp_path)
    for var in ("HFX_PLUGINS_TOML", "HFX_DISABLE_PLUGINS", "HFX_DISABLE_PLUGIN_AUTOLOAD", "HFX_TRACE_PLUGINS",
                "HFX_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    hfx.registry.reset()
    yield tmp_path
    hfx.registry.reset()


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Install a fake distribution on sys.path: ``fake_dist("pkg", {"ep": "mod"}, {"mod": "source"})``."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    created: list[str] = []

    def make(dist: str, entry_points: dict[str, str], modules: dict[str, str] | None = None, version="1.0"):
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[hfx]\n{eps}")
        for module, source in (modules or {}).items():
            (site / f"{module}.py").write_text(textwrap.dedent(source))
            created.append(module)
        return info

    yield make
    for module in created:
        sys.modules.pop(module, None)


@pytest.fixture
def with_test_plugin(isolated, fake_dist):
    """The test-only plugin (tests/plugins/hfx_test_plugin.py) installed as a distribution with an entry point."""
    fake_dist("hfx-testplugin", {"testplugin": "hfx_test_plugin"})
    sys.modules.pop("hfx_test_targets", None)
    return isolated
