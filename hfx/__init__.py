"""hfx: new trainers, optimizers, attention modules and kernels for Hugging Face Trainer and TRL, as plugins.

Everything resolves lazily (PEP 562): ``import hfx`` imports neither torch, transformers nor trl, and
``hfx.SPINTrainer`` imports its module on first access::

    import hfx

    trainer_cls = hfx.SPINTrainer                       # from hfx-trainers: pip install "hfx[trainers]"
    optimizer_cls_and_kwargs = hfx.optimizer("mars", lr=3e-3)
    Trainer = hfx.extend(transformers.Trainer)          # hfx_optimizer / hfx_attention fields on any trainer
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> "module:attr" for the core's own API, resolved on first access (keeps `import hfx` light).
_CORE = {
    "hookimpl": "hfx.hookspecs:hookimpl",
    "hookspec": "hfx.hookspecs:hookspec",
    "extend": "hfx.compose:extend",
    "optimizer": "hfx.compose:optimizer",
    "kernel_backend": "hfx.compose:kernel_backend",
    "HfxArguments": "hfx.compose:HfxArguments",
    "HfxTrainerMixin": "hfx.compose:HfxTrainerMixin",
    "get_registry": "hfx.registry:get_registry",
    "HfxPluginError": "hfx.registry:HfxPluginError",
    "HfxConfigError": "hfx.settings:HfxConfigError",
    "checkpointing_field": "hfx._compat:checkpointing_field",
}
_SUBMODULES = ("attention", "cli", "compose", "hookspecs", "registry", "settings", "testing", "toy", "demo")

__all__ = [*_CORE, "__version__"]


def __getattr__(name: str):
    if name.startswith("_"):  # private names and submodules being imported: never a contribution
        raise AttributeError(name)
    if name in _CORE:
        module, _, attr = _CORE[name].partition(":")
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"hfx.{name}")
    else:
        value = _resolve_contribution(name)
    globals()[name] = value  # cache: the next access does not come back here
    return value


def _resolve_contribution(name: str):
    from .registry import extra_for, get_registry

    registry = get_registry()
    found = registry.find_export(name)
    if found is None:
        extra = extra_for(name)
        if extra and extra in registry.plugins and registry.plugins[extra].status == "loaded":
            info = registry.plugins[extra]
            raise AttributeError(
                f"hfx.{name} is not in the installed {info.dist} {info.version}; upgrade it: "
                f'pip install -U "hfx[{extra}]"'
            )
        if extra:
            raise AttributeError(
                f"hfx.{name} is provided by hfx-{extra}, which is not installed (or disabled in plugins.toml / "
                f'HFX_DISABLE_PLUGINS): pip install "hfx[{extra}]"'
            )
        raise AttributeError(f"module 'hfx' has no attribute {name!r}; see `hfx plugins list` for what is available")
    contribution, key = found
    if not contribution.available:
        raise AttributeError(f"hfx.{name} (plugin {contribution.plugin!r}) is unavailable: {contribution.unavailable}")
    return contribution.load(key)


def __dir__():
    from .registry import get_registry

    return sorted({*globals(), *_CORE, *_SUBMODULES, *get_registry().exported_names()})


def _cache_clear():
    """Drop cached contributions (after the registry is reset); the core API stays."""
    keep = {*_CORE, *_SUBMODULES}
    for name in [n for n in globals() if not n.startswith("_") and n not in keep and n not in _STATIC]:
        del globals()[name]


_STATIC = frozenset(globals())
