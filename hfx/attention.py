"""``hfx.attention``: apply a registered attention module to a model by name, and undo it.

Import-light (no torch at import). A plain attention function is selected with ``set_attn_implementation``; a module
that needs new parameters or a cache policy brings its own ``apply(model, **opts)`` (declared by its plugin). Every
change is recorded on the model, so :func:`revert` restores the original modules, rotary embedding and attention
implementation in reverse order::

    import hfx
    hfx.attention.apply(model, "sinks", num_sink_tokens=4, window=1020)
    ...
    hfx.attention.revert(model)

    hfx.attention.register()   # every hfx_<name> known to transformers: from_pretrained(..., attn_implementation=...)
    model = hfx.attention.from_pretrained("outputs/run")   # a model saved after apply: modules rebuilt, weights loaded
"""

from __future__ import annotations

from collections.abc import Callable

_UNDO = "_hfx_attention_undo"
_APPLIED = "_hfx_attention_applied"
CONFIG_KEY = "hfx_attention"  # [{"name", "options"}, ...] on model.config: what was applied, saved with the model


def apply(model, name: str, **opts):
    """Apply the attention module ``name`` (see ``hfx plugins list``) with its options; returns ``model``."""
    from .compose import apply_attention

    result = apply_attention(model, name, **opts)
    model = model if result is None else result
    model.__dict__.setdefault(_APPLIED, []).append(name)
    config = getattr(model, "config", None)
    if config is not None:  # saved with the model, so that from_pretrained below can rebuild the modules
        previous = getattr(config, CONFIG_KEY, None)
        setattr(config, CONFIG_KEY, [*(previous or []), {"name": name, "options": opts}])
        on_revert(model, lambda: setattr(config, CONFIG_KEY, previous) if previous is not None
                  else delattr(config, CONFIG_KEY))
    return model


def from_pretrained(path, model_class=None, **kwargs):
    """Load a model saved after :func:`apply` (e.g. by a trainer with ``hfx_attention=``): the base architecture,
    then the recorded modules applied again in order with their options (``config.hfx_attention``), then the saved
    weights the base model could not take (the modules' own). Every weight is read once. ``kwargs`` go to
    ``model_class.from_pretrained`` (default ``AutoModelForCausalLM``).

        >>> model = hfx.attention.from_pretrained("outputs/grape-run")    # doctest: +SKIP
    """
    import logging

    import transformers

    cls = model_class or transformers.AutoModelForCausalLM
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(logging.ERROR)  # the base class reports the modules' weights as unused
    try:
        model = cls.from_pretrained(path, **kwargs)
    finally:
        transformers.logging.set_verbosity(level)
    recorded = getattr(model.config, CONFIG_KEY, None) or []
    if not recorded:
        return model
    delattr(model.config, CONFIG_KEY)
    base = model.state_dict(keep_vars=True)  # what from_pretrained filled, by name
    for entry in recorded:
        apply(model, entry["name"], **entry["options"])
    current, saved = model.state_dict(keep_vars=True), _saved_files(path)
    missing = {k for k in current.keys() - saved.keys() if not _is_tied(model, k)}
    unexpected = saved.keys() - current.keys()
    if missing or unexpected:
        raise ValueError(f"{path}: the saved weights do not fit the model rebuilt with {recorded}: missing "
                         f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    model.load_state_dict(_read_weights(path, saved, _not_loaded(base, current, saved)), strict=False)
    return model


def _not_loaded(base: dict, current: dict, saved) -> list[str]:
    """The saved weights ``from_pretrained`` did not put in place: names the base model lacked, or whose tensor a
    module replaced (``base``/``current``: state dicts with ``keep_vars=True`` before and after the modules)."""
    return sorted(k for k in saved if current[k] is not base.get(k))


def _saved_files(path) -> dict[str, str]:
    """Weight name -> the safetensors file (in ``path``) holding it."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _read_weights(path, files: dict[str, str], names) -> dict:
    """The tensors ``names`` from the safetensors files of ``path`` (``files``: name -> file), read one by one."""
    from pathlib import Path

    from safetensors import safe_open

    state = {}
    for file in sorted({files[name] for name in names}):
        with safe_open(str(Path(path) / file), framework="pt") as f:
            state.update({name: f.get_tensor(name) for name in names if files[name] == file})
    return state


def _is_tied(model, key: str) -> bool:
    """Whether ``key`` is an output embedding tied to the input embedding (saved once, under the input's name)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (output is not None and key.startswith(next(n for n, m in model.named_modules() if m is output))
            and output.weight is model.get_input_embeddings().weight)


def register(name: str | None = None) -> list[str]:
    """Register the attention function of ``name`` (default: every installed one) with transformers, function and
    mask, so that ``attn_implementation="hfx_<name>"`` works in ``from_pretrained``/``from_config``/
    ``set_attn_implementation``; returns the keys. :func:`apply` registers what it uses by itself.

        >>> hfx.attention.register("softplus")                                  # doctest: +SKIP
        ['hfx_softplus']
    """
    from .compose import register_attention
    from .registry import get_registry

    names = [name] if name is not None else get_registry().names("attention", available_only=True)
    return [register_attention(n) for n in names]


def revert(model):
    """Undo every :func:`apply` on ``model`` (newest first); returns ``model``. A model never patched is unchanged."""
    undo = model.__dict__.pop(_UNDO, [])
    while undo:
        undo.pop()()
    model.__dict__.pop(_APPLIED, None)
    return model


def applied(model) -> list[str]:
    """Names of the attention modules applied to ``model`` and not reverted, oldest first."""
    return list(model.__dict__.get(_APPLIED, []))


def on_revert(model, undo: Callable[[], None]) -> None:
    """Record ``undo`` (a no-argument callable) to run when :func:`revert` is called on ``model``.

    For authors of ``apply`` functions: record one undo per change, right after making it."""
    model.__dict__.setdefault(_UNDO, []).append(undo)
