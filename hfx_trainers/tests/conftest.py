"""Shared helpers of the hfx_trainers tests."""

from __future__ import annotations

import pytest
import torch


def _summed_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    """Σ log p(completion token | prefix) with a plain forward and log_softmax (no TRL code, no fused head)."""
    out = []
    with torch.no_grad():
        for p, c in zip(prompt_ids, completion_ids):
            ids = torch.tensor([list(p) + list(c)])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            targets = ids[0, len(p):]
            out.append(logprobs[len(p) - 1:-1].gather(-1, targets[:, None]).sum())
    return torch.stack(out)


@pytest.fixture
def summed_logps():
    """The policy-independent log-prob oracle: ``summed_logps(model, prompt_ids, completion_ids) -> (B,)``."""
    return _summed_logps


def _logged(trainer, key: str, step: int = 1) -> float:
    return next(h[key] for h in trainer.state.log_history if h.get("step") == step and key in h)


@pytest.fixture
def logged():
    """``logged(trainer, key, step=1)``: a value the trainer logged at a step."""
    return _logged
