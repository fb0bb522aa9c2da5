"""Softplus attention (spec C7, Part E 22-23): the weights against a plain re-derivation of the formula, rows >= 0
summing to 1, masked entries exactly 0, padding invariance, sliding windows, generation with a cache, training
through an hfx trainer config, the untrained-model warning, revert and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import hfx
from hfx.testing import (
    FAMILIES,
    fast_training_args,
    generate_greedy,
    left_padded_batch,
    make_tiny_datasets,
    params_changed,
    snapshot_params,
    tiny_model,
    tiny_tokenizer,
)
from hfx_attention import softplus
from hfx_attention.softplus import SoftplusOptions, UntrainedSoftplusWarning, softplus_attention_forward

pytestmark = pytest.mark.floor

TOK = tiny_tokenizer()


class FakeModule(torch.nn.Module):
    def __init__(self, opts=None, scaling=0.5):
        super().__init__()
        self.scaling = scaling
        if opts is not None:
            self.hfx_softplus = opts


def weights(module, q, k, mask):
    """The attention matrix: with v = identity (T_k = D) the output rows are the weights. (B, H, Tq, Tk)"""
    b, hkv, tk, d = k.shape
    assert tk == d
    v = torch.eye(d, dtype=q.dtype).expand(b, hkv, d, d)
    out, _ = softplus_attention_forward(module, q, k, v, mask, scaling=module.scaling)
    return out.transpose(1, 2)


def reference(q, k, keep, *, qk_norm=True, scaling=0.5, power=1.0):
    """softplus(λ_i s_ij) M_ij / Σ_k, λ_i = log N_i, s = log D q̂·k̂ (paper) or scaling q·k; LSSAR per the kernel doc."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    if qk_norm:
        s = math.log(q.shape[-1]) * (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2))
    else:
        s = scaling * q @ k.transpose(-1, -2)
    n = keep.sum(-1, keepdim=True).to(q.dtype)
    f = torch.where(keep, F.softplus(torch.log(n.clamp(min=1)) * s), torch.zeros_like(s))
    a = f / f.sum(-1, keepdim=True)
    if power != 1.0:
        u = (n * a - (n > 3).to(q.dtype)).clamp(min=0) ** power
        a = u / u.sum(-1, keepdim=True)
    return a


def padded_case(tq=5):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, tq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    keep = torch.ones(2, 1, tq, 8, dtype=torch.bool).tril(8 - tq)
    keep[1, :, :, :3] = False  # row 1 left-padded by 3
    return q, k, keep


@pytest.mark.parametrize("opts", [dict(), dict(qk_norm=False), dict(power=3.0)], ids=["lssa", "model-logits", "lssar"])
def test_weights_match_formula_rows_sum_to_one_masked_exactly_zero(opts):
    q, k, keep = padded_case()
    module = FakeModule(SoftplusOptions(qk_norm=opts.get("qk_norm", True), power=opts.get("power", 1.0)))
    a = weights(module, q, k, keep)
    torch.testing.assert_close(a, reference(q, k, keep.expand(2, 4, -1, -1), **opts), atol=1e-12, rtol=0)
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (a.masked_select(~keep.expand_as(a)) == 0).all()
    # an additive float mask (0 / finfo.min) and None (bottom-right causal) give the same as the bool forms
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
    assert torch.equal(weights(module, q, k, additive), a)
    causal = torch.ones(1, 1, 5, 8, dtype=torch.bool).tril(3)
    assert torch.equal(weights(module, q, k, None), weights(module, q, k, causal))


def test_padding_invariance_against_unpadded_rows():
    model = tiny_model("qwen2", attn_implementation="hfx_softplus")
    texts = ["Hi", "What is 12 + 30? The answer is 42.", "The assistant reads the book."]
    batch = left_padded_batch(TOK, texts)
    with torch.no_grad():
        padded = model(**batch).logits
        for row, text in enumerate(texts):
            ids = TOK(text, return_tensors="pt")["input_ids"]
            alone = model(ids).logits[0]
            torch.testing.assert_close(padded[row, -ids.shape[1]:], alone, atol=1e-5, rtol=1e-5)
    # softmax would give other logits: the model really runs softplus attention
    sdpa = tiny_model("qwen2", attn_implementation="sdpa")
    with torch.no_grad():
        assert (sdpa(**batch).logits - padded).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_implementation_generates_like_a_full_forward(family):
    model = tiny_model(family, attn_implementation="hfx_softplus").double()
    out = generate_greedy(model, TOK, max_new_tokens=4)
    batch = left_padded_batch(TOK)
    with torch.no_grad():
        res = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=TOK.pad_token_id)
        mask = torch.cat((batch["attention_mask"], torch.ones(3, 4, dtype=torch.long)), 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        full = model(res.sequences, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(res.sequences, out)
    prompt = batch["input_ids"].shape[1]
    torch.testing.assert_close(torch.stack(res.logits, 1), full[:, prompt - 1: -1].float(), atol=1e-6, rtol=0)


def test_sliding_window_respected():
    """One layer, window 4: the last position cannot see token 0, so changing it changes nothing there."""
    model = tiny_model("mistral", attn_implementation="hfx_softplus", sliding_window=4, num_hidden_layers=1)
    ids = torch.randint(3, 400, (1, 9), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 400 + 3
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits
    torch.testing.assert_close(a[0, 4:], b[0, 4:], atol=0, rtol=0)
    assert (a[0, :4] - b[0, :4]).abs().max() > 0  # positions that do see it change


def test_trains_through_hfx_trainer_config(tiny_model_dir, tmp_path):
    from trl import SFTConfig, SFTTrainer

    config = fast_training_args(hfx.extend(SFTConfig), tmp_path, hfx_attention="softplus", max_length=32,
                                hfx_attention_args={"power": 3.0, "train_length": 64})
    trainer = hfx.extend(SFTTrainer)(model=str(tiny_model_dir("qwen2")), args=config,
                                     train_dataset=make_tiny_datasets(4)["language_modeling"])
    assert trainer.model.config._attn_implementation == "hfx_softplus"
    opts = trainer.model.model.layers[0].self_attn.hfx_softplus
    assert (opts.power, opts.train_length, opts.trained) == (3.0, 64, False)
    before = snapshot_params(trainer.model)
    trainer.train()
    assert params_changed(before, trainer.model)
    assert opts.trained  # a training forward happened: no warning at inference
    trainer.model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedSoftplusWarning)
        generate_greedy(trainer.model, TOK, max_new_tokens=2)


def test_untrained_inference_warns_once_unless_told():
    model = tiny_model("llama", attn_implementation="sdpa")
    hfx.attention.apply(model, "softplus")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.warns(UntrainedSoftplusWarning, match="trained=True"), torch.no_grad():
        model(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedSoftplusWarning)
        with torch.no_grad():
            model(ids)  # once per model
        told = tiny_model("llama", attn_implementation="sdpa")
        hfx.attention.apply(told, "softplus", trained=True)
        with torch.no_grad():
            told(ids)


def test_revert_and_bad_input():
    model = tiny_model("qwen3", attn_implementation="sdpa")
    batch = left_padded_batch(TOK)
    with torch.no_grad():
        before = model(**batch).logits
    softplus.apply(model, power=15.0, trained=True)
    assert model.config._attn_implementation == "hfx_softplus"
    hfx.attention.revert(model)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.model.layers[0].self_attn, "hfx_softplus")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    with pytest.raises(ValueError, match="power must be 1"):
        softplus.apply(model, power=0.5)
    with pytest.raises(ValueError, match="train_length must be > 1"):
        softplus.apply(model, train_length=1)
    q = torch.zeros(1, 4, 2, 8)
    k = torch.zeros(1, 2, 2, 8)
    with pytest.raises(ValueError, match="does not implement 'softcap'"):
        softplus_attention_forward(FakeModule(), q, k, k, None, softcap=30.0)
    with pytest.raises(ValueError, match=r"attention_dropout=0\.0"):
        softplus_attention_forward(FakeModule().train(), q, k, k, None, dropout=0.1)
