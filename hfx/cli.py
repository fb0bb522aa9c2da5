"""The ``hfx`` command line.

    hfx env                      versions of the stack and the plugin table
    hfx plugins list|check       what is installed / exit 1 when something is broken
    hfx demo                     the main job: warm start + every available method on the toy task
    hfx <method> [--config x.yaml] [--flag value ...]
                                 train with a registered trainer (TRL-style; YAML values, then flags)

Commands contributed by plugins (``registry.cli``) are listed from their declared help and imported only when run.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib import metadata

from .registry import HfxPluginError, get_registry
from .settings import HfxConfigError

IMPORT_STRING = re.compile(r"[\w.]+:[\w.]+")  # "module:attr": the contribution extras that name code
STACK = ("hfx", "torch", "transformers", "trl", "accelerate", "peft", "datasets", "triton", "pluggy")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def plugin_rows(registry) -> list[tuple[str, ...]]:
    """(plugin, kind, name, package, version, status) for every plugin and contribution."""
    rows = []
    for info in sorted(registry.plugins.values(), key=lambda i: i.name):
        pkg, version = info.dist or "-", info.version or "-"
        contributions = [c for c in registry.contributions() if c.plugin == info.name]
        if info.status != "loaded":
            rows.append((info.name, "plugin", "-", pkg, version, f"{info.status}: {info.error}" if info.error else info.status))
        elif not contributions and info.name != "hfx.builtin":
            rows.append((info.name, "plugin", "-", pkg, version, "loaded (no contributions yet)"))
        for c in sorted(contributions, key=lambda c: (c.kind, c.name)):
            rows.append((info.name, c.kind, c.name, pkg, version, "available" if c.available else f"unavailable: {c.unavailable}"))
    return rows


def format_table(header: tuple[str, ...], rows: list[tuple]) -> str:
    rows = [tuple(str(x) for x in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


PLUGIN_HEADER = ("plugin", "kind", "name", "package", "version", "status")


def cmd_env(args) -> int:
    print(f"Python: {platform.python_version()} ({platform.platform()})")
    for dist in STACK:
        print(f"{dist}: {_version(dist)}")
    registry = get_registry()
    print(f"plugins.toml: {registry.settings.source or 'none (defaults)'}")
    print()
    print(format_table(PLUGIN_HEADER, plugin_rows(registry)))
    return 0


def cmd_plugins(args) -> int:
    if args.action == "list":
        print(format_table(PLUGIN_HEADER, plugin_rows(get_registry())))
        return 0
    # check: discovery errors, failed imports, unavailable contributions, targets that do not import
    registry = get_registry()
    problems = [f"plugin {i.name!r}: {i.error}" for i in registry.plugins.values() if i.status == "failed"]
    for c in registry.contributions():
        if not c.available:
            problems.append(f"{c.kind} {c.name!r} ({c.plugin}): {c.unavailable}")
        elif args.import_targets:
            for key in ("target", *[k for k in c.extras if IMPORT_STRING.fullmatch(c.extras[k] or "")]):
                try:
                    c.load(key)
                except Exception as e:
                    problems.append(f"{c.kind} {c.name!r} ({c.plugin}): {key} {c.extras.get(key, c.target)} "
                                    f"does not import: {type(e).__name__}: {e}")
    for p in problems:
        print(f"problem: {p}")
    loaded = sum(i.status == "loaded" for i in registry.plugins.values())
    print(f"{loaded} plugins loaded, {len(registry.contributions())} contributions, {len(problems)} problems")
    return 1 if problems else 0


def build_parser(registry) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfx", description="hfx: new trainers, optimizers and attention for HF Trainer/TRL, as plugins."
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.add_parser("env", help="versions of the stack and the plugin table").set_defaults(func=cmd_env)
    plugins = sub.add_parser("plugins", help="list or check the installed plugins")
    plugins.add_argument("action", choices=["list", "check"])
    plugins.add_argument("--no-import", dest="import_targets", action="store_false",
                         help="check: do not import each contribution's target")
    plugins.set_defaults(func=cmd_plugins)
    demo = sub.add_parser("demo", help="warm-start the tiny model on the toy task, run each available method, "
                                       "print a results table and save a loss plot")
    from .demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(func=lambda a: __import__("hfx.demo", fromlist=["run"]).run(a))
    # Trainers and plugin commands: argparse only lists them; their own parsers take the remaining arguments.
    for c in registry.contributions("trainer"):
        sub.add_parser(c.name, help=f"train with {c.target.rpartition(':')[2]}: {c.description}", add_help=False)
    for c in registry.contributions("cli"):
        sub.add_parser(c.name, help=c.description, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        registry = get_registry()
        if argv and not argv[0].startswith("-"):
            for kind in ("trainer", "cli"):
                if argv[0] in registry.names(kind):
                    return _run_contributed(registry.get(kind, argv[0]), argv[1:])
        parser = build_parser(registry)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return args.func(args) or 0
    except (HfxPluginError, HfxConfigError) as e:
        print(f"hfx: error: {e}", file=sys.stderr)
        return 2


def _run_contributed(contribution, argv: list[str]) -> int:
    if not contribution.available:
        print(f"hfx: {contribution.name} is unavailable: {contribution.unavailable}", file=sys.stderr)
        return 2
    if contribution.kind == "cli":
        return contribution.load()(argv) or 0
    from .scripts import run_trainer

    return run_trainer(contribution, argv) or 0


if __name__ == "__main__":
    sys.exit(main())
