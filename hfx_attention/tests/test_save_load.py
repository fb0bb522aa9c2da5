"""A model saved after hfx.attention.apply comes back with hfx.attention.from_pretrained: the modules rebuilt from
config.hfx_attention and every weight loaded, the modules' own (changed from their init, as after training)
included, each read once (hfx reads only what the base model could not take)."""

from __future__ import annotations

import pytest
import torch

import hfx
from hfx.testing import left_padded_batch, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.floor


@pytest.mark.parametrize(("name", "options"), [("grape", {"variant": "fox"}), ("tpa", {"init": "gqa",
                                                                                        "contextual": True}),
                                                ("castle", {}), ("sinks", {"num_sink_tokens": 2, "window": 8})])
def test_saved_model_comes_back_with_its_modules(name, options, tmp_path, monkeypatch):
    read, read_weights = [], hfx.attention._read_weights
    monkeypatch.setattr(hfx.attention, "_read_weights",
                        lambda path, files, names: read.extend(names) or read_weights(path, files, names))
    model = tiny_model("qwen2", attn_implementation="sdpa")
    base_names = set(model.state_dict())
    hfx.attention.apply(model, name, **options)
    assert model.config.hfx_attention == [{"name": name, "options": options}]
    with torch.no_grad():  # move every weight off its graft value, as training would
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = left_padded_batch(tiny_tokenizer())
    keep = batch["attention_mask"].bool()
    model.save_pretrained(tmp_path)
    loaded = hfx.attention.from_pretrained(tmp_path).eval()
    assert hfx.attention.applied(loaded) == [name] and loaded.config.hfx_attention == model.config.hfx_attention
    assert sorted(read) == sorted(set(model.state_dict()) - base_names)  # the modules' own weights, nothing twice
    with torch.no_grad():
        want, got = model.eval()(**batch).logits[keep], loaded(**batch).logits[keep]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    hfx.attention.revert(loaded)
    assert not hasattr(loaded.config, "hfx_attention")


def test_a_model_never_patched_loads_as_is(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    loaded = hfx.attention.from_pretrained(tmp_path)
    assert hfx.attention.applied(loaded) == [] and type(loaded) is type(model)
