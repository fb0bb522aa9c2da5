"""Composition (DESIGN §3): the ``hfx_*`` config fields, the trainer mixin that resolves them through the registry,
``hfx.extend`` for any transformers/TRL trainer or config, and ``hfx.optimizer`` for ``optimizer_cls_and_kwargs``.

Example::

    import hfx
    from trl import SFTConfig, SFTTrainer

    Config, Trainer = hfx.extend(SFTConfig), hfx.extend(SFTTrainer)
    args = Config(output_dir="out", hfx_optimizer="mars", hfx_optimizer_args={"gamma": 0.025})
    Trainer(model="path/to/model", args=args, train_dataset=ds).train()

    # or, on a plain Trainer, without the fields:
    Trainer(model, args, optimizer_cls_and_kwargs=hfx.optimizer("mars", lr=3e-3))
"""

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass, field
from functools import cache

from .registry import get_registry

KERNEL_BACKENDS = ("auto", "torch", "triton")
HFX_FIELDS = ("hfx_optimizer", "hfx_optimizer_args", "hfx_attention", "hfx_attention_args", "hfx_kernels")


@dataclass
class HfxArguments:
    """The fields every hfx trainer config carries; mixed into configs by ``hfx.extend(ConfigCls)``."""

    hfx_optimizer: str | None = field(
        default=None, metadata={"help": "Name of a registered hfx optimizer (e.g. 'mars'); None keeps `optim`."}
    )
    hfx_optimizer_args: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for `hfx_optimizer` (a dict, or a JSON string)."}
    )
    hfx_attention: str | None = field(
        default=None, metadata={"help": "Name of a registered hfx attention module applied before training."}
    )
    hfx_attention_args: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for `hfx_attention` (a dict, or a JSON string)."}
    )
    hfx_kernels: str = field(
        default="auto", metadata={"help": "Kernel backend: auto (Triton on CUDA, torch elsewhere), torch or triton."}
    )

    def __post_init__(self):
        for name, value in normalize_hfx_args({f: getattr(self, f) for f in HFX_FIELDS}).items():
            setattr(self, name, value)
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()


def normalize_hfx_args(values: dict) -> dict:
    """Validate the ``hfx_*`` values: JSON strings become dicts, None becomes {}, the kernel backend is checked."""
    out = dict(values)
    for name in ("hfx_optimizer_args", "hfx_attention_args"):
        value = out.get(name)
        if value is None:
            value = {}
        elif isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name} must be a dict or a JSON object string, got {value!r} ({e})") from e
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict, got {type(value).__name__}: {value!r}")
        out[name] = value
    backend = out.get("hfx_kernels") or "auto"
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"hfx_kernels must be one of {', '.join(KERNEL_BACKENDS)}, got {backend!r}")
    out["hfx_kernels"] = backend
    for name in ("hfx_optimizer", "hfx_attention"):
        out.setdefault(name, None)
    return out


_kernel_backend_override: str | None = None


def kernel_backend() -> str:
    """The kernel backend in force: an hfx trainer's ``hfx_kernels`` (when not "auto"), else ``$HFX_KERNELS``, else
    ``plugins.toml [kernels] backend``, else "auto"."""
    if _kernel_backend_override:
        return _kernel_backend_override
    env = os.environ.get("HFX_KERNELS")
    if env:
        if env not in KERNEL_BACKENDS:
            raise ValueError(f"HFX_KERNELS must be one of {', '.join(KERNEL_BACKENDS)}, got {env!r}")
        return env
    reg = get_registry()
    try:
        return reg.option_values("kernels").get("backend", "auto")
    except KeyError:  # hfx-kernels not installed: nothing to choose between
        return "auto"


def optimizer(name: str, *, args=None, **kwargs):
    """Resolve a registered hfx optimizer to ``(cls_or_factory, kwargs)`` for
    ``Trainer(optimizer_cls_and_kwargs=...)``.

    Keyword arguments, from lowest to highest precedence: ``lr`` and any ``betas``/``eps``/``weight_decay`` the user
    set in ``args`` (a ``TrainingArguments``; ``Trainer`` itself passes only the kwargs given here), the optimizer's
    table in
    ``plugins.toml`` (e.g. ``[optim.mars] gamma = 0.025``), then ``kwargs``.

    >>> cls, kw = hfx.optimizer("mars", lr=3e-3, gamma=0.025)  # doctest: +SKIP
    """
    registry = get_registry()
    contribution = registry.get("optimizer", name)
    target = contribution.load("factory" if "factory" in contribution.extras else "target")
    defaults = trainer_optimizer_defaults(target, args) if args is not None else {}
    return target, {**defaults, **registry.contribution_defaults(contribution), **kwargs}


def trainer_optimizer_defaults(cls, args) -> dict:
    """Keyword arguments for ``cls`` from TrainingArguments: ``lr`` always (the scheduler's base), and ``betas``,
    ``eps``, ``weight_decay`` when the user changed them from TrainingArguments' defaults, so that an untouched
    ``adam_beta2=0.999`` does not override a paper's default (MARS: 0.99). HF's own path drops them entirely for
    third-party optimizers. For plain optimizer classes Trainer's param groups still set each group's weight decay."""
    from ._compat import is_optimizer_factory

    changed = {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != f.default}
    candidates = {"lr": args.learning_rate}
    if changed & {"adam_beta1", "adam_beta2"}:
        candidates["betas"] = (args.adam_beta1, args.adam_beta2)
    if "adam_epsilon" in changed:
        candidates["eps"] = args.adam_epsilon
    if "weight_decay" in changed:
        candidates["weight_decay"] = args.weight_decay
    try:
        params = inspect.signature(cls.__call__ if is_optimizer_factory(cls) else cls).parameters
    except (TypeError, ValueError):
        return {"lr": args.learning_rate}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {"lr": args.learning_rate}
    return {k: v for k, v in candidates.items() if k in params}


def attn_implementation_name(name: str) -> str:
    """The key under which an hfx attention is registered with transformers: ``"hfx_<name>"``."""
    return name if name.startswith("hfx_") else f"hfx_{name}"


def register_function(key: str, function, mask="sdpa") -> str:
    """Register ``function`` in transformers' ``AttentionInterface`` and a mask function in ``AttentionMaskInterface``
    under ``key`` (without the mask registration transformers builds no mask and padding is silently ignored);
    returns ``key``. ``mask`` is a mask function or the name of a built-in one (``"sdpa"``: boolean, True = attend)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(key, function)
    AttentionMaskInterface.register(key, ALL_MASK_ATTENTION_FUNCTIONS[mask] if isinstance(mask, str) else mask)
    return key


def register_attention(name: str) -> str:
    """Register a plain attention contribution (function + mask) with transformers and return its key."""
    contribution = get_registry().get("attention", name)
    mask = contribution.load("mask") if "mask" in contribution.extras else "sdpa"
    return register_function(attn_implementation_name(name), contribution.load(), mask)


def set_attention(model, key: str) -> None:
    """Select the registered attention ``key`` on ``model``, reversibly (``hfx.attention.revert``)."""
    from .attention import on_revert

    previous = model.config._attn_implementation
    model.set_attn_implementation(key)
    on_revert(model, lambda: model.set_attn_implementation(previous))


def apply_attention(model, name: str, **opts):
    """Apply the registered attention ``name`` to ``model``: its ``apply(model, **opts)`` when it has one, else its
    attention function through ``set_attn_implementation``."""
    contribution = get_registry().get("attention", name)
    if "apply" in contribution.extras:
        return contribution.load("apply")(model, **opts)
    if opts:
        raise ValueError(f"attention {name!r} is a plain attention function and takes no options; got {sorted(opts)}")
    set_attention(model, register_attention(name))
    return model


class HfxTrainerMixin:
    """Gives any ``transformers.Trainer`` subclass the hfx fields and lifecycle hooks. Use ``hfx.extend(cls)``.

    The ``hfx_*`` values come from ``args`` (when its class has the fields) and may be overridden by keyword
    arguments of the constructor. ``optimizer_cls_and_kwargs`` is accepted even by trainers whose ``__init__``
    lacks it (TRL's DPO/GRPO/KTO/RLOO).
    """

    def __init__(self, *args, **kwargs):
        overrides = {k: kwargs.pop(k) for k in HFX_FIELDS if k in kwargs}
        late_optimizer = None
        if "optimizer_cls_and_kwargs" in kwargs and not _accepts(super().__init__, "optimizer_cls_and_kwargs"):
            late_optimizer = kwargs.pop("optimizer_cls_and_kwargs")
        super().__init__(*args, **kwargs)
        if late_optimizer is not None:
            if self.optimizer is not None:
                raise RuntimeError("Passing both `optimizers` and `optimizer_cls_and_kwargs` is incompatible.")
            self.optimizer_cls_and_kwargs = late_optimizer
        self.hfx_args = normalize_hfx_args({**{f: getattr(self.args, f, None) for f in HFX_FIELDS}, **overrides})
        if self.hfx_args["hfx_optimizer"] and (self.optimizer is not None or self.optimizer_cls_and_kwargs):
            raise ValueError(
                f"hfx_optimizer={self.hfx_args['hfx_optimizer']!r} conflicts with the optimizer passed to the "
                "trainer (`optimizers` or `optimizer_cls_and_kwargs`); use one of them."
            )
        registry = get_registry()
        for kind, key in (("optimizer", "hfx_optimizer"), ("attention", "hfx_attention")):
            if self.hfx_args[key]:
                try:
                    registry.get(kind, self.hfx_args[key])
                except KeyError as e:
                    raise ValueError(f"{key}={self.hfx_args[key]!r}: {e.args[0]}") from None
        global _kernel_backend_override
        _kernel_backend_override = None if self.hfx_args["hfx_kernels"] == "auto" else self.hfx_args["hfx_kernels"]

        hook = registry.hook
        for model in (self.model, getattr(self, "ref_model", None)):
            if model is not None:
                hook.hfx_configure_model(model=model, args=self.args, trainer=self)
        for callbacks in hook.hfx_trainer_callbacks(trainer=self, args=self.args):
            for callback in callbacks or ():
                self.add_callback(callback)

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            from ._compat import is_optimizer_factory

            result = get_registry().hook.hfx_create_optimizer(model=self.model, args=self.args, trainer=self)
            if isinstance(result, tuple):
                self.optimizer_cls_and_kwargs = result
            elif result is not None:
                self.optimizer = result
            if self.optimizer is None and self.optimizer_cls_and_kwargs is not None:
                cls, opt_kwargs = self.optimizer_cls_and_kwargs
                if is_optimizer_factory(cls):  # name-aware optimizers; 4.56's Trainer has no factory protocol
                    self.optimizer = cls()(self.model, **opt_kwargs)
        return super().create_optimizer(*args, **kwargs)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        get_registry().hook.hfx_post_train(trainer=self, output=output)
        return output


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _rebuild_args(base, state):
    obj = extend(base).__new__(extend(base))
    obj.__dict__.update(state)
    return obj


@cache
def extend(cls):
    """Return a subclass of ``cls`` with hfx composition: a trainer class gets :class:`HfxTrainerMixin`, a
    ``TrainingArguments`` dataclass gets the :class:`HfxArguments` fields. Idempotent and cached.

    >>> Trainer = hfx.extend(trl.DPOTrainer)  # doctest: +SKIP
    >>> Config = hfx.extend(trl.DPOConfig)  # doctest: +SKIP
    """
    import transformers

    if not isinstance(cls, type):
        raise TypeError(f"hfx.extend takes a class, got {cls!r}")
    if issubclass(cls, HfxTrainerMixin | HfxArguments):
        return cls
    namespace = {"__module__": __name__, "__qualname__": cls.__name__, "__doc__": cls.__doc__}
    if issubclass(cls, transformers.Trainer):
        return type(cls.__name__, (HfxTrainerMixin, cls), namespace)
    if dataclasses.is_dataclass(cls) and issubclass(cls, transformers.TrainingArguments):
        # Pickle as (base class, state): the dynamic class itself cannot be found by name (Trainer saves its args).
        namespace["__reduce__"] = lambda self: (_rebuild_args, (cls, dict(self.__dict__)))
        return dataclass(type(cls.__name__, (HfxArguments, cls), namespace))
    raise TypeError(
        f"hfx.extend takes a transformers.Trainer subclass or a TrainingArguments dataclass, got {cls.__qualname__}"
    )
