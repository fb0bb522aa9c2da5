"""Targets of the test-only plugins (imported lazily, like a real plugin's modules)."""

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward


class WrappedSGD(torch.optim.SGD):
    """torch.optim.SGD under another name: proves hfx routes an optimizer name to a class with the right kwargs."""

    def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class SGDFactory:
    """The name-aware factory protocol (transformers 5's): instantiated with no arguments, called with the model."""

    calls: list = []

    def __call__(self, model, lr=1e-3, momentum=0.0, weight_decay=0.0):
        SGDFactory.calls.append(sorted(n for n, _ in model.named_parameters())[:1])
        return WrappedSGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


CALLS = {"attention": 0}


def counting_sdpa(*args, **kwargs):
    """SDPA attention that counts its calls: equal outputs to sdpa, and proof that it ran."""
    CALLS["attention"] += 1
    return sdpa_attention_forward(*args, **kwargs)


def apply_scaled_lm_head(model, factor=1.0):
    """An `apply`-style attention contribution (needs options): marks the model so the test can see it ran."""
    model.hfx_applied = {"factor": factor}
    return model
