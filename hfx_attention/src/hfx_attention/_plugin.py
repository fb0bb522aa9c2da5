"""Entry point of hfx-attention (group ``hfx``): declares the attention modules and owns the ``[attention]`` table."""

from hfx import hookimpl


@hookimpl
def hfx_register(registry):
    registry.options("attention", {})
