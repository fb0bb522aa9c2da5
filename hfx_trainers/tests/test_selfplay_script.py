"""The self-play command line (``hfx spin|sppo|rspo|inpo``, examples/*.py) and the ``hfx demo`` rows."""

from __future__ import annotations

import math

import pytest

from hfx.testing import apply_offline_env
from hfx.toy import ArithmeticTask, warm_start
from hfx_trainers import preference
from hfx_trainers.selfplay_script import ALGORITHMS, SelfPlayScript, build_preference_model


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    apply_offline_env(monkeypatch)


def lengths(prompts, completions):
    return [float(len(c)) for c in completions]


def test_preference_model_from_the_command_line():
    task = ArithmeticTask(max_operand=10)
    oracle = build_preference_model(None, task)  # toy default: the task's oracle, pairwise
    probs = preference.annotate(oracle, ["3+4="], [["7", "8"]])
    assert probs[0, 0, 1].item() == 1.0 and probs[0, 1, 0].item() == 0.0
    by_length = build_preference_model(f"{__name__}:lengths", None)  # a reward function, Bradley–Terry
    probs = preference.annotate(by_length, ["q"], [["a", "abc"]])
    assert probs[0, 1, 0].item() == pytest.approx(1 / (1 + math.exp(-2)))
    with pytest.raises(ValueError, match="--preference_model is required"):
        build_preference_model(None, None)


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="choose from"):
        SelfPlayScript("dpo")
    assert ALGORITHMS == ("spin", "sppo", "rspo", "inpo")


@pytest.mark.parametrize("algorithm", ["spin", "inpo"])
def test_demo_row(algorithm, tmp_path):
    from hfx.demo import DemoContext
    from hfx_trainers import demo

    task = ArithmeticTask(max_operand=6)
    path = warm_start(task, 3, stop_at=None, cache_dir=tmp_path / "cache", hidden_size=32, num_hidden_layers=1)
    result = getattr(demo, algorithm)(DemoContext(task, path, 20, 0, tmp_path / algorithm))
    assert 0.0 <= result["metric_before"] <= 1.0 and 0.0 <= result["metric_after"] <= 1.0
    assert (tmp_path / algorithm / "iteration-1" / "state.json").is_file()  # the recipe's 2 iterations ran


def test_demo_skips_tasks_without_an_oracle(tmp_path):
    from hfx.demo import DemoContext
    from hfx.toy import CollaboratorTask
    from hfx_trainers import demo

    result = demo.sppo(DemoContext(CollaboratorTask(), tmp_path, 20, 0, tmp_path / "d"))
    assert math.isnan(result["metric_after"])
