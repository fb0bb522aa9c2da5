"""The `hfx` command line: help everywhere, env, plugins list/check, trainer commands, plugin commands, demo."""

from __future__ import annotations

import sys

import pytest

from hfx.cli import main

pytestmark = pytest.mark.floor


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_builtin_trainer_and_plugin_commands(with_test_plugin, capsys):
    sys.modules.pop("hfx_test_cli", None)
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("env", "plugins", "demo", "toy-sft", "hello", "say hello (a plugin-contributed command)"):
        assert command in out
    assert "hfx_test_cli" not in sys.modules  # listing a plugin command does not import it
    assert run(capsys)[0] == 0  # no command: prints help


@pytest.mark.parametrize("command", [["env"], ["plugins"], ["demo"], ["toy-sft"]])
def test_every_subcommand_has_help(with_test_plugin, capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0 and "usage:" in out


def test_env_prints_versions_and_plugins(isolated, capsys):
    code, out, _ = run(capsys, "env")
    import transformers

    assert code == 0
    assert f"transformers: {transformers.__version__}" in out and "torch: " in out and "triton: " in out
    assert "plugins.toml: none (defaults)" in out
    assert "hfx-optim" in out and "hfx-trainers" in out


def test_plugins_list_and_check(with_test_plugin, capsys):
    code, out, _ = run(capsys, "plugins", "list")
    assert code == 0
    lines = [line.split() for line in out.splitlines()]
    assert ["testplugin", "optimizer", "test_sgd", "hfx-testplugin", "1.0", "available"] in lines
    code, out, _ = run(capsys, "plugins", "check")
    assert code == 0 and "0 problems" in out


def test_plugins_check_fails_on_broken_plugin(isolated, fake_dist, capsys):
    src = """
from hfx import hookimpl

@hookimpl
def hfx_register(registry):
    registry.optimizer("ghost", "no_such_module_abc:Ghost")
    registry.optimizer("future", "torch.optim:SGD", requires={"torch": ">=99"})
"""
    fake_dist("hfx-bad", {"bad": "hfx_bad_check"}, {"hfx_bad_check": src})
    fake_dist("hfx-broken", {"broken": "hfx_broken_check"}, {"hfx_broken_check": "raise ImportError('nope')\n"})
    with pytest.warns(RuntimeWarning, match="skipping plugin 'broken'"):
        code, out, _ = run(capsys, "plugins", "check")
    assert code == 1
    assert "problem: plugin 'broken': ImportError: nope" in out
    assert "problem: optimizer 'ghost' (bad): target no_such_module_abc:Ghost does not import" in out
    assert "problem: optimizer 'future' (bad): needs torch>=99" in out


def test_config_errors_exit_2_with_the_message(isolated, capsys):
    (isolated / "plugins.toml").write_text("[plugins]\nrequired = ['fancy']\n")
    code, _, err = run(capsys, "plugins", "list")
    assert code == 2 and "pip install fancy" in err


def test_plugin_command_runs_lazily(with_test_plugin, capsys):
    code, out, _ = run(capsys, "hello", "world")
    assert (code, out.strip()) == (0, "hello world")
    assert run(capsys, "hello", "fail")[0] == 3


def test_trainer_command_trains_with_yaml_and_overrides(with_test_plugin, tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "toy.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir('qwen2')}\nlearning_rate: 0.5\nmax_steps: 5\n"
                      "hfx_optimizer: test_sgd\nhfx_optimizer_args:\n  momentum: 0.5\n")
    out_dir = tmp_path / "out"
    code, _, _ = run(capsys, "toy-sft", "--config", str(config), "--max_steps", "2", "--output_dir", str(out_dir),
                     "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
                     "--per_device_train_batch_size", "4", "--logging_steps", "1",
                     "--dataset_name", "toy:arithmetic")
    assert code == 0
    assert (out_dir / "config.json").is_file()  # the trained model was saved
    import torch

    args = torch.load(out_dir / "training_args.bin", weights_only=False)
    assert args.max_steps == 2 and args.learning_rate == 0.5  # flag beats YAML; YAML beats default
    assert args.hfx_optimizer == "test_sgd" and args.hfx_optimizer_args == {"momentum": 0.5}


def test_demo_with_a_tiny_step_count(isolated, capsys):
    out_dir = isolated / "demo"
    code, out, _ = run(capsys, "demo", "--task-args", '{"max_operand": 5}', "--warm-start-steps", "3",
                       "--methods", "none", "--output-dir", str(out_dir), "--cache-dir", str(isolated / "cache"))
    assert code == 0
    assert "warm start (SFT)" in out and "accuracy" in out
    assert (out_dir / "losses.png").stat().st_size > 1000
    assert "warm start (SFT)" in (out_dir / "results.md").read_text()


def test_demo_rejects_unknown_methods(isolated, capsys):
    code, _, _ = run(capsys, "demo", "--methods", "nosuch", "--output-dir", str(isolated / "d"))
    assert code not in (0, None)


def test_demo_rows_of_optimizers_and_attention(isolated, capsys):
    """Optimizer and attention rows continue the warm start's SFT through the hfx config fields (hfx.demo.continue_sft):
    each row trains its steps, logs a loss per step and reports the task metric."""
    out_dir = isolated / "demo"
    methods = ["mars", "grape", "tpa", "castle", "softplus"]
    code, out, _ = run(capsys, "demo", "--task-args", '{"max_operand": 5}', "--warm-start-steps", "3", "--steps", "2",
                       "--methods", ",".join(methods), "--output-dir", str(out_dir), "--cache-dir", str(isolated / "c"))
    assert code == 0, out
    table = (out_dir / "results.md").read_text()
    for name in methods:
        kind = "optimizer" if name == "mars" else "attention"
        row = next(line for line in table.splitlines() if f"{kind} {name} " in line)
        after = float(row.split()[4])  # method (2 words), metric, before, after, ...
        assert 0.0 <= after <= 1.0, row
