"""hfx-optim: see the hfx README. Import-light: contributions are declared in `_plugin.py` as strings, and the
optimizers below are imported (with torch) on first access, e.g. ``hfx_optim.MARS``."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "MARS": "hfx_optim.mars",
    "mars_adamw_step": "hfx_optim.mars",
    "mars_lion_step": "hfx_optim.mars",
    "mars_shampoo_step": "hfx_optim.mars",
    "adamw_1d_step": "hfx_optim.mars",
    "GaLore2": "hfx_optim.galore2",
    "GaLore2Factory": "hfx_optim.galore2",
    "galore_adamw_step": "hfx_optim.galore2",
    "Fira": "hfx_optim.fira",
    "FiraFactory": "hfx_optim.fira",
    "fira_adamw_step": "hfx_optim.fira",
    "ECO": "hfx_optim.eco",
    "ECOFactory": "hfx_optim.eco",
    "ECOMemoryReport": "hfx_optim.eco",
    "eco_memory_report": "hfx_optim.eco",
    "eco_adam_step": "hfx_optim.eco",
    "eco_sgdm_step": "hfx_optim.eco",
    "FRUGAL": "hfx_optim.frugal",
    "FRUGALFactory": "hfx_optim.frugal",
    "frugal_step": "hfx_optim.frugal",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hfx_optim' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})
