"""Entry point of hfx-optim (group ``hfx``): declares the optimizers and owns the ``[optim]`` table.

Imports only hfx and the standard library: discovery must not import torch."""

from hfx import hookimpl

MARS_PAPER = ("MARS: Unleashing the Power of Variance Reduction for Training Large Models", "2411.10438")
GALORE2_PAPER = ("GaLore 2: Large-Scale LLM Pre-Training by Gradient Low-Rank Projection", "2504.20437")
FIRA_PAPER = ("Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?", "2410.01623")
ECO_PAPER = ("ECO: Quantized Training without Full-Precision Master Weights", "2601.22101")
FRUGAL_PAPER = ("FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training", "2411.07837")


@hookimpl
def hfx_register(registry):
    # [optim.<name>] sub-tables of plugins.toml give an optimizer default keyword arguments, e.g. [optim.mars] gamma
    registry.options("optim", {"mars": {}, "galore2": {}, "fira": {}, "eco": {}, "frugal": {}})
    registry.optimizer(
        "mars",
        "hfx_optim.mars:MARS",
        demo="hfx_optim.demo:mars",
        description="MARS: AdamW/Lion/Shampoo on a variance-reduced, norm-clipped gradient (approximate or exact)",
        paper=MARS_PAPER,
        requires={"torch": ">=2.4"},
    )
    registry.optimizer(
        "galore2",
        "hfx_optim.galore2:GaLore2",
        demo="hfx_optim.demo:galore2",
        factory="hfx_optim.galore2:GaLore2Factory",
        description="GaLore 2: Adam in a low-rank gradient subspace of the Linear weights, refreshed by randomized SVD",
        paper=GALORE2_PAPER,
        requires={"torch": ">=2.6"},  # named parameter groups (param_names) name the parameter in errors
    )
    registry.optimizer(
        "fira",
        "hfx_optim.fira:Fira",
        demo="hfx_optim.demo:fira",
        factory="hfx_optim.fira:FiraFactory",
        description="Fira: low-rank Adam plus the norm-scaled, norm-growth-limited residual (full-rank updates)",
        paper=FIRA_PAPER,
        requires={"torch": ">=2.6"},
    )
    registry.optimizer(
        "eco",
        "hfx_optim.eco:ECO",
        demo="hfx_optim.demo:eco",
        factory="hfx_optim.eco:ECOFactory",
        description="ECO: Adam/SGDM without master weights; Linear weights held on an INT8/INT4/FP8 grid, the "
        "quantization error injected into the momentum",
        paper=ECO_PAPER,
        requires={"torch": ">=2.6"},  # named parameter groups (param_names) name the parameter in errors
    )
    registry.optimizer(
        "frugal",
        "hfx_optim.frugal:FRUGAL",
        demo="hfx_optim.demo:frugal",
        factory="hfx_optim.frugal:FRUGALFactory",
        description="FRUGAL: AdamW on a subspace of each Linear gradient (block/SVD/random/coordinates), signSGD or "
        "SGD on the rest (full-rank updates)",
        paper=FRUGAL_PAPER,
        requires={"torch": ">=2.6"},  # named parameter groups (param_names) name the parameter in errors
    )
