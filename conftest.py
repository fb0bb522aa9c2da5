"""Root conftest (always loaded): the hfx test kit's fixtures for every package's tests, and the real packages imported
before pytest's importlib mode can shadow `hfx_optim` etc. with the folders of the same name at the repo root."""

import importlib

for _package in ("hfx", "hfx_kernels", "hfx_optim", "hfx_attention", "hfx_trainers"):
    importlib.import_module(_package)

pytest_plugins = ["hfx.testing"]
