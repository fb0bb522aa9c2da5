"""Root conftest (always loaded): the hfx test kit's fixtures for every package's tests, Triton's interpreter on
machines without a GPU, and the real packages imported before pytest's importlib mode can shadow `hfx_optim` etc.
with the folders of the same name at the repo root."""

import importlib
import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter; it must be chosen before Triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

for _package in ("hfx", "hfx_kernels", "hfx_optim", "hfx_attention", "hfx_trainers"):
    importlib.import_module(_package)

pytest_plugins = ["hfx.testing"]
