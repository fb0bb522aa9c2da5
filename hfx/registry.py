"""The plugin host: a pluggy ``PluginManager("hfx")`` fed by entry points, and the registry of contributions.

Discovery imports each plugin module (``hfx_optim._plugin`` ...) and calls its ``hfx_register(registry)`` hook;
plugins declare *strings*, so nothing heavy is imported until a contribution is used::

    import hfx.registry
    reg = hfx.registry.get_registry()            # discovery, once per process (cached)
    reg.names("optimizer")                       # ['mars', ...]
    cls = reg.get("optimizer", "mars").load()    # imports hfx_optim.mars on first use

Environment: ``HFX_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name, ``HFX_DISABLE_PLUGIN_AUTOLOAD=1``
skips entry points (only the built-in plugin and those passed to :func:`load` are used), ``HFX_TRACE_PLUGINS=1``
prints every hook call to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import MappingProxyType

import pluggy
from packaging.requirements import InvalidRequirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from . import hookspecs
from .settings import HfxConfigError, Settings, load_settings

ENTRY_POINT_GROUP = "hfx"
KINDS = ("trainer", "optimizer", "attention", "kernel", "cli")

# The suite's own distributions: entry-point name -> pip extra (for "pip install" hints).
EXTRAS = {"trainers": "trainers", "optim": "optim", "attention": "attention", "kernels": "kernels"}

# Public names each extra provides once its issue lands, so that `hfx.SPINTrainer` without hfx-trainers can say
# which extra to install (the plugin cannot say it: it is not installed).
CATALOG = {
    "trainers": (
        "SPINTrainer", "SPINConfig", "SPPOTrainer", "SPPOConfig", "RSPOTrainer", "RSPOConfig",
        "INPOTrainer", "INPOConfig", "RPGTrainer", "RPGConfig", "DRPOTrainer", "DRPOConfig",
        "SweetRLTrainer", "SweetRLConfig",
        "spin", "sppo", "rspo", "inpo", "rpg", "drpo", "sweet-rl",
    ),
    "optim": ("MARS", "GaLore2", "FRUGAL", "Fira", "ECO", "mars", "galore2", "frugal", "fira", "eco"),
    "attention": ("sinks", "h2o", "grape", "tpa", "castle", "softplus"),
    "kernels": (),
}


class HfxPluginError(RuntimeError):
    """A plugin that is required but missing or broken, or that breaks the plugin contract."""


def install_hint(plugin: str) -> str:
    """The pip command that installs the plugin named ``plugin`` (an entry-point name)."""
    if plugin in EXTRAS:
        return f'pip install "hfx[{EXTRAS[plugin]}]"'
    return f"pip install {plugin}"


def extra_for(name: str) -> str | None:
    """The extra that will provide the public name ``name``, if it is one of the suite's."""
    return next((extra for extra, names in CATALOG.items() if name in names), None)


@dataclass(frozen=True)
class Contribution:
    """One thing a plugin provides: a trainer, optimizer, attention module, kernel or CLI command.

    ``target`` (and the strings in ``extras``, e.g. a trainer's ``config``) are ``"module:attr"`` paths imported
    on first :meth:`load`. ``unavailable`` holds the reason when a declared version range does not hold.
    """

    kind: str
    name: str
    target: str
    plugin: str
    description: str = ""
    paper: tuple[str, str] | None = None  # (title, arXiv id)
    requires: Mapping[str, str] = field(default_factory=dict)  # distribution -> version specifier
    extras: Mapping[str, str] = field(default_factory=dict)  # kind-specific "module:attr" strings
    unavailable: str | None = None

    @property
    def available(self) -> bool:
        return self.unavailable is None

    def exports(self) -> dict[str, str]:
        """Attribute names this contribution puts on the ``hfx`` facade -> the key of the target to load."""
        if self.kind == "cli":
            return {}
        out = {self.target.rpartition(":")[2]: "target"}
        if "config" in self.extras:
            out[self.extras["config"].rpartition(":")[2]] = "config"
        return out

    def load(self, key: str = "target"):
        """Import and return the object at ``target`` (or at ``extras[key]``)."""
        if self.unavailable:
            raise ImportError(f"{self.kind} {self.name!r} from plugin {self.plugin!r} is unavailable: {self.unavailable}")
        return import_string(self.target if key == "target" else self.extras[key])


@dataclass
class PluginInfo:
    name: str
    dist: str | None = None
    version: str | None = None
    status: str = "loaded"  # loaded | disabled | failed
    error: str | None = None


def import_string(path: str):
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def check_requires(requires: Mapping[str, str]) -> str | None:
    """Return why the version ranges do not hold in this environment, or None when they do."""
    for dist, spec in requires.items():
        try:
            installed = metadata.version(dist)
        except metadata.PackageNotFoundError:
            return f"needs {dist}{spec} (not installed)"
        if installed not in SpecifierSet(spec, prereleases=True):
            return f"needs {dist}{spec} (installed {installed})"
    return None


class Registry:
    """What the loaded plugins contribute, their option tables and the hook caller (``registry.hook``)."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._contributions: dict[tuple[str, str], Contribution] = {}
        self._option_defaults: dict[str, tuple[str, dict]] = {}  # table -> (owner plugin, defaults)
        self._current: str | None = None  # plugin whose hfx_register is running

    @property
    def hook(self):
        return self.pm.hook

    # -- declarations, called by plugins from hfx_register -------------------------------------------------------
    def trainer(self, name, target, *, config, description="", paper=None, requires=None, demo=None, script=None,
                dataset_format="prompt_completion"):
        """A trainer and its config (``"pkg.mod:SPINTrainer"``, ``config="pkg.mod:SPINConfig"``); ``name`` is its
        ``hfx <name>`` command. ``dataset_format`` is the TRL dataset format it trains on (prompt_completion,
        preference, prompt, messages); ``script`` optionally points at a module with TRL-style
        ``make_parser``/``main`` used by ``hfx <name>`` instead of the generic runner."""
        extras = {"config": config, "demo": demo, "script": script, "dataset_format": dataset_format}
        self._add("trainer", name, target, description, paper, requires, extras)

    def optimizer(self, name, target, *, description="", paper=None, requires=None, factory=None, demo=None):
        """A ``torch.optim.Optimizer`` class; ``factory`` optionally points at a name-aware builder
        ``factory(model, **kwargs) -> Optimizer`` used when the optimizer needs parameter names."""
        self._add("optimizer", name, target, description, paper, requires, {"factory": factory, "demo": demo})

    def attention(self, name, target, *, mask=None, apply=None, description="", paper=None, requires=None, demo=None):
        """An attention function for transformers' ``AttentionInterface`` (``target``), its mask function (``mask``;
        default: the SDPA mask) and/or ``apply(model, **opts)`` for modules that need new parameters or caches."""
        self._add("attention", name, target, description, paper, requires, {"mask": mask, "apply": apply, "demo": demo})

    def kernel(self, name, target, *, reference, fuses="", dtypes=(), description="", requires=None):
        """A kernel (``target``) with its torch reference (``reference``); ``fuses`` says what it fuses."""
        extras = {"reference": reference, "fuses": fuses, "dtypes": ",".join(dtypes)}
        self._add("kernel", name, target, description, None, requires, extras)

    def cli(self, name, target, *, help=""):
        """An ``hfx <name>`` command: ``target`` is ``main(argv: list[str]) -> int | None``; ``help`` is shown by
        ``hfx --help`` without importing the command."""
        self._add("cli", name, target, help, None, None, {})

    def options(self, table: str, defaults: dict):
        """Own the ``plugins.toml`` table ``[table]``; its valid keys and types are those of ``defaults``."""
        if table in self._option_defaults:
            other = self._option_defaults[table][0]
            raise HfxPluginError(f"plugins {other!r} and {self._current!r} both declare the option table [{table}].")
        self._option_defaults[table] = (self._current, dict(defaults))

    def _add(self, kind, name, target, description, paper, requires, extras):
        key = (kind, name)
        if key in self._contributions:
            other = self._contributions[key].plugin
            raise HfxPluginError(
                f"plugins {other!r} and {self._current!r} both register the {kind} {name!r}; "
                f"disable one with HFX_DISABLE_PLUGINS={self._current}"
            )
        requires = dict(requires or {})
        try:
            unavailable = check_requires(requires)
        except (InvalidSpecifier, InvalidRequirement) as e:
            raise HfxPluginError(f"plugin {self._current!r}: bad version range for {kind} {name!r}: {e}") from e
        self._contributions[key] = Contribution(
            kind, name, target, self._current or "?", description, tuple(paper) if paper else None,
            MappingProxyType(requires), MappingProxyType({k: v for k, v in extras.items() if v}), unavailable,
        )

    # -- lookups --------------------------------------------------------------------------------------------------
    def contributions(self, kind: str | None = None) -> list[Contribution]:
        return [c for c in self._contributions.values() if kind is None or c.kind == kind]

    def names(self, kind: str, available_only: bool = False) -> list[str]:
        return sorted(c.name for c in self.contributions(kind) if c.available or not available_only)

    def get(self, kind: str, name: str) -> Contribution:
        """The contribution ``name`` of ``kind``; a KeyError lists the valid names and the extra to install."""
        try:
            return self._contributions[(kind, name)]
        except KeyError:
            valid = ", ".join(self.names(kind)) or "none installed"
            extra = extra_for(name)
            hint = f'; install it with pip install "hfx[{extra}]"' if extra else ""
            raise KeyError(f"no {kind} named {name!r} (available: {valid}){hint}") from None

    def find_export(self, attr: str) -> tuple[Contribution, str] | None:
        for c in self._contributions.values():
            key = c.exports().get(attr)
            if key:
                return c, key
        return None

    def exported_names(self) -> list[str]:
        return sorted({a for c in self._contributions.values() if c.available for a in c.exports()})

    def contribution_defaults(self, contribution: Contribution) -> dict:
        """Default keyword arguments for a contribution from ``plugins.toml``: the sub-table named after it in an
        option table its plugin owns (``[optim.mars] gamma = 0.025``)."""
        for table, (owner, _) in self._option_defaults.items():
            if owner == contribution.plugin:
                value = self.option_values(table).get(contribution.name)
                if isinstance(value, dict):
                    return dict(value)
        return {}

    def option_values(self, table: str) -> dict:
        """The options of ``[table]``: the owner's defaults overridden by ``plugins.toml``."""
        if table not in self._option_defaults:
            raise KeyError(f"no plugin declares the option table [{table}]")
        return {**self._option_defaults[table][1], **self.settings.tables.get(table, {})}

    # -- loading --------------------------------------------------------------------------------------------------
    def register_plugin(self, plugin, name: str, dist: str | None = None, version: str | None = None):
        """Register one plugin object/module and collect its contributions; raises HfxPluginError on contract
        violations (unknown hook, argument not in the spec, duplicate name)."""
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as e:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise HfxPluginError(
                f"plugin {name!r}{_from(dist, version)} breaks the hfx plugin contract: {e}. "
                f"Fix the plugin or disable it with HFX_DISABLE_PLUGINS={name}"
            ) from e
        self.plugins[name] = PluginInfo(name, dist, version)
        self._current = name
        try:
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            self.pm.subset_hook_caller("hfx_register", remove_plugins=others)(registry=self)
        finally:
            self._current = None

    def _validate_tables(self):
        known = set(self._option_defaults) | {t for t in CATALOG if getattr(self.plugins.get(t), 'status', None) != 'loaded'}
        for table, values in self.settings.tables.items():
            if table not in known:
                valid = ", ".join(["plugins", *sorted(self._option_defaults)])
                raise HfxConfigError(f"unknown table [{table}] in {self.settings.source}; valid tables: {valid}.")
            if table not in self._option_defaults:
                continue  # a table for a suite plugin that is not installed: nothing to check it against
            owner, defaults = self._option_defaults[table]
            for key, value in values.items():
                if key not in defaults:
                    raise HfxConfigError(
                        f"unknown key {key!r} in [{table}] of {self.settings.source} (owned by plugin {owner!r}); "
                        f"valid keys: {', '.join(sorted(defaults))}."
                    )
                default = defaults[key]
                if default is not None and not isinstance(value, type(default)):
                    raise HfxConfigError(
                        f"[{table}] {key} in {self.settings.source} must be a {type(default).__name__}, got {value!r}."
                    )


def _from(dist, version):
    return f" (from {dist} {version})" if dist else ""


def _csv_env(name: str) -> list[str]:
    return [s.strip() for s in os.environ.get(name, "").split(",") if s.strip()]


def _entry_points():
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def load(settings: Settings | None = None, plugins: Iterable[tuple[str, object]] = ()) -> Registry:
    """Build a registry: the built-in plugin, then ``plugins`` (``(name, obj)`` pairs), then every installed entry
    point of group ``hfx`` that ``plugins.toml`` and the environment allow. A plugin that fails to import is skipped
    with a warning, or raises :class:`HfxPluginError` when ``plugins.toml`` lists it as required."""
    from . import _builtin

    settings = settings if settings is not None else load_settings()
    reg = Registry(settings)
    if os.environ.get("HFX_TRACE_PLUGINS", "") not in ("", "0"):
        reg.pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[hfx] {msg}"))
        reg.pm.enable_tracing()
    blocked = set(_csv_env("HFX_DISABLE_PLUGINS"))
    for name in blocked:
        reg.pm.set_blocked(name)

    reg.register_plugin(_builtin, "hfx.builtin")
    for name, obj in plugins:
        reg.register_plugin(obj, name)

    found = set()
    if os.environ.get("HFX_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0"):
        for ep in _entry_points():
            found.add(ep.name)
            dist, version = (ep.dist.name, ep.dist.version) if ep.dist else (None, None)
            if ep.name in blocked or not settings.enabled(ep.name):
                reg.plugins[ep.name] = PluginInfo(ep.name, dist, version, "disabled")
                continue
            if ep.name in reg.plugins:
                raise HfxPluginError(
                    f"two installed distributions define the hfx plugin {ep.name!r} "
                    f"({reg.plugins[ep.name].dist} and {dist}); uninstall one of them."
                )
            try:
                module = ep.load()
            except Exception as e:  # a broken plugin must not take hfx down (pytest/OTel practice)
                reason = f"{type(e).__name__}: {e}"
                reg.plugins[ep.name] = PluginInfo(ep.name, dist, version, "failed", reason)
                if ep.name in settings.required:
                    raise HfxPluginError(
                        f"required plugin {ep.name!r}{_from(dist, version)} failed to import: {reason}. "
                        f"Reinstall it: {install_hint(ep.name)}"
                    ) from e
                warnings.warn(
                    f"hfx: skipping plugin {ep.name!r}{_from(dist, version)}: it failed to import ({reason}). "
                    f"Reinstall it ({install_hint(ep.name)}) or disable it with HFX_DISABLE_PLUGINS={ep.name}.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            reg.register_plugin(module, ep.name, dist, version)

    for name in settings.required:
        if name not in reg.plugins:
            raise HfxPluginError(
                f"plugin {name!r} is required by {settings.source or 'plugins.toml'} but is not installed: "
                f"{install_hint(name)}"
            )
        if reg.plugins[name].status == "disabled":
            raise HfxPluginError(
                f"plugin {name!r} is required by {settings.source} but disabled (HFX_DISABLE_PLUGINS={name}"
                f"{' is set' if name in blocked else ' is not set, so by [plugins] enable/disable'}); enable it."
            )
    for name in (*settings.enable, *settings.disable):
        if name != "*" and name not in found and name not in reg.plugins:
            warnings.warn(
                f"hfx: {settings.source} names plugin {name!r}, which is not installed "
                f"(installed: {', '.join(sorted(found)) or 'none'}).",
                RuntimeWarning,
                stacklevel=2,
            )
    reg._validate_tables()
    return reg


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built by :func:`load` on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load()
    return _REGISTRY


def reset(registry: Registry | None = None) -> None:
    """Forget (or replace) the process-wide registry; tests use it after changing plugins or settings."""
    global _REGISTRY
    _REGISTRY = registry
    import hfx

    hfx._cache_clear()
