"""Tests of hfx.testing: the tiny tokenizer and models, the fixtures, and the conformance suites.

The suites are used for real (AdamW, an SDPA wrapper, SFT/DPO, an addcmul pair), and deliberately broken
implementations prove that each suite can fail.
"""

import copy
import os

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from hfx import testing as kit
from hfx.testing import (
    FAMILIES,
    AttentionConformance,
    KernelConformance,
    OptimizerConformance,
    TrainerConformance,
)

pytest_plugins = ["hfx.testing"]

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

TWO_TURNS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How are you?"},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "The answer is 42."},
]


@pytest.mark.parametrize("text", ["What is 12 + 30? The answer is 42.", "héllo wörld 🙂\n\ttabs", ""])
def test_tokenizer_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tokenizer_special_tokens(tokenizer):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == ids["<|endoftext|>"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == ids["<|im_end|>"]
    assert len(set(ids.values())) == 3 and tokenizer.unk_token_id not in ids.values()
    # special tokens are matched whole inside text, never split into bytes
    encoded = tokenizer("<|im_start|>user\nHi<|im_end|>")["input_ids"]
    assert encoded[0] == ids["<|im_start|>"] and encoded[-1] == ids["<|im_end|>"]
    assert 300 < len(tokenizer) <= 512
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]


def test_tokenizer_is_deterministic_and_fresh():
    assert kit._tokenizer_json.__wrapped__() == kit._tokenizer_json.__wrapped__()
    a, b = kit.tiny_tokenizer(), kit.tiny_tokenizer()
    assert a is not b and a.get_vocab() == b.get_vocab()


def test_chat_template_renders_chatml(tokenizer):
    assert tokenizer.apply_chat_template(TWO_TURNS[:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(TWO_TURNS[1:3], tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How are you?<|im_end|>\n"
    )


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer):
    out = tokenizer.apply_chat_template(TWO_TURNS, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    runs, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tokenizer.decode(r) for r in runs] == ["Hello! How are you?<|im_end|>", "The answer is 42.<|im_end|>"]
    # and nothing else: the unmasked tokens are exactly the template without the assistant contents
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert unmasked == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False).replace(
        "Hello! How are you?<|im_end|>", ""
    ).replace("The answer is 42.<|im_end|>", "")


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_saves_and_reloads(family, tmp_path, hf_offline):
    model = kit.tiny_model(family)
    cfg = model.config
    assert cfg.model_type == family
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    assert cfg.vocab_size == len(kit.tiny_tokenizer()) and cfg.pad_token_id == 0
    assert getattr(cfg, "sliding_window", None) is None
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) < 50_000

    path = kit.save_tiny_model(family, tmp_path / family)
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert reloaded.config._name_or_path == str(path)
    assert tok.chat_template == kit.CHATML_TEMPLATE and tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0
    batch = kit.left_padded_batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_tiny_model_seed_controls_weights_without_touching_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = kit.tiny_model("qwen2", seed=0), kit.tiny_model("qwen2", seed=0), kit.tiny_model("qwen2", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not kit.params_changed(kit.snapshot_params(a), b)
    assert kit.params_changed(kit.snapshot_params(a), c)


def test_left_padded_batch_does_not_change_tokenizer(tokenizer):
    side = tokenizer.padding_side
    batch = kit.left_padded_batch(tokenizer, ["Hi", "What is 12 + 30?"])
    assert tokenizer.padding_side == side
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id


# --------------------------------------------------------------------------------------------------
# Fixtures and offline environment
# --------------------------------------------------------------------------------------------------


def test_hf_offline_fixture(hf_offline):
    import huggingface_hub.constants

    assert all(os.environ[k] == v for k, v in kit.OFFLINE_ENV.items())
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY is True


def test_tiny_model_dir_factory_is_cached(tiny_model_dir):
    path = tiny_model_dir("llama")
    assert path == tiny_model_dir("llama") and (path / "config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "llama"


@pytest.mark.parametrize("tiny_model_path", ["qwen3", "mistral"], indirect=True)
def test_tiny_model_path_indirect(tiny_model_path):
    assert tiny_model_path.name in ("qwen3", "mistral")
    assert AutoModelForCausalLM.from_pretrained(tiny_model_path).config.model_type == tiny_model_path.name


def test_tiny_datasets(tiny_datasets):
    expected = {
        "language_modeling": ["text"],
        "conversational": ["messages"],
        "preference": ["prompt", "chosen", "rejected"],
        "conversational_preference": ["prompt", "chosen", "rejected"],
        "prompt_only": ["prompt"],
        "conversational_prompt_only": ["prompt"],
    }
    assert {k: ds.column_names for k, ds in tiny_datasets.items()} == expected
    assert all(len(ds) == 8 for ds in tiny_datasets.values())
    assert all(r["chosen"] != r["rejected"] for r in tiny_datasets["preference"])
    assert tiny_datasets["conversational"][0]["messages"][1]["role"] == "assistant"


# --------------------------------------------------------------------------------------------------
# OptimizerConformance
# --------------------------------------------------------------------------------------------------


class TestAdamWConformance(OptimizerConformance):
    def make_optimizer(self, model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


class _OpaqueCounter:
    """Not a tensor: torch.load(weights_only=True) refuses it."""

    def __init__(self):
        self.n = 0


class _BrokenSGD(torch.optim.SGD):
    def step(self, closure=None):
        loss = super().step(closure)
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                self.state[p].setdefault("counter", _OpaqueCounter()).n += 1
        return loss


class BrokenOptimizerConformance(OptimizerConformance):
    __test__ = False

    def make_optimizer(self, model):
        return _BrokenSGD(model.parameters(), lr=1e-2)


def test_optimizer_suite_rejects_non_tensor_state():
    suite = BrokenOptimizerConformance()
    suite.test_steps_reduce_loss()  # it does optimize...
    with pytest.raises(AssertionError, match="weights_only"):
        suite.test_state_dict_weights_only_roundtrip()
    with pytest.raises(AssertionError, match="_OpaqueCounter"):
        suite.test_state_dict_is_plain()
    model = kit.TinyMLP()
    optimizer = suite.make_optimizer(model)
    suite._run(model, optimizer, 1)
    with pytest.raises(AssertionError, match="weights_only"):
        kit.check_weights_only_roundtrip(optimizer.state_dict())


def test_optimizer_suite_detects_lost_state_on_resume():
    class ForgetfulAdamW(torch.optim.AdamW):
        def load_state_dict(self, state_dict):  # drops the moments: resume restarts Adam
            state_dict = copy.deepcopy(state_dict)
            state_dict["state"] = {}
            super().load_state_dict(state_dict)

    class Suite(OptimizerConformance):
        __test__ = False

        def make_optimizer(self, model):
            return ForgetfulAdamW(model.parameters(), lr=1e-2)

    with pytest.raises(AssertionError, match="diverged"):
        Suite().test_resume_is_bit_identical()


# --------------------------------------------------------------------------------------------------
# AttentionConformance
# --------------------------------------------------------------------------------------------------

ATTENTION_CALLS = []


def _wrapped_sdpa(module, query, key, value, attention_mask, **kwargs):
    ATTENTION_CALLS.append(attention_mask is not None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _mask_ignoring_sdpa(module, query, key, value, attention_mask, **kwargs):
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


# Names without the "hfx_" prefix, which hfx itself uses for registered plugins (another test registers those).
# a correct registration: attention and mask
AttentionInterface.register("kit_test_sdpa", _wrapped_sdpa)
AttentionMaskInterface.register("kit_test_sdpa", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
# broken: no mask function registered, so transformers passes no mask at all
AttentionInterface.register("kit_test_nomask", _wrapped_sdpa)
# broken: the mask is built but the function drops it
AttentionInterface.register("kit_test_ignoremask", _mask_ignoring_sdpa)
AttentionMaskInterface.register("kit_test_ignoremask", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


class TestWrappedSdpaConformance(AttentionConformance):
    attn_implementation = "kit_test_sdpa"
    atol = rtol = 0.0  # a pure wrapper must be exact

    def test_wrapper_was_called(self):
        ATTENTION_CALLS.clear()
        kit.assert_matches_sdpa(self.make_model("llama"))
        assert ATTENTION_CALLS and all(ATTENTION_CALLS)


class TestAppliedAttentionConformance(AttentionConformance):
    """The apply() route: switch an existing model to the wrapper."""

    families = ("qwen3",)

    def apply(self, model):
        model.set_attn_implementation("kit_test_sdpa")
        return model


@pytest.mark.parametrize("name", ["kit_test_nomask", "kit_test_ignoremask"])
@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_attention_suite_rejects_padding_bugs(name, family):
    model = kit.tiny_model(family, attn_implementation=name)
    with pytest.raises(AssertionError, match="left-padded"):
        kit.assert_matches_sdpa(model)

    class Suite(AttentionConformance):
        __test__ = False
        attn_implementation = name

    with pytest.raises(AssertionError, match="left-padded"):
        Suite().test_matches_sdpa_on_left_padding(family)
    if name == "kit_test_nomask":
        with pytest.raises(AssertionError, match="AttentionMaskInterface"):
            Suite().test_registered_with_mask()


# --------------------------------------------------------------------------------------------------
# KernelConformance
# --------------------------------------------------------------------------------------------------


def _addcmul_by_hand(x, y, z):
    return x + 0.5 * (y * z)


class TestAddcmulConformance(KernelConformance):
    dtypes = (torch.float32, torch.bfloat16)
    check_backward = True

    def make_inputs(self, shape, dtype, device):
        return tuple(torch.randn(shape, dtype=dtype, device=device) for _ in range(3))

    def reference(self, x, y, z):
        return torch.addcmul(x, y, z, value=0.5)

    def kernel(self, x, y, z):
        return _addcmul_by_hand(x, y, z)


class _TailBugKernel(TestAddcmulConformance):
    """Forgets the last element of odd-length rows, as a vectorised kernel with a missing tail loop would."""

    __test__ = False

    def kernel(self, x, y, z):
        out = x.clone()
        even = x.shape[-1] - x.shape[-1] % 2
        out[..., :even] = _addcmul_by_hand(x[..., :even], y[..., :even], z[..., :even])
        return out


def test_kernel_suite_catches_odd_shape_bug():
    suite = _TailBugKernel()
    suite.test_matches_reference((4, 8), torch.float32)  # even shapes pass
    with pytest.raises(AssertionError, match="kernel != reference"):
        suite.test_matches_reference((3, 5, 17), torch.float32)
    odd_free = type("EvenOnly", (_TailBugKernel,), {"__test__": False, "shapes": ((4, 8), (2, 16))})
    with pytest.raises(AssertionError, match="odd"):
        odd_free().test_grid_has_odd_shapes()


# --------------------------------------------------------------------------------------------------
# TrainerConformance
# --------------------------------------------------------------------------------------------------


class TestSFTConformance(TrainerConformance):
    families = FAMILIES
    supports_peft = True
    learning_rate = 0.1

    def make_trainer(self, model_path, output_dir, peft_config=None):
        from trl import SFTConfig, SFTTrainer

        args = kit.fast_training_args(SFTConfig, output_dir, max_length=64, learning_rate=self.learning_rate)
        dataset = kit.make_tiny_datasets()["conversational"]
        return SFTTrainer(model=str(model_path), args=args, train_dataset=dataset, peft_config=peft_config)


class TestDPOConformance(TrainerConformance):
    families = ("llama",)
    supports_peft = True

    def make_trainer(self, model_path, output_dir, peft_config=None):
        from trl import DPOConfig, DPOTrainer

        args = kit.fast_training_args(DPOConfig, output_dir, max_length=64)
        dataset = kit.make_tiny_datasets()["conversational_preference"]
        return DPOTrainer(model=str(model_path), args=args, train_dataset=dataset, peft_config=peft_config)


def test_trainer_suite_fails_when_nothing_learns(tmp_path, hf_offline):
    class Frozen(TestSFTConformance):
        __test__ = False
        learning_rate = 0.0

    with pytest.raises(AssertionError, match="unchanged"):
        Frozen().test_training_changes_parameters("qwen2", tmp_path)
