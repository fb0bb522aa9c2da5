"""Entry point of hfx-trainers (group ``hfx``): declares the trainers and owns the ``[trainers]`` table."""

from hfx import hookimpl


@hookimpl
def hfx_register(registry):
    registry.options("trainers", {})
