"""The core kit's attention conformance suite (DESIGN §2) for every module in a configuration that must equal the
model it was applied to: sinks/H2O with a budget longer than the text, GRAPE's exact grafts, TPA's GQA conversion and
CASTLE at init match SDPA on a left-padded batch and in greedy ``generate``, on Llama, Qwen2, Qwen3 and Mistral.
(Softplus attention changes the function by design; its own tests check it against its formula.)"""

from __future__ import annotations

import pytest

import hfx
from hfx.testing import AttentionConformance, tiny_model

pytestmark = pytest.mark.floor


class Applied(AttentionConformance):
    __test__ = False
    method: str = ""
    options: dict = {}

    def apply(self, model):
        return hfx.attention.apply(model, self.method, **self.options)


class TestSinksLongWindow(Applied):
    __test__ = True
    method, options = "sinks", {"num_sink_tokens": 2, "window": 64}


class TestH2OLargeBudget(Applied):
    __test__ = True
    method, options = "h2o", {"heavy": 32, "recent": 32}


@pytest.mark.parametrize("variant", ["rope", "learned", "contextual", "alibi", "fox", "keygated"])
class TestGrapeGraft(Applied):
    __test__ = True
    method = "grape"

    @pytest.fixture(autouse=True)
    def _variant(self, variant):
        self.options = {"variant": variant}


class TestTPAFromGQA(Applied):
    __test__ = True
    method, options = "tpa", {"init": "gqa"}

    def reference(self, model, family):  # TPA replaces q/k/v by factors: compare with the model it was built from
        return tiny_model(family, attn_implementation="sdpa")


class TestCastleGraft(Applied):
    __test__ = True
    method, options = "castle", {}
