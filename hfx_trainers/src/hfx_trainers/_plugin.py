"""Entry point of hfx-trainers (group ``hfx``): declares the trainers and owns the ``[trainers]`` table.

Imports only hfx and the standard library: discovery must not import torch or trl."""

from hfx import hookimpl

SPIN_PAPER = ("Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models", "2401.01335")


@hookimpl
def hfx_register(registry):
    registry.options("trainers", {})
    registry.trainer(
        "spin",
        "hfx_trainers.spin:SPINTrainer",
        config="hfx_trainers.spin:SPINConfig",
        dataset_format="preference",
        description="SPIN (one iteration): DPO-style logistic/hinge loss, real answers vs the opponent's generations",
        paper=SPIN_PAPER,
        requires={"trl": ">=1.16"},
    )
