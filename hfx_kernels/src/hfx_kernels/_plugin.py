"""Entry point of hfx-kernels (group ``hfx``): declares the kernels and owns the ``[kernels]`` table."""

from hfx import hookimpl


@hookimpl
def hfx_register(registry):
    # `backend`: auto = Triton on CUDA tensors, torch elsewhere; HFX_KERNELS and a trainer's hfx_kernels override it.
    registry.options("kernels", {"backend": "auto"})
