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


def rope_parameters(config) -> dict:
    """The rotary settings of ``config`` as one dict with ``rope_type`` and ``rope_theta`` (transformers 5 keeps them
    in ``config.rope_parameters``; 4.x in ``config.rope_scaling`` (None for default RoPE) and ``config.rope_theta``)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        scaling = dict(getattr(config, "rope_scaling", None) or {})
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        params = {"rope_type": rope_type, "rope_theta": config.rope_theta, **scaling}
    return dict(params)


def rope_config_overrides(rope_type: str, theta: float, **params) -> dict:
    """``config`` keyword arguments that select ``rope_type`` with ``params`` (e.g. ``factor``) on this version."""
    if transformers_v5():
        return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **params}}
    return {"rope_theta": theta, "rope_scaling": None if rope_type == "default" else {"rope_type": rope_type, **params}}


def cache_argument() -> str:
    """The name under which ``forward``/``generate`` take a cache object: ``cache`` from transformers 5.24 on
    (``past_key_values`` stays a deprecated alias), ``past_key_values`` before."""
    v = version("transformers")
    return "cache" if v is not None and v >= Version("5.24.0.dev0") else "past_key_values"


def output_cache(outputs):
    """The cache a model returned (``outputs.cache`` from 5.24, ``outputs.past_key_values`` before)."""
    return getattr(outputs, cache_argument())


def passed_cache(kwargs):
    """The cache object a ``forward``/``generate``/attention-module call was given (``kwargs``: its arguments by
    name): under ``cache`` (5.24 on) or ``past_key_values`` (before 5.24, a deprecated alias from 5.24); None when
    neither is set."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def mask_query_length(query) -> int:
    """The query length from the argument of a cache layer's ``get_mask_sizes``: the length itself (transformers
    >= 5.4) or ``cache_position``, one entry per new token (<= 5.3)."""
    return query if isinstance(query, int) else int(query.shape[0])
