"""The hfx hook specifications (pluggy project ``"hfx"``).

A plugin is a module (or object) with functions marked ``@hfx.hookimpl`` whose names match the specs below.
Installed distributions expose their plugin module through the entry-point group ``hfx``::

    # pyproject.toml of a plugin distribution
    [project.entry-points.hfx]
    myplugin = "my_package._plugin"

    # my_package/_plugin.py -- may import only hfx and the standard library
    from hfx import hookimpl

    @hookimpl
    def hfx_register(registry):
        registry.optimizer("lion", "my_package.lion:Lion", description="Lion (Chen et al., 2023)")

An implementation may accept fewer arguments than its spec (pluggy passes only those it names), so specs can gain
arguments without breaking plugins. Every spec here is called by the suite; ``tests/test_hooks.py`` proves each
call point with a recording plugin.
"""

from __future__ import annotations

import pluggy

PROJECT = "hfx"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def hfx_register(registry):
    """Declare what the plugin contributes. Called once, at discovery, for every loaded plugin.

    Contributions are strings (``"package.module:Attr"``) so that discovery never imports torch, transformers or
    trl: ``registry.trainer(...)``, ``registry.optimizer(...)``, ``registry.attention(...)``, ``registry.kernel(...)``,
    ``registry.cli(...)`` and ``registry.options(table, defaults)`` (a ``plugins.toml`` option table the plugin owns).
    """


@hookspec
def hfx_configure_model(model, args, trainer):
    """Adjust the model before training starts; called once by every hfx-extended trainer at the end of its
    ``__init__`` (after TRL has loaded the model and wrapped it with PEFT). The built-in plugin applies
    ``args.hfx_attention`` here. Return value ignored."""


@hookspec
def hfx_trainer_callbacks(trainer, args):
    """Return a list of ``transformers.TrainerCallback`` to add to the trainer (or None). Called once per trainer,
    at the end of its ``__init__``, after ``hfx_configure_model``; results of all plugins are concatenated."""


@hookspec(firstresult=True)
def hfx_create_optimizer(model, args, trainer):
    """Create the optimizer: return an ``torch.optim.Optimizer`` instance, or ``(cls_or_factory, kwargs)`` as for
    ``Trainer(optimizer_cls_and_kwargs=...)``, or None to pass. Called by ``Trainer.create_optimizer`` when no
    optimizer was given; the first non-None result wins (the built-in plugin resolves ``args.hfx_optimizer``)."""


@hookspec
def hfx_post_train(trainer, output):
    """Called after ``trainer.train()`` returns, with its ``TrainOutput``. Return value ignored."""
