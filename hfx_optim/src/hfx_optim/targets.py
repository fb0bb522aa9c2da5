"""Name-aware parameter grouping shared by the optimizers that treat some matrices specially (GaLore 2, Fira,
FRUGAL, ...): which ``nn.Linear`` weights get the method, which parameters stay on plain AdamW (embeddings,
``lm_head``, norms, biases), and HF's decay/no-decay split.

Example::

    groups = param_groups(model, "all-linear", weight_decay=0.01, target_options={"rank": 64})
    optimizer = GaLore2(groups, lr=1e-3)   # groups holding "rank" are projected; the others run AdamW

    # or, for Trainer(optimizer_cls_and_kwargs=...), through the factory protocol of transformers 5:
    Trainer(..., optimizer_cls_and_kwargs=hfx.optimizer("galore2", rank=64, target_modules="all-linear"))
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

# Trainer.get_decay_parameter_names: no decay for LayerNorm modules and for these names.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
TARGET_FLAG = "hfx_target"  # param-group key marking the groups the method applies to


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters Trainer applies weight decay to (same rule as ``Trainer.get_decay_parameter_names``)."""
    no_decay_modules = {
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm)
        for param_name, _ in module.named_parameters(recurse=False)
    }
    pattern = re.compile("|".join(NO_DECAY_PATTERNS))
    return {
        name for name, _ in model.named_parameters()
        if name not in no_decay_modules and not pattern.search(name.lower())
    }


def target_parameter_names(model: nn.Module, target_modules: str | Iterable[str] = "all-linear") -> list[str]:
    """Weights of the ``nn.Linear`` modules selected by ``target_modules``:

    - ``"all-linear"``: every Linear except the output head (``lm_head``/output embeddings, often tied to the input
      embeddings);
    - a list of names: modules whose name equals one of them or ends with ``.<name>`` (``["q_proj", "v_proj"]``);
    - any other string: a regular expression matched (``re.search``) against full module names.

    Raises ``ValueError`` naming the pattern and some Linear modules when nothing matches.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output]
    if target_modules == "all-linear":
        chosen = linears
    elif isinstance(target_modules, str):
        regex = re.compile(target_modules)
        chosen = [(n, m) for n, m in linears if regex.search(n)]
    else:
        names = list(target_modules)
        chosen = [(n, m) for n, m in linears if any(n == t or n.endswith(f".{t}") for t in names)]
    if not chosen:
        sample = ", ".join(n for n, _ in linears[:6]) or "none"
        raise ValueError(
            f"target_modules={target_modules!r} matches no nn.Linear of {type(model).__name__} "
            f"(Linear modules include: {sample}); use 'all-linear', a list of module names, or a regex."
        )
    return [f"{name}.weight" for name, _ in chosen]


def param_groups(
    model: nn.Module,
    target_modules: str | Iterable[str] = "all-linear",
    *,
    weight_decay: float = 0.0,
    target_options: dict | None = None,
) -> list[dict]:
    """Up to four param groups: targeted weights (carrying ``target_options`` and ``hfx_target=True``) and the rest,
    each split into decay (``weight_decay``) and no-decay (0.0) as Trainer does. Groups hold named parameters, so
    the optimizer records ``param_names`` (used in error messages). Frozen parameters are left out."""
    targets = set(target_parameter_names(model, target_modules))
    decay = decay_parameter_names(model)
    buckets: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((name in targets, name in decay), []).append((name, param))
    groups = []
    for (is_target, is_decay), named in sorted(buckets.items(), reverse=True):
        group = {"params": named, "weight_decay": weight_decay if is_decay else 0.0, TARGET_FLAG: is_target}
        if is_target:
            group.update(target_options or {})
        groups.append(group)
    return groups


class ModelOptimizerFactory:
    """Builds a name-aware optimizer from a model: transformers 5's factory protocol (``Factory()(model, **kw)``),
    which hfx's trainers also honour on transformers 4.56. A subclass sets ``optimizer_cls`` and ``target_keys``
    (the keyword arguments that belong to the targeted groups only, e.g. ``rank``)."""

    optimizer_cls: type = None  # set by subclasses
    target_keys: tuple[str, ...] = ()

    def __call__(self, model: nn.Module, *, target_modules="all-linear", weight_decay: float = 0.0, **kwargs):
        target_options = {k: kwargs.pop(k) for k in self.target_keys if k in kwargs}
        groups = param_groups(model, target_modules, weight_decay=weight_decay, target_options=target_options)
        return self.optimizer_cls(groups, weight_decay=weight_decay, **kwargs)
