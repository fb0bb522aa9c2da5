"""SPPOTrainer, RSPOTrainer, INPOTrainer: conformance (full fine-tune and LoRA), the logged loss against the spec's
formulas on log-probs computed here with plain forwards of the policy and the anchors, step-0 identities, π_t's
precomputed log-probs, config and dataset errors, and the registry/facade wiring.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig

import hfx
from hfx.registry import get_registry
from hfx.testing import (
    TrainerConformance,
    apply_offline_env,
    fast_training_args,
    make_tiny_datasets,
    shared_tiny_model_dir,
    tiny_model,
)
from hfx_trainers import inpo, rspo, sppo
from hfx_trainers.inpo import INPOConfig, INPOTrainer
from hfx_trainers.rspo import RSPOConfig, RSPOTrainer
from hfx_trainers.sppo import SPPOConfig, SPPOTrainer


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    apply_offline_env(monkeypatch)


P_W = [0.9, 0.7, 0.8, 0.6, 0.75, 0.85, 0.65, 0.95]
P_L = [0.2, 0.4, 0.1, 0.45, 0.3, 0.05, 0.35, 0.15]
P_PAIR = [0.97, 0.8, 0.9, 0.55, 0.7, 0.99, 0.6, 0.85]


def pairs(n: int = 8, **renames) -> Dataset:
    """The tiny preference set (chosen = right answer) with SPPO's win probabilities."""
    ds = make_tiny_datasets(n)["preference"]
    ds = ds.add_column("chosen_win_prob", P_W[:n]).add_column("rejected_win_prob", P_L[:n])
    ds = ds.add_column("pair_win_prob", P_PAIR[:n])
    return ds.rename_columns(renames) if renames else ds


def args_for(config_cls, output_dir, **overrides):
    # AdamW in tests: RMSprop at the kit's lr 0.1 takes steps of ~1 per weight.
    return fast_training_args(config_cls, output_dir, **{"max_length": 64, "optim": "adamw_torch", **overrides})


def policy_model():
    return AutoModelForCausalLM.from_pretrained(shared_tiny_model_dir("qwen2"), dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------------
# Conformance: 2 steps on the tiny model change every trainable parameter
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
class TestSPPOConformance(TrainerConformance):
    supports_peft = True

    def make_trainer(self, model_path, output_dir, peft_config=None):
        args = args_for(SPPOConfig, output_dir, beta=0.1)
        return SPPOTrainer(model=str(model_path), args=args, train_dataset=pairs(), peft_config=peft_config)


@pytest.mark.floor
class TestRSPOConformance(TrainerConformance):
    supports_peft = True

    def make_trainer(self, model_path, output_dir, peft_config=None):
        args = args_for(RSPOConfig, output_dir, beta=0.1, regularizer="sppo_forward1reverse5", reg_coef=0.1)
        return RSPOTrainer(model=str(model_path), args=args, train_dataset=pairs(), peft_config=peft_config)


@pytest.mark.floor
class TestINPOConformance(TrainerConformance):
    supports_peft = True

    def make_trainer(self, model_path, output_dir, peft_config=None):
        args = args_for(INPOConfig, output_dir, eta=0.1, precompute_ref_log_probs=True)
        ds = make_tiny_datasets(8)["preference"]  # INPO needs no probabilities
        return INPOTrainer(model=str(model_path), args=args, train_dataset=ds, peft_config=peft_config)


# --------------------------------------------------------------------------------------------------
# The logged loss is the spec's formula on independently computed log-probs
# --------------------------------------------------------------------------------------------------


def logps_of(model, rows, summed_logps):
    return summed_logps(model, rows["prompt_ids"], rows["chosen_ids"]), summed_logps(
        model, rows["prompt_ids"], rows["rejected_ids"]
    )


@pytest.mark.parametrize(("loss_type", "precompute"), [("sppo", False), ("sppo_single", False),
                                                       ("sppo_hard", False), ("sppo", True)], ids=str)
def test_sppo_logged_loss(tmp_path, loss_type, precompute, summed_logps, logged):
    opponent = tiny_model("qwen2", seed=1)  # π_t with other weights than the policy, so the log-ratios are not 0
    args = args_for(SPPOConfig, tmp_path, max_steps=1, beta=0.5, loss_type=loss_type,
                    precompute_ref_log_probs=precompute)
    trainer = SPPOTrainer(model=str(shared_tiny_model_dir("qwen2")), ref_model=opponent, args=args,
                          train_dataset=pairs(2))
    rows = trainer.train_dataset
    trainer.train()

    pol_w, pol_l = logps_of(policy_model(), rows, summed_logps)
    opp_w, opp_l = logps_of(tiny_model("qwen2", seed=1), rows, summed_logps)
    a, b, eta = pol_w - opp_w, pol_l - opp_l, 2.0
    p_w, p_l, p = (torch.tensor(x[:2], dtype=torch.float64) for x in (P_W, P_L, P_PAIR))
    if loss_type == "sppo":  # spec §3.1, official form
        want = 0.5 * ((a - eta * (p_w - 0.5)) ** 2 + (b - eta * (p_l - 0.5)) ** 2)
    elif loss_type == "sppo_single":
        want = 0.5 * ((a - eta * (p - 0.5)) ** 2 + (b + eta * (p - 0.5)) ** 2)
    else:  # TRL's sppo_hard: hard labels, no ½
        want = (a - eta / 2) ** 2 + (b + eta / 2) ** 2
    assert abs(a).max() > 1e-3
    assert logged(trainer, "loss") == pytest.approx(want.mean().item(), rel=1e-4, abs=1e-5)
    assert logged(trainer, "rewards/chosen") == pytest.approx((0.5 * a).mean().item(), abs=1e-4)
    if loss_type == "sppo":
        assert logged(trainer, "targets/rejected") == pytest.approx((p_l - 0.5).mean().item(), abs=1e-6)


@pytest.mark.parametrize("regularizer", ["reverse_kl", "sppo_forward1reverse5", "chi_squared"])
def test_rspo_logged_loss_uses_pi_t_for_sppo_and_pi_ref_for_the_regularizer(tmp_path, regularizer, summed_logps,
                                                                            logged):
    reference = tiny_model("qwen2", seed=1)  # π_ref ≠ π_t (the starting weights)
    args = args_for(RSPOConfig, tmp_path, max_steps=1, beta=0.5, reg_coef=0.3, regularizer=regularizer,
                    precompute_ref_log_probs=True)
    trainer = RSPOTrainer(model=str(shared_tiny_model_dir("qwen2")), ref_model=reference, args=args,
                          train_dataset=pairs(2))
    rows = trainer.train_dataset
    policy = policy_model()
    pol_w, pol_l = logps_of(policy, rows, summed_logps)
    # π_t = the starting weights, precomputed when the trainer was built
    torch.testing.assert_close(torch.tensor(rows["opp_chosen_logps"], dtype=torch.float64), pol_w, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(rows["opp_rejected_logps"], dtype=torch.float64), pol_l, atol=1e-4,
                               rtol=0)
    trainer.train()

    ref_w, ref_l = logps_of(tiny_model("qwen2", seed=1), rows, summed_logps)
    p_w, p_l = (torch.tensor(x[:2], dtype=torch.float64) for x in (P_W, P_L))
    # step 1: π_θ = π_t, so the SPPO part is the targets' squares only
    self_play = (0.5 * ((2.0 * (p_w - 0.5)) ** 2 + (2.0 * (p_l - 0.5)) ** 2)).mean()
    d_w, d_l = pol_w - ref_w, pol_l - ref_l
    reverse = (d_w**2).mean() + (d_l**2).mean()  # spec §4.1 table
    forward = torch.exp(torch.clamp(-d_w, max=10)).mean() + torch.exp(torch.clamp(-d_l, max=10)).mean()
    chi = torch.exp(torch.clamp(d_w, max=10)).mean() + torch.exp(torch.clamp(d_l, max=10)).mean()
    g = {"reverse_kl": reverse, "sppo_forward1reverse5": forward + 5 * reverse, "chi_squared": chi}[regularizer]
    assert abs(d_w).max() > 1e-3
    assert logged(trainer, "loss/self_play") == pytest.approx(self_play.item(), rel=1e-5)
    assert logged(trainer, "loss/regularizer") == pytest.approx(g.item(), rel=1e-4)
    assert logged(trainer, "loss") == pytest.approx((self_play + 0.3 * g).item(), rel=1e-4)


@pytest.mark.parametrize("tau", [None, 0.0, 0.1])
def test_inpo_logged_loss(tmp_path, tau, summed_logps, logged):
    reference = tiny_model("qwen2", seed=1)
    args = args_for(INPOConfig, tmp_path, max_steps=1, eta=0.1, tau=tau, precompute_ref_log_probs=True)
    ds = make_tiny_datasets(2)["preference"]
    trainer = INPOTrainer(model=str(shared_tiny_model_dir("qwen2")), ref_model=reference, args=args, train_dataset=ds)
    rows = trainer.train_dataset
    trainer.train()

    pol_w, pol_l = logps_of(policy_model(), rows, summed_logps)
    ref_w, ref_l = logps_of(tiny_model("qwen2", seed=1), rows, summed_logps)
    ratio = (0.1 / 3 if tau is None else tau) / 0.1
    # spec §5.1 with π_t = π_θ at step 1: h = Δ_θ − r·Δ_ref − (1 − r)·Δ_θ = r·(Δ_θ − Δ_ref)
    h = ratio * ((pol_w - pol_l) - (ref_w - ref_l))
    want = ((h - 1 / (2 * 0.1)) ** 2).mean()
    assert logged(trainer, "loss") == pytest.approx(want.item(), rel=1e-4)
    assert logged(trainer, "h/mean") == pytest.approx(h.mean().item(), abs=1e-4)
    if tau == 0.0:  # no pull toward π_ref: h = 0 at the starting weights
        assert logged(trainer, "loss") == pytest.approx(25.0, rel=1e-6)


def test_inpo_later_steps_use_the_stored_pi_t(tmp_path, logged):
    # After a step π_θ moves away from π_t; with τ = 0, h = Δ_θ − Δ_t must then be non-zero, i.e. π_t is the stored
    # starting log-probs and not the current policy.
    args = args_for(INPOConfig, tmp_path, max_steps=2, eta=0.1, tau=0.0, per_device_train_batch_size=2)
    trainer = INPOTrainer(model=str(shared_tiny_model_dir("qwen2")), args=args,
                          train_dataset=make_tiny_datasets(2)["preference"])
    trainer.train()
    assert logged(trainer, "h/mean", 1) == pytest.approx(0.0, abs=1e-5)
    assert abs(logged(trainer, "h/mean", 2)) > 1e-2


def test_rspo_without_ref_model_regularizer_is_zero_at_start(tmp_path, logged):
    # ref_model=None: π_ref = the starting weights (the official fallback), so d = 0 and reverse KL = 0 at step 1
    args = args_for(RSPOConfig, tmp_path, max_steps=1, beta=0.5, reg_coef=1.0, precompute_ref_log_probs=True)
    trainer = RSPOTrainer(model=str(shared_tiny_model_dir("qwen2")), args=args, train_dataset=pairs(2))
    assert trainer.ref_model is None  # one model in memory
    trainer.train()
    assert logged(trainer, "loss/regularizer") == pytest.approx(0.0, abs=1e-8)


def test_sppo_accepts_the_official_column_names(tmp_path, logged):
    ds = pairs(2, chosen_win_prob="chosen_probs_win", rejected_win_prob="chosen_probs_lose",
               pair_win_prob="chosen_probs")
    args = args_for(SPPOConfig, tmp_path, max_steps=1, beta=0.5)
    trainer = SPPOTrainer(model=str(shared_tiny_model_dir("qwen2")), args=args, train_dataset=ds)
    trainer.train()
    # step 1, π_θ = π_t: ½·Σ_s (η(p_s − ½))² with η = 2
    want = sum(0.5 * ((2 * (pw - 0.5)) ** 2 + (2 * (pl - 0.5)) ** 2) for pw, pl in zip(P_W[:2], P_L[:2])) / 2
    assert logged(trainer, "loss") == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@pytest.mark.floor
def test_config_defaults(tmp_path):
    s = SPPOConfig(output_dir=str(tmp_path), bf16=False)
    assert (s.beta, s.loss_type, s.learning_rate, s.optim, s.num_train_epochs) == (
        0.001, ["sppo"], 5e-7, "rmsprop", 1.0)
    r = RSPOConfig(output_dir=str(tmp_path), bf16=False)
    assert (r.beta, r.reg_coef, r.regularizer_terms, r.regularizer_clip) == (0.001, 0.1, {"reverse_kl": 1.0}, 10.0)
    r = RSPOConfig(output_dir=str(tmp_path), bf16=False, regularizer='{"forward_kl_importance": 1, "reverse_kl": 2}')
    assert r.regularizer_terms == {"forward_kl_importance": 1.0, "reverse_kl": 2.0}
    r = RSPOConfig(output_dir=str(tmp_path), bf16=False, regularizer="sppo_forwardimportance7")
    assert (r.regularizer_terms, r.regularizer_clip) == ({"forward_kl_importance": 1.0}, 7.0)
    i = INPOConfig(output_dir=str(tmp_path), bf16=False)
    assert (i.eta, i.tau, i.learning_rate, i.num_train_epochs) == (0.005, pytest.approx(0.005 / 3), 5e-7, 2.0)
    assert str(getattr(i.lr_scheduler_type, "value", i.lr_scheduler_type)) == "cosine"


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (SPPOConfig, {"loss_type": "sigmoid"}, "must be one of 'sppo', 'sppo_single', 'sppo_hard'"),
        (SPPOConfig, {"loss_type": ["sppo", "sppo_hard"]}, "takes one loss"),
        (SPPOConfig, {"beta": 0.0}, "beta must be a positive number"),
        (SPPOConfig, {"label_smoothing": 0.1}, "does not use label_smoothing"),
        (RSPOConfig, {"regularizer": "kl"}, "kl"),
        (RSPOConfig, {"regularizer": "{bad json"}, "not valid JSON"),
        (RSPOConfig, {"regularizer": "forward_kl_reference"}, "does not compute"),
        (RSPOConfig, {"reg_coef": -1.0}, r"reg_coef \(λ\) must be a number >= 0"),
        (RSPOConfig, {"regularizer": "sppo_chisq10", "regularizer_clip": 5.0}, "fixes clip=10"),
        (INPOConfig, {"eta": 0.1, "tau": 0.2}, r"tau \(0.2\) must lie in \[0, eta=0.1\]"),
        (INPOConfig, {"tau": -0.001}, "must lie in"),
        (INPOConfig, {"eta": 0.0}, "eta must be a positive number"),
        (INPOConfig, {"beta": 0.5}, "has no beta"),
        (INPOConfig, {"loss_type": "ipo"}, "loss_type is not used"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else (next(iter(v)) if isinstance(v, dict) else ""),
)
def test_config_errors(tmp_path, cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(output_dir=str(tmp_path), bf16=False, **kwargs)


@pytest.mark.parametrize("cls", [SPPOTrainer, RSPOTrainer, INPOTrainer])
def test_trainers_reject_plain_dpo_config(tmp_path, cls):
    with pytest.raises(TypeError, match=f"{cls.__name__} needs a {cls.config_class.__name__}"):
        cls(model="unused", args=DPOConfig(output_dir=str(tmp_path), bf16=False), train_dataset=pairs(2))


# --------------------------------------------------------------------------------------------------
# Dataset columns (checked before any model is loaded)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "config_kwargs", "drop", "match"),
    [
        (SPPOTrainer, {}, ["rejected_win_prob"], r"lacks the column\(s\) rejected_win_prob.*select_pairs"),
        (SPPOTrainer, {"loss_type": "sppo_single"}, ["pair_win_prob"], r"pair_win_prob \(P\(chosen ≻ rejected\)"),
        (RSPOTrainer, {}, ["chosen_win_prob", "rejected_win_prob"], "chosen_win_prob.*sppo_hard"),
        (INPOTrainer, {}, ["rejected"], r"lacks the column\(s\) rejected"),
        (SPPOTrainer, {}, ["prompt"], r"lacks the column\(s\) prompt\b"),
    ],
    ids=["sppo_p_l", "sppo_single_pair", "rspo_probs", "inpo_rejected", "no_prompt"],
)
def test_dataset_column_errors(tmp_path, cls, config_kwargs, drop, match):
    args = cls.config_class(output_dir=str(tmp_path), bf16=False, **config_kwargs)
    with pytest.raises(ValueError, match=match):
        cls(model="not/loaded", args=args, train_dataset=pairs(2).remove_columns(drop))


def test_sppo_hard_needs_no_probabilities(tmp_path):
    args = args_for(SPPOConfig, tmp_path, max_steps=1, loss_type="sppo_hard")
    ds = make_tiny_datasets(2)["preference"]
    trainer = SPPOTrainer(model=str(shared_tiny_model_dir("qwen2")), args=args, train_dataset=ds)
    assert math.isfinite(trainer.train().training_loss)


def test_both_official_and_own_column_names_is_an_error(tmp_path):
    ds = pairs(2).add_column("chosen_probs_win", P_W[:2])
    with pytest.raises(ValueError, match="both 'chosen_probs_win' and 'chosen_win_prob'"):
        SPPOTrainer(model="not/loaded", args=SPPOConfig(str(tmp_path), bf16=False), train_dataset=ds)


# --------------------------------------------------------------------------------------------------
# Docs, registry and facade
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [sppo, rspo, inpo], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 2


@pytest.mark.floor
@pytest.mark.parametrize(("name", "trainer", "config", "paper"), [
    ("sppo", SPPOTrainer, SPPOConfig, "2405.00675"),
    ("rspo", RSPOTrainer, RSPOConfig, "2503.00030"),
    ("inpo", INPOTrainer, INPOConfig, "2407.00617"),
])
def test_facade_and_registry(name, trainer, config, paper):
    assert getattr(hfx, trainer.__name__) is trainer and getattr(hfx, config.__name__) is config
    contribution = get_registry().get("trainer", name)
    assert contribution.available and contribution.paper[1] == trainer._paper["id"] == paper
    assert name in trainer._tag_names
