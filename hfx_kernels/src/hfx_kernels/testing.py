"""The shared test helper for hfx kernels: :class:`TritonKernelConformance` runs a kernel's Triton implementation (on
the CPU under ``TRITON_INTERPRET=1``, on CUDA when there is a GPU) against its torch reference across dtypes and odd
shapes: sizes that are not multiples of the block, empty, one element, and strided inputs (handled or rejected with
a clear error)::

    class TestSignSGD(TritonKernelConformance):
        dtypes = (torch.float32, torch.bfloat16)
        modifies_inputs = True
        def make_inputs(self, shape, dtype, device): ...
        def reference(self, p, g): sign_sgd_reference(p, g, lr=0.1); return p
        def kernel(self, p, g): sign_sgd_triton(p, g, lr=0.1); return p

The suite forces ``HFX_KERNELS=triton`` while it runs, so ``kernel`` may also call the dispatching function.
"""

from __future__ import annotations

import pytest
import torch

from hfx.testing import KernelConformance
from hfx_kernels._backend import BLOCK, interpreting, triton_available


def triton_runnable() -> tuple[bool, str]:
    """Whether Triton kernels can run in this process, and why not."""
    if not triton_available():
        return False, "Triton is not installed (pip install 'hfx-kernels[triton]', Linux)"
    if not torch.cuda.is_available() and not interpreting():
        return False, "no CUDA device and TRITON_INTERPRET is not set (set it before Triton is imported)"
    return True, ""


def triton_runnable_on_cpu() -> tuple[bool, str]:
    """Whether Triton kernels can take CPU tensors here (only in its interpreter), and why not."""
    ok, why = triton_runnable()
    if ok and not interpreting():
        return False, "Triton takes CPU tensors only in its interpreter (TRITON_INTERPRET=1); this machine has CUDA"
    return ok, why


def kernel_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TritonKernelConformance(KernelConformance):
    """:class:`hfx.testing.KernelConformance` for a Triton kernel: odd shapes around the block size, the device the
    kernel runs on, and the ``triton`` backend forced."""

    __test__ = False
    shapes = ((0,), (1,), (7,), (BLOCK + 1,), (3, 5, 17), (2, 33, 65))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    device = kernel_device()

    @pytest.fixture(autouse=True)
    def _triton_backend(self, monkeypatch):
        ok, why = triton_runnable()
        if not ok:
            pytest.skip(why)
        monkeypatch.setenv("HFX_KERNELS", "triton")
