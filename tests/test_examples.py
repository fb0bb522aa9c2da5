"""Every example script runs in-process with the tiny model and 2 steps (as TRL's CLI tests do)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("optimizer", ["mars", "galore2", "fira", "frugal", "eco"])
def test_optimizers_example(optimizer, isolated, tiny_model_dir, monkeypatch):
    example = load("optimizers")
    extra = {"galore2": '{"rank": 4}', "fira": '{"rank": 4}'}.get(optimizer, "{}")
    monkeypatch.setattr(sys, "argv", [
        "optimizers.py", "--config", str(EXAMPLES / "optimizers.yaml"), "--model_name_or_path",
        str(tiny_model_dir("qwen2")), "--hfx_optimizer", optimizer, "--hfx_optimizer_args", extra, "--max_steps", "2",
        "--output_dir", str(isolated / "out"), "--per_device_train_batch_size", "4", "--max_length", "32"])
    result = example.main(*example.make_parser().parse_args_and_config())
    assert result["optimizer"].lower().startswith(optimizer[:4])
    assert 0.0 <= result["after"] <= 1.0


@pytest.mark.parametrize(("attention", "args"), [("grape", '{"variant": "fox"}'), ("tpa", '{"init": "gqa"}'),
                                                  ("castle", "{}"), ("softplus", '{"trained": true}')])
def test_attention_example_fine_tunes(attention, args, isolated, tiny_model_dir, monkeypatch):
    example = load("attention")
    monkeypatch.setattr(sys, "argv", [
        "attention.py", "--config", str(EXAMPLES / "attention.yaml"), "--model_name_or_path",
        str(tiny_model_dir("qwen2")), "--hfx_attention", attention, "--hfx_attention_args", args, "--max_steps", "2",
        "--output_dir", str(isolated / "out"), "--per_device_train_batch_size", "4", "--max_length", "32"])
    result = example.main(*example.make_parser().parse_args_and_config())
    assert result["applied"] == [attention] and 0.0 <= result["after"] <= 1.0


@pytest.mark.parametrize(("method", "args"), [("sinks", '{"num_sink_tokens": 2, "window": 6}'),
                                              ("h2o", '{"heavy": 4, "recent": 4}')])
def test_attention_example_generates_with_flat_memory(method, args, isolated, tiny_model_dir, monkeypatch):
    """The cache policy holds the same bytes at every length past its budget; the dense cache grows with the text."""
    example = load("attention")
    monkeypatch.setattr(sys, "argv", ["attention.py", "--config", str(EXAMPLES / "attention.yaml"),
                                      "--model_name_or_path", str(tiny_model_dir("qwen2")),
                                      "--generate", method, "--new_tokens", "64", "--cache_args", args,
                                      "--output_dir", str(isolated / "out")])
    rows = example.main(*example.make_parser().parse_args_and_config())["rows"]
    dense = [r["cache_bytes"] for r in rows if r["method"] == "dense"]
    policy = [r["cache_bytes"] for r in rows if r["method"] == method]
    assert dense[0] < dense[1] < dense[2] and len(set(policy)) == 1 and policy[0] < dense[0]


@pytest.mark.parametrize("algorithm", ["spin", "sppo", "rspo", "inpo"])
def test_self_play_examples(algorithm, isolated, tiny_model_dir, monkeypatch):
    example = load(algorithm)
    monkeypatch.setattr(sys, "argv", [
        f"{algorithm}.py", "--config", str(EXAMPLES / f"{algorithm}.yaml"), "--model_name_or_path",
        str(tiny_model_dir("qwen2")), "--num_prompts", "4", "--num_iterations", "1", "--max_new_tokens", "3",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--output_dir", str(isolated / "out")])
    parsed = example.script.make_parser().parse_args_and_config()
    assert parsed[1].num_iterations == 1 and parsed[2].output_dir == str(isolated / "out")  # flags beat the YAML
    summary = example.script.main(*parsed)
    assert summary["algorithm"] == algorithm and len(summary["iterations"]) == 1
    assert (isolated / "out" / "iteration-0" / "state.json").is_file()


@pytest.mark.parametrize("algorithm", ["rpg", "drpo"])
def test_rl_examples(algorithm, isolated, tiny_model_dir, monkeypatch):
    example = load(algorithm)
    monkeypatch.setattr(sys, "argv", [
        f"{algorithm}.py", "--config", str(EXAMPLES / f"{algorithm}.yaml"), "--model_name_or_path",
        str(tiny_model_dir("qwen2")), "--max_steps", "2", "--num_generations", "2", "--per_device_train_batch_size",
        "4", "--max_completion_length", "4", "--output_dir", str(isolated / "out")])
    parsed = example.script.make_parser().parse_args_and_config()
    assert parsed[1].max_steps == 2 and parsed[1].per_device_train_batch_size == 4  # flags beat the YAML
    assert parsed[1].learning_rate == 1e-4  # from the YAML
    summary = example.script.main(*parsed)
    assert summary["algorithm"] == algorithm and 0.0 <= summary["after"] <= 1.0
    assert 1 <= summary["mean_completion_length"] <= 4
    assert (isolated / "out" / "model.safetensors").is_file()


def test_sweet_rl_example(isolated, tiny_model_dir, monkeypatch):
    import json

    example = load("sweet_rl")
    turns = [{"role": "user", "content": "x=4, y is secret. x+y?"}, {"role": "assistant", "content": "y?"},
             {"role": "user", "content": "y=7"}]
    path = isolated / "offline.jsonl"
    with path.open("w") as f:
        for task in range(3):
            for answer, reward in (("11", 1.0), ("12", 0.0)):
                f.write(json.dumps({"task_id": task, "messages": [*turns, {"role": "assistant", "content": answer}],
                                    "reward": reward, "hidden_info": "11"}) + "\n")
    monkeypatch.setattr(sys, "argv", [
        "sweet_rl.py", "--config", str(EXAMPLES / "sweet_rl.yaml"), "--model_name_or_path",
        str(tiny_model_dir("qwen2")), "--trajectories", str(path), "--max_steps", "1", "--num_candidates", "2",
        "--data_fraction", "1.0", "--candidate_max_new_tokens", "3", "--output_dir", str(isolated / "out")])
    parsed = example.script.make_parser().parse_args_and_config()
    assert parsed[1].max_steps == 1 and parsed[1].critic_epochs == 2  # flags beat the YAML; the YAML beats defaults
    summary = example.script.main(*parsed)
    assert summary["algorithm"] == "sweet-rl" and summary["critic_pairs"] == 3
    assert (isolated / "out" / "policy" / "model.safetensors").is_file()
