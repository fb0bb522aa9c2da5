"""Entry point of hfx-optim (group ``hfx``): declares the optimizers and owns the ``[optim]`` table."""

from hfx import hookimpl


@hookimpl
def hfx_register(registry):
    registry.options("optim", {})
