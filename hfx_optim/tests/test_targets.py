"""Name-aware grouping: HF's decay split, Linear targeting, and the factory protocol."""

from __future__ import annotations

import pytest
import torch

from hfx.testing import FAMILIES, tiny_model
from hfx_optim.targets import (
    TARGET_FLAG,
    ModelOptimizerFactory,
    decay_parameter_names,
    param_groups,
    target_parameter_names,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_decay_names_equal_trainers(family, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model(family)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    named = set(dict(model.named_parameters()))  # tied weights appear once, under their first name
    assert decay_parameter_names(model) == set(trainer.get_decay_parameter_names(model)) & named


def test_all_linear_excludes_the_output_head():
    model = tiny_model("llama")
    names = target_parameter_names(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "lm_head" in linears and "lm_head.weight" not in names
    assert sorted(names) == sorted(f"{n}.weight" for n in linears if n != "lm_head")


def test_names_and_regex_select_modules():
    model = tiny_model("qwen2")
    by_name = target_parameter_names(model, ["q_proj", "v_proj"])
    assert by_name and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in by_name)
    assert len(by_name) == 2 * model.config.num_hidden_layers
    assert target_parameter_names(model, r"layers\.0\..*mlp") == [
        f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matches no nn.Linear.*q_proj"):
        target_parameter_names(model, ["nope"])


def test_groups_partition_trainable_params_once():
    model = tiny_model("qwen2")
    model.model.norm.weight.requires_grad_(False)
    groups = param_groups(model, "all-linear", weight_decay=0.1, target_options={"rank": 4})
    seen = [name for g in groups for name, _ in g["params"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    targets = set(target_parameter_names(model))
    decay = decay_parameter_names(model)
    for g in groups:
        for name, _ in g["params"]:
            assert g[TARGET_FLAG] == (name in targets)
            assert g["weight_decay"] == (0.1 if name in decay else 0.0)
        assert ("rank" in g) == g[TARGET_FLAG]


def test_factory_protocol_builds_a_named_optimizer():
    class Factory(ModelOptimizerFactory):
        optimizer_cls = torch.optim.AdamW
        target_keys = ("rank",)

    model = tiny_model("qwen2")
    opt = Factory()(model, lr=0.01, weight_decay=0.05, rank=8, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)
    targeted = [g for g in opt.param_groups if g[TARGET_FLAG]]
    assert targeted and all(g["rank"] == 8 for g in targeted)
    assert all("param_names" in g for g in opt.param_groups)  # named params: errors can name the parameter
