"""Which implementation runs, and the host-side plumbing every multi-tensor Triton kernel shares.

Dispatch (DESIGN §3): Triton on CUDA tensors when Triton is installed, torch elsewhere. ``HFX_KERNELS=torch|triton``,
``plugins.toml [kernels] backend`` or a trainer's ``hfx_kernels`` force one (:func:`hfx.kernel_backend`). Forcing
Triton on CPU tensors needs ``TRITON_INTERPRET=1`` (Triton's interpreter, which the test suite uses).

Triton stays optional: this module imports it lazily, and ``triton`` / ``tl`` are None without it.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Sequence

import torch
from torch import Tensor

import hfx

try:  # Linux only; absent on macOS/Windows and in a torch-only install
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = tl = None

# Elements one program of a multi-tensor kernel handles (a tensor is split into chunks of this size).
CHUNK = 4096  # the fastest on an H100 by `benchmarks/kernels.py --tune`, within 2% of 16384 and 65536 at BLOCK 1024
BLOCK = 1024


def triton_available() -> bool:
    """Whether the Triton implementations can run here (Triton installed, on Linux)."""
    return triton is not None and platform.system() == "Linux"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, set before Triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2-sharded parameter or gradient)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def use_triton(tensors: Sequence[Tensor], kernel: str) -> bool:
    """Whether ``kernel`` runs its Triton implementation on ``tensors`` (all its tensor arguments) under the backend
    in force. "auto" keeps strided tensors (e.g. channels-last weights) on the torch path, which takes any layout.
    DTensors (FSDP2 shards) always take the torch path: the kernels index local storage, while torch's DTensor
    dispatch all-reduces what spans shards (e.g. MARS's per-tensor norm)."""
    backend = hfx.kernel_backend()
    if backend == "torch" or not tensors or any(is_dtensor(t) for t in tensors):
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_available() and all(t.is_contiguous() for t in tensors)
    if not triton_available():
        raise RuntimeError(f"the kernel backend is 'triton' but Triton is not installed here, so {kernel!r} cannot "
                           "run it: pip install 'hfx-kernels[triton]' (Linux), or set HFX_KERNELS=torch / auto")
    if not on_cuda and not interpreting():
        raise RuntimeError(f"the kernel backend is 'triton' but {kernel!r} got CPU tensors: Triton runs on CUDA; on "
                           "the CPU only its interpreter can run it (TRITON_INTERPRET=1, for tests). Use "
                           "HFX_KERNELS=auto to take the torch path on CPU tensors")
    return True


def check_contiguous(tensors: Sequence[Tensor], what: str, kernel: str) -> None:
    """Triton kernels index tensors as flat arrays: refuse a strided one, naming it and the fix."""
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(f"{kernel}: {what}[{i}] (shape {tuple(t.shape)}) is not contiguous; the Triton kernel "
                             "needs contiguous tensors: pass t.contiguous(), or use HFX_KERNELS=torch")


def check_same_shapes(lists: dict[str, Sequence[Tensor]], kernel: str) -> None:
    """Every list has one tensor per parameter, of the first list's shapes."""
    (first_name, first), *rest = lists.items()
    for name, tensors in rest:
        if len(tensors) != len(first):
            raise ValueError(f"{kernel}: {name} has {len(tensors)} tensors for {len(first)} {first_name}")
        for i, (a, b) in enumerate(zip(first, tensors)):
            if a.shape != b.shape:
                raise ValueError(f"{kernel}: {name}[{i}] has shape {tuple(b.shape)}, {first_name}[{i}] has "
                                 f"{tuple(a.shape)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the arithmetic: float64 for float64 tensors, float32 otherwise (bf16/fp16 storage)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def tl_dtype(dtype: torch.dtype):
    """The Triton element type of a torch dtype."""
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16, torch.int8: tl.int8, torch.uint8: tl.uint8, torch.int32: tl.int32,
            torch.int64: tl.int64}[dtype]


def group_by_dtype(n: int, *lists: Sequence[Tensor | None]) -> dict[tuple, list[int]]:
    """Indices ``0..n-1`` grouped by the device and dtypes of their tensors in ``lists``: one launch per group, since a
    kernel's pointer element types are compile-time constants."""
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        first = next(lst[i] for lst in lists if lst is not None)
        key = (first.device, *(None if lst is None else lst[i].dtype for lst in lists))
        groups.setdefault(key, []).append(i)
    return groups


@functools.lru_cache(maxsize=256)
def _chunk_table(numels: tuple[int, ...], device: torch.device, chunk: int) -> tuple[Tensor, Tensor, int]:
    """``([tensor id of each chunk | its start offset], numels, number of chunks)`` on ``device``, built once per
    set of sizes: an optimizer steps the same tensors every time, and rebuilding this on the host every step would
    cost more than the kernel on a GPU."""
    counts = torch.tensor([-(-n // chunk) for n in numels], dtype=torch.int64)
    tensor_of_chunk = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    start_of_chunk = (torch.arange(len(tensor_of_chunk)) - first_chunk[tensor_of_chunk]) * chunk
    chunks = torch.cat([tensor_of_chunk, start_of_chunk]).to(device)
    return chunks, torch.tensor(numels, dtype=torch.int64).to(device), len(tensor_of_chunk)


class TensorTable:
    """The device-side tables a multi-tensor kernel reads: one int64 address per tensor for each list, the tensors'
    sizes, per-tensor float scalars, and a chunk table (which tensor and which offset each program handles)."""

    def __init__(self, numels: Sequence[int], device: torch.device, chunk: int | None = None):
        self.device = device
        self.chunks, self.numels, self.num_chunks = _chunk_table(tuple(numels), device, chunk or CHUNK)

    def ints(self, values: Sequence[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

    def addresses(self, tensors: Sequence[Tensor]) -> Tensor:
        return self.ints([t.data_ptr() for t in tensors])

    def floats(self, values: Sequence[float], dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)
