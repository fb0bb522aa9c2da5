"""Entry point of hfx-optim (group ``hfx``): declares the optimizers and owns the ``[optim]`` table.

Imports only hfx and the standard library: discovery must not import torch."""

from hfx import hookimpl

MARS_PAPER = ("MARS: Unleashing the Power of Variance Reduction for Training Large Models", "2411.10438")


@hookimpl
def hfx_register(registry):
    # [optim.<name>] sub-tables of plugins.toml give an optimizer default keyword arguments, e.g. [optim.mars] gamma
    registry.options("optim", {"mars": {}})
    registry.optimizer(
        "mars",
        "hfx_optim.mars:MARS",
        description="MARS: AdamW/Lion/Shampoo on a variance-reduced, norm-clipped gradient (approximate or exact)",
        paper=MARS_PAPER,
        requires={"torch": ">=2.4"},
    )
