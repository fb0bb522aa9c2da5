"""The self-play driver (hfx_trainers.selfplay): batched generation against per-prompt ``generate``, the SPIN loop
(mixing window, per-iteration overrides, resume, prompt splits, PEFT merge), the preference path (pairs equal
``select_pairs`` on the annotated matrix; two anchors with π_ref released before training), and the errors.

The loop's SPPO/RSPO/INPO paths run with stand-in trainers (SPINTrainer under those algorithms' names: the driver
picks its defaults and anchors from ``_name`` and ``needs_opponent``); the real SPPO/RSPO/INPO trainers run one
iteration each, with their first-step loss checked against the pairs the driver built.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file
from tqdm.auto import tqdm
from trl import DPOConfig

from hfx.testing import apply_offline_env, fast_training_args, make_tiny_datasets, shared_tiny_model_dir, tiny_model
from hfx_trainers import selfplay
from hfx_trainers.preference import annotate, from_reward_fn, select_pairs
from hfx_trainers.selfplay import SelfPlayArguments, SelfPlayDriver, generate_completions
from hfx_trainers.spin import SPINConfig, SPINTrainer

SMALL = dict(max_new_tokens=4, generation_batch_size=3)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    apply_offline_env(monkeypatch)


@pytest.fixture
def model_path():
    return str(shared_tiny_model_dir("qwen2"))


def spin_args(output_dir, **overrides) -> SPINConfig:
    return fast_training_args(SPINConfig, output_dir, **{"max_steps": 1, "max_length": 64, "optim": "adamw_torch",
                                                         **overrides})


def sft_data(n: int = 6) -> Dataset:
    """prompt + ground truth (``chosen``, one of SPIN's accepted answer columns)."""
    return make_tiny_datasets(n)["preference"].remove_columns("rejected")


class FakeSPPOTrainer(SPINTrainer):
    """SPIN's loss under SPPO's name and columns: enough to drive the SPPO path of the loop."""

    _name = "SPPO"
    scalar_columns = ("chosen_win_prob", "rejected_win_prob", "pair_win_prob")
    built: list = []

    def __init__(self, *args, ref_model=None, **kwargs):
        self.ref_alive = None if ref_model is None else weakref.ref(ref_model)
        super().__init__(*args, ref_model=ref_model, **kwargs)
        type(self).built.append(self)


class FakeRSPOTrainer(FakeSPPOTrainer):
    """Two anchors: π_t precomputed into opp_* by the trainer, π_ref = DPO's reference."""

    _name = "RSPO"
    needs_opponent = True
    built: list = []


class FakeINPOTrainer(FakeRSPOTrainer):
    _name = "INPO"
    built: list = []


class GenerationSpy:
    """Wraps generate_completions, recording each call's prompts, output and the model's weights."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(selfplay, "generate_completions", self)

    def __call__(self, model, tokenizer, prompts, *args, **kwargs):
        out = generate_completions(model, tokenizer, prompts, *args, **kwargs)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.calls.append({"prompts": list(prompts), "completions": out, "weights": weights, "kwargs": kwargs})
        return out


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def holds_saved(state_dict, path) -> bool:
    """The in-memory weights equal those saved at ``path`` (a state_dict also lists tied weights the file omits)."""
    saved = weights(path)
    return all(torch.equal(state_dict[k], saved[k]) for k in saved)


def state(path) -> dict:
    return json.loads((path / "state.json").read_text())


# --------------------------------------------------------------------------------------------------
# generate_completions
# --------------------------------------------------------------------------------------------------


def plain_greedy(model, tok, prompt_ids, max_new_tokens):
    """One prompt at a time, no padding: the reference for batched greedy decoding."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def test_generate_matches_per_prompt_greedy_in_input_order(model_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    # lengths 1..many tokens, unsorted, so that batches of 3 are padded and the length sort reorders them
    prompts = ["Hi", "What is 12 + 30? The answer", "The cat", "Good morning. Can you help me with the book?",
               "2", "The assistant reads the book and then"]
    model.train()
    modes, bars = [], []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))

    def progress(**kwargs):
        bars.append(kwargs)
        return tqdm(**{**kwargs, "disable": True})

    monkeypatch.setattr(selfplay, "tqdm", progress)
    got = generate_completions(model, tok, prompts, 1, 6, 3, desc="gen-test", do_sample=False)
    assert [(b["desc"], b["total"]) for b in bars] == [("gen-test", len(prompts))]  # one progress bar, per prompt
    assert model.training and modes and not any(modes)  # eval mode inside, training mode restored
    want = [plain_greedy(model, tok, tok(p)["input_ids"], 6) for p in prompts]
    assert [group for group in got] == [[w] for w in want]
    assert len(set(want)) > 2, "the prompts should give different completions, else the order is not tested"


def test_generate_k_samples_and_conversational(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_path).eval(), AutoTokenizer.from_pretrained(model_path)
    conversations = [[{"role": "user", "content": q}] for q in ("What is 2 + 3?", "Hello!", "Thanks a lot!")]
    torch.manual_seed(0)
    sampled = generate_completions(model, tok, conversations, 4, 5, 2, do_sample=True, temperature=1.0, top_k=0,
                                   disable_progress=True)
    assert [len(group) for group in sampled] == [4, 4, 4]
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) and len(c) == 1
               for group in sampled for c in group)
    assert len({c[0]["content"] for c in sampled[0]}) > 1  # K samples, not K copies
    # a conversation is generated from its chat template with the generation prompt
    greedy = generate_completions(model, tok, conversations, max_new_tokens=6, do_sample=False, disable_progress=True)
    templated = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    as_text = generate_completions(model, tok, templated, max_new_tokens=6, do_sample=False, disable_progress=True)
    assert [[c[0]["content"]] for [c] in greedy] == as_text


def test_decode_stops_at_the_first_eos():
    from hfx.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    a, b = tok("Hi")["input_ids"], tok(" there")["input_ids"]
    rows = torch.tensor([[*a, tok.eos_token_id, *b], [*a, *b, tok.pad_token_id]])
    assert selfplay._decode(tok, rows, [tok.eos_token_id]) == ["Hi", "Hi there"]


# --------------------------------------------------------------------------------------------------
# SPIN loop
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
def test_spin_two_iterations_mixing_overrides_and_eval(model_path, tmp_path, monkeypatch):
    spy = GenerationSpy(monkeypatch)
    evals = []

    def eval_fn(model, tokenizer):
        evals.append(sum(p.double().sum().item() for p in model.parameters()))
        return len(evals)

    sp = SelfPlayArguments(num_iterations=2, drop_ties=False, iteration_overrides={1: {"beta": 5.0}}, **SMALL)
    driver = SelfPlayDriver("spin", model_path, spin_args(tmp_path), sft_data(5), sp, eval_fn=eval_fn)
    final = driver.run()

    assert final == tmp_path / "iteration-1"
    pairs = [load_from_disk(str(tmp_path / f"iteration-{t}" / "pairs")) for t in range(2)]
    assert pairs[0]["iteration"][:] == [0] * 5
    assert sorted(pairs[1]["iteration"][:]) == [0] * 5 + [1] * 5  # mixing_window=2: this + previous iteration
    assert list(pairs[1].select(range(5)).to_list()) == pairs[0].to_list()
    assert pairs[1]["generated"][5:] == [c[0] for c in spy.calls[1]["completions"]]
    assert pairs[0]["real"][:] == sft_data(5)["chosen"][:]
    # greedy, as official SPIN
    assert spy.calls[0]["kwargs"]["do_sample"] is False and "temperature" not in spy.calls[0]["kwargs"]

    # π_0 -> π_1 -> π_2 all differ, and iteration 1 generated with π_1
    w0, w1, w2 = weights(model_path), weights(tmp_path / "iteration-0"), weights(tmp_path / "iteration-1")
    assert not same_weights(w0, w1) and not same_weights(w1, w2)
    assert holds_saved(spy.calls[1]["weights"], tmp_path / "iteration-0")

    configs = [json.loads((tmp_path / f"iteration-{t}" / "trainer_config.json").read_text()) for t in range(2)]
    assert [c["beta"] for c in configs] == [0.1, 5.0]
    assert [c["output_dir"] for c in configs] == [str(tmp_path / f"iteration-{t}") for t in range(2)]
    assert all(c["precompute_ref_log_probs"] for c in configs)

    states = [state(tmp_path / f"iteration-{t}") for t in range(2)]
    assert driver.history == states
    assert [s["num_pairs"] for s in states] == [5, 10] and [s["num_new_pairs"] for s in states] == [5, 5]
    assert [s["overrides"] for s in states] == [{}, {"beta": 5.0}]
    assert (states[0]["eval_before"], states[0]["eval_after"], states[1]["eval_before"], states[1]["eval_after"]) \
        == (1.0, 2.0, 2.0, 3.0)  # eval on π_0 once, then after each iteration
    assert states[0]["train_loss"] == pytest.approx(0.693147, abs=1e-5)  # policy = opponent at step 1: log 2


def test_spin_mixing_window_one_keeps_only_current(model_path, tmp_path):
    sp = SelfPlayArguments(num_iterations=2, mixing_window=1, drop_ties=False, **SMALL)
    SelfPlayDriver("spin", model_path, spin_args(tmp_path), sft_data(4), sp).run()
    assert load_from_disk(str(tmp_path / "iteration-1" / "pairs"))["iteration"][:] == [1] * 4


def test_resume_skips_finished_iterations(model_path, tmp_path, monkeypatch):
    spy = GenerationSpy(monkeypatch)
    data = sft_data(4)
    SelfPlayDriver("spin", model_path, spin_args(tmp_path), data, SelfPlayArguments(num_iterations=1, **SMALL)).run()
    marker = tmp_path / "iteration-0" / "state.json"
    before = (marker.stat().st_mtime_ns, marker.read_text())

    driver = SelfPlayDriver("spin", model_path, spin_args(tmp_path), data,
                            SelfPlayArguments(num_iterations=2, **SMALL))
    assert driver.run() == tmp_path / "iteration-1"
    assert len(spy.calls) == 2  # iteration 0 once (first run), iteration 1 once
    assert (marker.stat().st_mtime_ns, marker.read_text()) == before
    assert holds_saved(spy.calls[1]["weights"], tmp_path / "iteration-0")  # continued from the saved π_1
    assert [h["iteration"] for h in driver.history] == [0, 1]

    # all finished: nothing runs
    again = SelfPlayDriver("spin", model_path, spin_args(tmp_path), data, SelfPlayArguments(num_iterations=2, **SMALL))
    assert again.run() == tmp_path / "iteration-1" and len(spy.calls) == 2
    # resume=False recomputes from iteration 0
    SelfPlayDriver("spin", model_path, spin_args(tmp_path), data,
                   SelfPlayArguments(num_iterations=1, resume=False, **SMALL)).run()
    assert len(spy.calls) == 3 and marker.read_text() != before[1]
    assert not (tmp_path / "iteration-1" / "state.json").exists()  # stale: it was built on the old iteration 0


def test_prompt_splits_cycle(model_path, tmp_path, monkeypatch):
    spy = GenerationSpy(monkeypatch)
    data = sft_data(7)
    sp = SelfPlayArguments(num_iterations=4, prompt_splits=3, mixing_window=1, **SMALL)
    driver = SelfPlayDriver("spin", model_path, spin_args(tmp_path), data, sp)
    driver.run()
    prompts = data["prompt"][:]
    splits = [prompts[0:3], prompts[3:5], prompts[5:7]]
    assert [call["prompts"] for call in spy.calls] == [splits[0], splits[1], splits[2], splits[0]]
    assert [h["prompt_split"] for h in driver.history] == [0, 1, 2, 0]


@pytest.mark.floor
def test_lora_adapter_is_merged_each_iteration(model_path, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    sp = SelfPlayArguments(num_iterations=2, drop_ties=False, **SMALL)
    SelfPlayDriver("spin", model_path, spin_args(tmp_path, max_steps=2), sft_data(4), sp, peft_config=lora).run()
    for t in range(2):
        folder = tmp_path / f"iteration-{t}"
        assert not (folder / "adapter_config.json").exists() and (folder / "model.safetensors").exists()
    w0, w1, w2 = weights(model_path), weights(tmp_path / "iteration-0"), weights(tmp_path / "iteration-1")
    assert w1.keys() == w0.keys()  # plain weights: no lora_A/lora_B
    changed = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)  # the merged LoRA deltas
    assert not same_weights(w1, w2)
    AutoModelForCausalLM.from_pretrained(tmp_path / "iteration-1")  # loads as a plain model


# --------------------------------------------------------------------------------------------------
# Preference path (SPPO / RSPO / INPO stand-ins)
# --------------------------------------------------------------------------------------------------


def length_preference():
    return from_reward_fn(lambda prompts, completions: [float(len(c)) for c in completions])


def test_sppo_pairs_equal_select_pairs_on_the_annotated_matrix(model_path, tmp_path, monkeypatch):
    spy = GenerationSpy(monkeypatch)
    FakeSPPOTrainer.built.clear()
    data = make_tiny_datasets(5)["prompt_only"]
    sp = SelfPlayArguments(num_iterations=1, num_generations=3, max_new_tokens=6)
    driver = SelfPlayDriver(FakeSPPOTrainer, model_path, spin_args(tmp_path), data, sp,
                            preference_model=length_preference())
    driver.run()

    call = spy.calls[0]
    assert call["kwargs"]["do_sample"] is True and call["kwargs"]["temperature"] == 0.7  # SPPO's sampling
    assert call["kwargs"]["top_p"] == 0.9 and call["kwargs"]["top_k"] == 0
    probs = annotate(length_preference(), call["prompts"], call["completions"])
    want = select_pairs(probs, "best_worst", drop_ties=True).to_columns(call["prompts"], call["completions"])
    saved = load_from_disk(str(tmp_path / "iteration-0" / "pairs")).to_dict()
    assert saved.pop("iteration") == [0] * len(want["prompt"])
    assert saved == want
    ties = len(call["prompts"]) - len(want["prompt"])
    assert state(tmp_path / "iteration-0")["ties_dropped"] == ties
    trainer = FakeSPPOTrainer.built[-1]
    assert {"chosen_win_prob", "rejected_win_prob", "pair_win_prob", "ref_chosen_logps"} <= set(
        trainer.train_dataset.column_names)


def test_two_anchor_reference_is_the_initial_model_and_released(model_path, tmp_path):
    FakeINPOTrainer.built.clear()
    data = make_tiny_datasets(4)["prompt_only"]
    sp = SelfPlayArguments(num_iterations=2, num_generations=3, max_new_tokens=6, drop_ties=False)
    driver = SelfPlayDriver(FakeINPOTrainer, model_path, spin_args(tmp_path, max_steps=2), data, sp,
                            preference_model=length_preference())
    assert driver.selfplay_args.selection == "tournament"  # INPO's default
    driver.run()
    gc.collect()
    first, second = FakeINPOTrainer.built
    for trainer in (first, second):
        assert trainer.ref_model is None and trainer.ref_alive() is None  # π_ref freed before training
    # iteration 0: π_ref = π_0 = π_t; iteration 1: π_ref = π_0 still, π_t = π_1
    ds0, ds1 = first.train_dataset, second.train_dataset
    torch.testing.assert_close(ds0["ref_chosen_logps"][:], ds0["opp_chosen_logps"][:], rtol=1e-5, atol=1e-4)
    gap = torch.tensor(ds1["ref_chosen_logps"][:]) - torch.tensor(ds1["opp_chosen_logps"][:])
    assert gap.abs().max() > 1e-3


@pytest.mark.floor
@pytest.mark.parametrize("name", ["sppo", "rspo", "inpo"])
def test_real_trainers_first_step_loss_from_the_built_pairs(model_path, tmp_path, name):
    """At step 1 the policy is π_t (and π_ref): SPPO/RSPO's loss is ½[(η(p_w − ½))² + (η(p_l − ½))²] of the saved
    win probabilities (RSPO's reverse-KL term is 0), INPO's is (1/(2η))²."""
    trainer_cls = selfplay.resolve_trainer(name)
    args = fast_training_args(trainer_cls.config_class, tmp_path, max_steps=1, per_device_train_batch_size=4,
                              max_length=64, optim="adamw_torch")
    sp = SelfPlayArguments(num_iterations=1, num_generations=3, max_new_tokens=4, drop_ties=False)
    SelfPlayDriver(name, model_path, args, make_tiny_datasets(4)["prompt_only"], sp,
                   preference_model=length_preference()).run()
    pairs = load_from_disk(str(tmp_path / "iteration-0" / "pairs"))
    assert len(pairs) == 4
    if name == "inpo":
        want = (1 / (2 * args.eta)) ** 2
    else:
        eta = 1 / args.beta
        p_w, p_l = torch.tensor(pairs["chosen_win_prob"][:]), torch.tensor(pairs["rejected_win_prob"][:])
        want = (0.5 * ((eta * (p_w - 0.5)) ** 2 + (eta * (p_l - 0.5)) ** 2)).mean().item()
    assert state(tmp_path / "iteration-0")["train_loss"] == pytest.approx(want, rel=1e-4)


def test_reference_from_an_in_memory_model_is_saved_once(model_path, tmp_path):
    from transformers import AutoTokenizer

    FakeRSPOTrainer.built.clear()
    model = tiny_model("qwen2")
    data = make_tiny_datasets(3)["prompt_only"]
    sp = SelfPlayArguments(num_iterations=1, num_generations=2, max_new_tokens=4)
    SelfPlayDriver(FakeRSPOTrainer, model, spin_args(tmp_path), data, sp, preference_model=length_preference(),
                   processing_class=AutoTokenizer.from_pretrained(model_path)).run()
    assert same_weights(weights(tmp_path / "reference-model"), weights(model_path))  # π_0, saved before training
    assert not same_weights(weights(tmp_path / "iteration-0"), weights(model_path))


def test_all_ties_skip_training(model_path, tmp_path):
    data = make_tiny_datasets(3)["prompt_only"]
    flat = from_reward_fn(lambda prompts, completions: [0.0] * len(completions))
    sp = SelfPlayArguments(num_iterations=1, num_generations=2, max_new_tokens=4)
    SelfPlayDriver(FakeSPPOTrainer, model_path, spin_args(tmp_path), data, sp, preference_model=flat).run()
    result = state(tmp_path / "iteration-0")
    assert (result["num_pairs"], result["ties_dropped"], result["train_loss"]) == (0, 3, None)
    assert same_weights(weights(tmp_path / "iteration-0"), weights(model_path))


# --------------------------------------------------------------------------------------------------
# Errors: each names the fix; those about the arguments come before any model is loaded
# --------------------------------------------------------------------------------------------------


def driver_kwargs(tmp_path, **overrides):
    kwargs = dict(trainer="spin", model=str(tmp_path / "not-loaded"), args=spin_args(tmp_path), prompts=sft_data(2),
                  selfplay_args=SelfPlayArguments(num_iterations=2))
    return {**kwargs, **overrides}


PREF = {"preference_model": lambda prompts, candidates: torch.full((len(prompts), 2, 2), 0.5)}


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(prompts=Dataset.from_dict({"question": ["q"]})), ValueError, "needs a `prompt` column"),
        (dict(prompts=make_tiny_datasets(2)["prompt_only"]), ValueError, "`real`, `completion` or `chosen`"),
        (dict(trainer=FakeSPPOTrainer, prompts=make_tiny_datasets(2)["prompt_only"]), ValueError,
         "needs a preference_model.*from_reward_fn"),
        (dict(trainer=FakeSPPOTrainer, selfplay_args=SelfPlayArguments(num_generations=1), **PREF), ValueError,
         r"num_generations ≥ 2"),
        (dict(selfplay_args=SelfPlayArguments(iteration_overrides={1: {"betta": 5.0}})), ValueError,
         "not a field of SPINConfig; did you mean 'beta'"),
        (dict(selfplay_args=SelfPlayArguments(num_iterations=2, iteration_overrides={2: {"beta": 5.0}})),
         ValueError, r"iteration\(s\) \[2\] but num_iterations=2"),
        (dict(selfplay_args=SelfPlayArguments(iteration_overrides={"1": {"beta": -1.0}})), ValueError,
         "iteration_overrides.*beta must be a positive number"),
        (dict(selfplay_args=SelfPlayArguments(iteration_overrides={0: {"output_dir": "x"}})), ValueError,
         "the self-play driver sets it"),
        (dict(selfplay_args=SelfPlayArguments(iteration_overrides={1: {"sync_ref_model": True}})), ValueError,
         "sync_ref_model=False"),
        (dict(selfplay_args=SelfPlayArguments(num_generations=2)), ValueError, "set do_sample=True"),
        (dict(selfplay_args=SelfPlayArguments(selection="best_worst")), ValueError, "selection` does not apply"),
        (dict(trainer=FakeSPPOTrainer, selfplay_args=SelfPlayArguments(selection="max"), **PREF), ValueError,
         "choose one of"),
        (dict(ref_model="ref"), ValueError, "ref_model .*is for RSPO/INPO"),
        (dict(**PREF), ValueError, "takes no preference_model"),
        (dict(trainer="dpo"), ValueError, "choose one of"),
        (dict(trainer=type("Other", (SPINTrainer,), {"_name": "DPO"})), ValueError, "`_name` must be one of"),
        (dict(args=fast_training_args(DPOConfig, "x")), TypeError, "needs a SPINConfig"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_argument_errors_name_the_fix(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        SelfPlayDriver(**driver_kwargs(tmp_path, **overrides))


def test_sync_ref_model_is_forbidden(tmp_path):
    args = spin_args(tmp_path, sync_ref_model=True)
    with pytest.raises(ValueError, match="sync_ref_model=True is not supported by self-play"):
        SelfPlayDriver(**driver_kwargs(tmp_path, args=args))


def test_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="num_iterations must be a positive int"):
        SelfPlayArguments(num_iterations=0)
    with pytest.raises(ValueError, match="iteration_overrides keys are iteration numbers"):
        SelfPlayArguments(iteration_overrides={-1: {}})
    with pytest.raises(ValueError, match="prompt_splits=3 but there are only 2 prompts"):
        SelfPlayDriver(**driver_kwargs(tmp_path, selfplay_args=SelfPlayArguments(prompt_splits=3)))


def test_vllm_missing_names_the_install(tmp_path):
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install vllm"):
        SelfPlayDriver(**driver_kwargs(tmp_path, selfplay_args=SelfPlayArguments(use_vllm=True)))


def test_tokenizer_and_model_errors(model_path, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    no_pad = AutoTokenizer.from_pretrained(model_path)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match=r"tokenizer.pad_token = tokenizer.eos_token"):
        SelfPlayDriver(**driver_kwargs(tmp_path, model=model_path, processing_class=no_pad))

    no_template = AutoTokenizer.from_pretrained(model_path)
    no_template.chat_template = None
    conversations = make_tiny_datasets(2)["conversational_preference"]
    with pytest.raises(ValueError, match="no chat template"):
        SelfPlayDriver(**driver_kwargs(tmp_path, model=model_path, prompts=conversations,
                                       processing_class=no_template))

    classifier = AutoModelForSequenceClassification.from_config(tiny_model("qwen2").config)
    with pytest.raises(TypeError, match=r"needs a causal LM \(e.g. AutoModelForCausalLM"):
        SelfPlayDriver(**driver_kwargs(tmp_path, model=classifier, processing_class=no_template))


def test_non_probability_preference_model_is_rejected(model_path, tmp_path):
    def logits(prompts, candidates):  # scores, not probabilities
        return torch.randn(len(prompts), len(candidates[0]), len(candidates[0]))

    sp = SelfPlayArguments(num_iterations=1, num_generations=2, max_new_tokens=2)
    driver = SelfPlayDriver(FakeSPPOTrainer, model_path, spin_args(tmp_path), make_tiny_datasets(2)["prompt_only"],
                            sp, preference_model=logits)
    with pytest.raises(ValueError, match="preference model logits returned"):
        driver.run()
    assert not (tmp_path / "iteration-0" / "state.json").exists()


# --------------------------------------------------------------------------------------------------
# Two processes (DDP over gloo): shards are generated apart and gathered in order
# --------------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, sys
from hfx.testing import apply_offline_env, fast_training_args, finish_distributed, make_tiny_datasets
from hfx_trainers.inpo import INPOConfig
from hfx_trainers.preference import from_reward_fn
from hfx_trainers.rspo import RSPOConfig
from hfx_trainers.selfplay import SelfPlayArguments, SelfPlayDriver
from hfx_trainers.spin import SPINConfig

apply_offline_env()
model, out = sys.argv[1], sys.argv[2]
data = make_tiny_datasets(5)["preference"].remove_columns("rejected")
prefer = from_reward_fn(lambda p, c: [float(len(x)) for x in c])
common = dict(max_steps=1, max_length=64, optim="adamw_torch", per_device_train_batch_size=4, logging_steps=1)
spin = SelfPlayDriver("spin", model, fast_training_args(SPINConfig, out + "/spin", **common), data,
                      SelfPlayArguments(num_iterations=2, max_new_tokens=3, drop_ties=False))
spin.run()
sampled = dict(num_iterations=1, num_generations=3, max_new_tokens=3, drop_ties=False)
rspo = SelfPlayDriver("rspo", model, fast_training_args(RSPOConfig, out + "/rspo", beta=0.5, **common),
                      data.select_columns(["prompt"]), SelfPlayArguments(**sampled), preference_model=prefer)
rspo.run()
inpo = SelfPlayDriver("inpo", model, fast_training_args(INPOConfig, out + "/inpo", eta=0.1, tau=0.0, **common),
                      data.select_columns(["prompt"]), SelfPlayArguments(**sampled), preference_model=prefer)
inpo.run()
if spin.args.process_index == 0:
    json.dump({"spin": spin.history, "rspo": rspo.history, "world": spin.args.world_size},
              open(out + "/result.json", "w"))
finish_distributed()
"""


def first_step_log(folder) -> dict:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return next(h for h in history if h.get("step") == 1 and "loss" in h)


@pytest.mark.slow
def test_accelerate_launch_two_processes(model_path, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine runs 2 processes over gloo (with
    `--cpu`, accelerate starts 2 processes only through MPI). Real SPIN/RSPO/INPO trainers run under DDP."""
    script = tmp_path / "ddp_selfplay.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29523",
           str(script), model_path, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2
    prompts = make_tiny_datasets(5)["preference"]["prompt"][:]
    spin = load_from_disk(str(tmp_path / "spin" / "iteration-1" / "pairs"))
    assert spin["prompt"][:] == prompts * 2 and spin["iteration"][:] == [0] * 5 + [1] * 5
    assert [h["num_pairs"] for h in result["spin"]] == [5, 10]
    rspo = load_from_disk(str(tmp_path / "rspo" / "iteration-0" / "pairs"))
    assert rspo["prompt"][:] == prompts and rspo["prompt_index"][:] == list(range(5))
    # π_t's log-probs, precomputed over 2 shards and gathered, line up with their rows: at step 1 (π_θ = π_t = π_ref)
    # RSPO's reverse KL is 0 and INPO's h (τ = 0: Δ_θ − Δ_t) is 0.
    assert first_step_log(tmp_path / "rspo" / "iteration-0")["loss/regularizer"] == pytest.approx(0.0, abs=1e-6)
    assert first_step_log(tmp_path / "inpo" / "iteration-0")["h/mean"] == pytest.approx(0.0, abs=1e-5)
