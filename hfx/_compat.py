"""The one place that branches on transformers/trl versions (DESIGN §1). Import-light: versions are read from
package metadata, and the heavy libraries are imported only inside functions."""

from __future__ import annotations

from functools import cache
from importlib import metadata

from packaging.version import Version


@cache
def version(dist: str) -> Version | None:
    try:
        return Version(metadata.version(dist))
    except metadata.PackageNotFoundError:
        return None


def transformers_v5() -> bool:
    v = version("transformers")
    return v is not None and v.major >= 5


def is_optimizer_factory(obj) -> bool:
    """hfx's factory protocol is transformers 5's: anything that is not an ``Optimizer`` subclass is a class whose
    instances are called as ``factory()(model, **kwargs)``. 4.56 has no such protocol, so hfx applies it itself."""
    import torch

    return not (isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer))


def checkpointing_field(config_cls) -> str:
    """transformers 5 renamed ``gradient_checkpointing`` (TRL configs default it to True) to
    ``activation_checkpointing`` and warns on the old name: the field this version's ``config_cls`` has."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def trainer_has_factory_protocol() -> bool:
    """Whether a plain ``Trainer`` builds ``optimizer_cls_and_kwargs`` factories itself (transformers >= 5); on
    4.56 only hfx-extended trainers do (``HfxTrainerMixin.create_optimizer``)."""
    return transformers_v5()
