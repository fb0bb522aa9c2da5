"""Plugin host: discovery, bad plugins, version ranges, env switches and plugins.toml."""

from __future__ import annotations

import pytest

import hfx
from hfx.registry import HfxPluginError, get_registry, load
from hfx.settings import HfxConfigError, load_settings

pytestmark = pytest.mark.floor

GOOD = """
from hfx import hookimpl

@hookimpl
def hfx_register(registry):
    registry.optimizer("good_opt", "torch.optim:SGD", description="plain SGD")
"""


def test_suite_packages_are_discovered(isolated):
    reg = get_registry()
    for name, dist in [("trainers", "hfx-trainers"), ("optim", "hfx-optim"), ("attention", "hfx-attention"),
                       ("kernels", "hfx-kernels")]:
        assert reg.plugins[name].status == "loaded"
        assert reg.plugins[name].dist == dist
    assert reg.option_values("kernels") == {"backend": "auto"}


def test_contribution_from_entry_point_loads_lazily(isolated, fake_dist):
    fake_dist("hfx-good", {"good": "hfx_good_mod"}, {"hfx_good_mod": GOOD})
    reg = get_registry()
    c = reg.get("optimizer", "good_opt")
    assert (c.plugin, c.description, c.available) == ("good", "plain SGD", True)
    import torch

    assert c.load() is torch.optim.SGD


def test_import_error_warns_and_skips(isolated, fake_dist):
    fake_dist("hfx-broken", {"broken": "hfx_broken_mod"}, {"hfx_broken_mod": "import no_such_module_xyz\n"})
    with pytest.warns(RuntimeWarning, match=r"skipping plugin 'broken'.*no_such_module_xyz.*HFX_DISABLE_PLUGINS=broken"):
        reg = get_registry()
    assert reg.plugins["broken"].status == "failed"
    assert "trainers" in reg.plugins  # the others still load


def test_import_error_of_required_plugin_is_an_error(isolated, fake_dist):
    fake_dist("hfx-broken", {"broken": "hfx_broken_mod2"}, {"hfx_broken_mod2": "raise RuntimeError('boom')\n"})
    (isolated / "plugins.toml").write_text('[plugins]\nrequired = ["broken"]\n')
    with pytest.raises(HfxPluginError, match=r"required plugin 'broken'.*RuntimeError: boom.*pip install broken"):
        get_registry()


def test_misspelled_hook_names_plugin_and_hook(isolated, fake_dist):
    src = "from hfx import hookimpl\n\n@hookimpl\ndef hfx_registr(registry):\n    pass\n"
    fake_dist("hfx-typo", {"typo": "hfx_typo_mod"}, {"hfx_typo_mod": src})
    with pytest.raises(HfxPluginError, match=r"plugin 'typo' \(from hfx-typo 1.0\).*unknown hook 'hfx_registr'"):
        get_registry()


def test_hookimpl_argument_not_in_spec(isolated, fake_dist):
    src = "from hfx import hookimpl\n\n@hookimpl\ndef hfx_register(registry, extra):\n    pass\n"
    fake_dist("hfx-badarg", {"badarg": "hfx_badarg_mod"}, {"hfx_badarg_mod": src})
    with pytest.raises(HfxPluginError, match=r"(?s)plugin 'badarg'.*hfx_register.*extra"):
        get_registry()


def test_duplicate_plugin_name_from_two_distributions(isolated, fake_dist):
    fake_dist("hfx-one", {"same": "hfx_dup_one"}, {"hfx_dup_one": GOOD})
    fake_dist("hfx-two", {"same": "hfx_dup_two"}, {"hfx_dup_two": "x = 1\n"})
    with pytest.raises(HfxPluginError, match=r"two installed distributions define the hfx plugin 'same'"):
        get_registry()


def test_duplicate_contribution_names_both_plugins(isolated, fake_dist):
    fake_dist("hfx-a", {"a_plugin": "hfx_dup_a"}, {"hfx_dup_a": GOOD})
    fake_dist("hfx-b", {"b_plugin": "hfx_dup_b"}, {"hfx_dup_b": GOOD})
    with pytest.raises(HfxPluginError, match=r"'a_plugin' and 'b_plugin' both register the optimizer 'good_opt'"):
        get_registry()


def test_duplicate_in_process_plugin_name(isolated):
    import types

    with pytest.raises(HfxPluginError, match=r"plugin 'hfx.builtin'.*already registered"):
        load(plugins=[("hfx.builtin", types.ModuleType("again"))])


def test_unmet_version_range_is_listed_unavailable(isolated, fake_dist):
    src = """
from hfx import hookimpl

@hookimpl
def hfx_register(registry):
    registry.optimizer("future_opt", "torch.optim:SGD", requires={"transformers": ">=99"})
    registry.optimizer("needs_missing", "torch.optim:SGD", requires={"no-such-dist-xyz": ">=1"})
    registry.trainer("FutureThing", "torch.optim:Adagrad", config="torch.optim:Adamax", requires={"torch": "<1"})
"""
    fake_dist("hfx-future", {"future": "hfx_future_mod"}, {"hfx_future_mod": src})
    reg = get_registry()
    c = reg.get("optimizer", "future_opt")
    assert not c.available and c.unavailable.startswith("needs transformers>=99 (installed ")
    assert reg.get("optimizer", "needs_missing").unavailable == "needs no-such-dist-xyz>=1 (not installed)"
    with pytest.raises(ImportError, match="unavailable"):
        c.load()
    with pytest.raises(AttributeError, match=r"hfx.Adamax \(plugin 'future'\) is unavailable: needs torch<1"):
        hfx.Adamax  # noqa: B018
    from hfx.cli import plugin_rows

    rows = {r[2]: r[5] for r in plugin_rows(reg)}
    assert rows["future_opt"].startswith("unavailable: needs transformers>=99")


def test_required_plugin_missing_gives_pip_command(isolated):
    (isolated / "plugins.toml").write_text('[plugins]\nrequired = ["fancy", "optim"]\n')
    with pytest.raises(HfxPluginError, match=r"'fancy' is required by .*plugins.toml.*pip install fancy"):
        get_registry()


def test_required_suite_plugin_blocked_names_extra(isolated, monkeypatch):
    (isolated / "plugins.toml").write_text('[plugins]\nrequired = ["trainers"]\n')
    monkeypatch.setenv("HFX_DISABLE_PLUGINS", "trainers")
    with pytest.raises(HfxPluginError, match=r"'trainers' is required by .* but disabled \(HFX_DISABLE_PLUGINS=trainers is set\)"):
        get_registry()


def test_unknown_plugins_key_lists_valid_ones(isolated):
    (isolated / "plugins.toml").write_text('[plugins]\nenabled = ["*"]\n')
    with pytest.raises(HfxConfigError, match=r"unknown key\(s\) enabled in \[plugins\].*valid keys: enable, disable, required"):
        get_registry()


def test_unknown_option_key_lists_valid_ones(isolated):
    (isolated / "plugins.toml").write_text('[kernels]\nbackend = "triton"\nbackends = "x"\n')
    with pytest.raises(HfxConfigError, match=r"unknown key 'backends' in \[kernels\].*plugin 'kernels'.*valid keys: backend"):
        get_registry()


def test_unknown_table_and_wrong_type(isolated):
    (isolated / "plugins.toml").write_text("[nosuch]\na = 1\n")
    with pytest.raises(HfxConfigError, match=r"unknown table \[nosuch\].*valid tables: plugins, attention, kernels"):
        get_registry()
    hfx.registry.reset()
    (isolated / "plugins.toml").write_text("[kernels]\nbackend = 3\n")
    with pytest.raises(HfxConfigError, match=r"\[kernels\] backend .* must be a str, got 3"):
        get_registry()


def test_option_table_values_reach_the_plugin(isolated):
    (isolated / "plugins.toml").write_text('[kernels]\nbackend = "torch"\n')
    assert get_registry().option_values("kernels") == {"backend": "torch"}
    assert hfx.kernel_backend() == "torch"


def test_table_of_a_suite_plugin_not_installed_is_ignored(isolated, monkeypatch):
    monkeypatch.setenv("HFX_DISABLE_PLUGINS", "optim")
    (isolated / "plugins.toml").write_text("[optim]\n")
    assert "optim" not in get_registry().plugins or get_registry().plugins["optim"].status == "disabled"


def test_enable_and_disable_lists(isolated):
    (isolated / "plugins.toml").write_text('[plugins]\nenable = ["optim", "kernels"]\n')
    reg = get_registry()
    assert reg.plugins["optim"].status == "loaded" and reg.plugins["trainers"].status == "disabled"
    hfx.registry.reset()
    (isolated / "plugins.toml").write_text('[plugins]\ndisable = ["kernels"]\n')
    reg = get_registry()
    assert reg.plugins["kernels"].status == "disabled" and reg.plugins["optim"].status == "loaded"


def test_unknown_plugin_in_enable_warns(isolated):
    (isolated / "plugins.toml").write_text('[plugins]\nenable = ["*", "nosuch"]\n')
    with pytest.warns(RuntimeWarning, match=r"names plugin 'nosuch', which is not installed"):
        get_registry()


def test_env_disable_plugins(isolated, monkeypatch):
    monkeypatch.setenv("HFX_DISABLE_PLUGINS", "trainers, attention")
    reg = get_registry()
    assert reg.plugins["trainers"].status == "disabled" and reg.plugins["attention"].status == "disabled"
    assert reg.plugins["optim"].status == "loaded"


def test_env_disable_autoload(isolated, monkeypatch):
    monkeypatch.setenv("HFX_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert list(get_registry().plugins) == ["hfx.builtin"]


def test_env_trace_plugins(isolated, monkeypatch, capfd):
    monkeypatch.setenv("HFX_TRACE_PLUGINS", "1")
    get_registry()
    err = capfd.readouterr().err
    assert "[hfx]" in err and "hfx_register" in err


def test_settings_lookup_order(isolated, monkeypatch):
    (isolated / "pyproject.toml").write_text('[tool.hfx.plugins]\ndisable = ["from-pyproject"]\n')
    assert load_settings().disable == ["from-pyproject"]
    (isolated / "plugins.toml").write_text('[plugins]\ndisable = ["from-plugins-toml"]\n')
    assert load_settings().disable == ["from-plugins-toml"]
    env_file = isolated / "elsewhere.toml"
    env_file.write_text('[plugins]\ndisable = ["from-env"]\n')
    monkeypatch.setenv("HFX_PLUGINS_TOML", str(env_file))
    assert load_settings().disable == ["from-env"]
    monkeypatch.setenv("HFX_PLUGINS_TOML", str(isolated / "missing.toml"))
    with pytest.raises(HfxConfigError, match="does not exist"):
        load_settings()


def test_shipped_plugins_toml_is_valid(monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("HFX_PLUGINS_TOML", str(root / "plugins.toml"))
    reg = load()
    assert reg.settings.enable == ["*"] and reg.option_values("kernels")["backend"] == "auto"
