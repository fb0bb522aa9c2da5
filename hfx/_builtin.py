"""The core's own plugin (registered first, as ``hfx.builtin``): it resolves the ``hfx_optimizer`` and
``hfx_attention`` fields of hfx trainer configs through the same hooks third-party plugins use."""

from __future__ import annotations

from .hookspecs import hookimpl


@hookimpl(trylast=True)
def hfx_create_optimizer(model, args, trainer):
    hfx_args = getattr(trainer, "hfx_args", {})
    if not hfx_args.get("hfx_optimizer"):
        return None
    from .compose import optimizer, trainer_optimizer_defaults

    cls, kwargs = optimizer(hfx_args["hfx_optimizer"], **hfx_args["hfx_optimizer_args"])
    return cls, {**trainer_optimizer_defaults(cls, args), **kwargs}


@hookimpl(trylast=True)
def hfx_configure_model(model, args, trainer):
    hfx_args = getattr(trainer, "hfx_args", {})
    if hfx_args.get("hfx_attention"):
        from .attention import apply

        apply(model, hfx_args["hfx_attention"], **hfx_args["hfx_attention_args"])
