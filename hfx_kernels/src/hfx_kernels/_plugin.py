"""Entry point of hfx-kernels (group ``hfx``): declares the kernels and owns the ``[kernels]`` table.

Imports only hfx: discovery must not import torch or Triton. Each kernel is one module with its torch reference."""

from hfx import hookimpl

FLOATS = ("float32", "bfloat16", "float16", "float64")

KERNELS = {
    # name: (target, reference, what it fuses, parameter dtypes)
    "adamw_step": ("hfx_kernels.adamw:adamw_step", "hfx_kernels.adamw:adamw_step_reference",
                   "multi-tensor AdamW: moments, bias correction, decoupled decay (before/after), clip coefficient",
                   FLOATS),
}


@hookimpl
def hfx_register(registry):
    # `backend`: auto = Triton on CUDA tensors, torch elsewhere; HFX_KERNELS and a trainer's hfx_kernels override it.
    registry.options("kernels", {"backend": "auto"})
    for name, (target, reference, fuses, dtypes) in KERNELS.items():
        registry.kernel(name, target, reference=reference, fuses=fuses, dtypes=dtypes, requires={"torch": ">=2.4"})
