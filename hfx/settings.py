"""``plugins.toml``: which plugins load, which are required, and per-plugin option tables.

Lookup order (the first that exists wins): ``$HFX_PLUGINS_TOML``, ``./plugins.toml``, ``[tool.hfx]`` in
``./pyproject.toml``. Example::

    [plugins]
    enable = ["*"]        # entry-point names to load; "*" = every installed plugin
    disable = []          # never load these
    required = ["optim"]  # missing or broken -> error with the pip command that fixes it

    [kernels]             # an option table, declared and validated by the plugin that owns it
    backend = "auto"

The ``[plugins]`` table is checked here; option tables are checked by :mod:`hfx.registry` once the plugins have
declared them (``registry.options(table, defaults)``).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

PLUGINS_KEYS = ("enable", "disable", "required")


class HfxConfigError(ValueError):
    """A ``plugins.toml`` (or ``[tool.hfx]``) that hfx cannot use; the message names the file and the fix."""


@dataclass
class Settings:
    enable: list[str] = field(default_factory=lambda: ["*"])
    disable: list[str] = field(default_factory=list)
    required: list[str] = field(default_factory=list)
    tables: dict[str, dict] = field(default_factory=dict)  # option tables, validated later by their owners
    source: Path | None = None

    def enabled(self, name: str) -> bool:
        return ("*" in self.enable or name in self.enable) and name not in self.disable


def find_settings_file(cwd: Path | None = None) -> tuple[Path, bool] | None:
    """Return ``(path, is_pyproject)`` of the settings in force, or None when there are none."""
    cwd = Path(cwd or os.getcwd())
    env = os.environ.get("HFX_PLUGINS_TOML")
    if env:
        path = Path(env)
        if not path.is_file():
            raise HfxConfigError(f"HFX_PLUGINS_TOML={env} does not exist; point it at a plugins.toml or unset it.")
        return path, False
    if (cwd / "plugins.toml").is_file():
        return cwd / "plugins.toml", False
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file() and "hfx" in _read_toml(pyproject).get("tool", {}):
        return pyproject, True
    return None


def load_settings(cwd: Path | None = None) -> Settings:
    """Read the settings in force (see the module docstring); defaults when no file is found."""
    found = find_settings_file(cwd)
    if found is None:
        return Settings()
    path, is_pyproject = found
    data = _read_toml(path)
    if is_pyproject:
        data = data["tool"]["hfx"]
    return parse_settings(data, source=path)


def parse_settings(data: dict, source: Path | None = None) -> Settings:
    where = f" in {source}" if source else ""
    plugins = data.get("plugins", {})
    if not isinstance(plugins, dict):
        raise HfxConfigError(f"[plugins]{where} must be a table with keys {', '.join(PLUGINS_KEYS)}.")
    unknown = sorted(set(plugins) - set(PLUGINS_KEYS))
    if unknown:
        raise HfxConfigError(
            f"unknown key(s) {', '.join(unknown)} in [plugins]{where}; valid keys: {', '.join(PLUGINS_KEYS)}."
        )
    lists = {}
    for key in PLUGINS_KEYS:
        value = plugins.get(key, ["*"] if key == "enable" else [])
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise HfxConfigError(f"[plugins] {key}{where} must be a list of plugin names, got {value!r}.")
        lists[key] = value
    tables = {k: v for k, v in data.items() if k != "plugins"}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise HfxConfigError(f"top-level key {name!r}{where} must be a table ([{name}]) of plugin options.")
    return Settings(**lists, tables=tables, source=source)


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise HfxConfigError(f"{path} is not valid TOML: {e}") from e
