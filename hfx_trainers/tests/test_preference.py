"""The self-play preference models and pair selection (hfx_trainers.preference).

Expected matrices and scalars are worked out by hand in each test (or come from specs/trainers.md §3.6); the
reward-model adapter is checked against unpadded forward passes of a tiny in-process sequence-classification model.
"""

from __future__ import annotations

import doctest
import math
import re
import sys
import types

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hfx.testing import tiny_config, tiny_tokenizer
from hfx.toy import ArithmeticTask
from hfx_trainers import preference
from hfx_trainers.losses import sppo_loss
from hfx_trainers.preference import (
    PAIRRM_INSTALL,
    annotate,
    bradley_terry,
    check_candidates,
    from_pairwise,
    from_reward_fn,
    from_reward_model,
    mean_win_rate,
    pairrm,
    select_all_pairs,
    select_best_worst,
    select_pairs,
    select_tournament,
    validate_preference_matrix,
)

F64 = torch.float64


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def indices(pairs) -> list[tuple[int, int, int]]:
    return list(zip(pairs.prompt_index.tolist(), pairs.chosen_index.tolist(), pairs.rejected_index.tolist()))


def assert_probability_matrix(probs: torch.Tensor) -> None:
    """The properties of a win-probability matrix, checked directly (not through the code under test)."""
    assert probs.ndim == 3 and probs.shape[1] == probs.shape[2]
    assert torch.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    torch.testing.assert_close(probs.diagonal(dim1=1, dim2=2), torch.full(probs.shape[:2], 0.5, dtype=probs.dtype))
    torch.testing.assert_close(probs + probs.transpose(1, 2), torch.ones_like(probs))


# A hand-made 4-candidate matrix with a cycle (3 beats 0, 0 beats 1, 1 beats 3): best/worst and the tournament
# disagree on the rejected candidate. Row means (with the ½ diagonal): 0.525, 0.4, 0.625, 0.45.
CYCLIC = [
    [0.5, 0.9, 0.4, 0.3],
    [0.1, 0.5, 0.2, 0.8],
    [0.6, 0.8, 0.5, 0.6],
    [0.7, 0.2, 0.4, 0.5],
]


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------


def test_reward_fn_is_bradley_terry_on_known_rewards():
    calls = []

    def reward(prompts, completions):
        calls.append((list(prompts), list(completions)))
        return [float(len(c)) for c in completions]

    prompts, candidates = ["p", "q"], [["a", "bb", "dddd"], ["ccc", "c", "cc"]]
    probs = from_reward_fn(reward)(prompts, candidates)
    # One call with the flattened rows, prompt repeated for each of its candidates, in order.
    assert calls == [(["p", "p", "p", "q", "q", "q"], ["a", "bb", "dddd", "ccc", "c", "cc"])]
    rewards = [[1, 2, 4], [3, 1, 2]]
    expected = [[[sigmoid(r[i] - r[j]) for j in range(3)] for i in range(3)] for r in rewards]
    torch.testing.assert_close(probs, t(expected), rtol=0, atol=1e-12)
    assert probs.dtype == F64
    assert_probability_matrix(probs)
    assert probs[0, 2, 0].item() == pytest.approx(1 / (1 + math.exp(-3)))  # σ(4 − 1)

    # scale multiplies the reward margin; batch_size bounds the rows per call; tensor outputs are accepted.
    calls.clear()
    scaled = from_reward_fn(lambda p, c: torch.tensor(reward(p, c)), scale=2.5, batch_size=4)(prompts, candidates)
    assert [len(c[1]) for c in calls] == [4, 2]
    assert scaled[1, 0, 1].item() == pytest.approx(sigmoid(2.5 * (3 - 1)))
    assert from_reward_fn(reward).rewards(prompts, candidates).tolist() == rewards


def test_reward_fn_errors():
    with pytest.raises(ValueError, match="returned 1 rewards for 2 completions"):
        from_reward_fn(lambda p, c: [1.0])(["p"], [["a", "b"]])
    with pytest.raises(ValueError, match="returned None"):
        from_reward_fn(lambda p, c: [1.0, None])(["p"], [["a", "b"]])
    with pytest.raises(TypeError, match="callable"):
        from_reward_fn("not a function")
    with pytest.raises(ValueError, match="scale must be a positive"):
        from_reward_fn(len, scale=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        from_reward_fn(len, batch_size=0)


def _biased_judge(log):
    """P(a ≻ b) from a table, plus a position bias: the first-listed candidate gets +0.1."""
    base = {("x", "y"): 0.7, ("x", "z"): 0.8, ("y", "z"): 0.6}

    def judge(prompt, a, b):
        log.append((prompt, a, b))
        return (base[(a, b)] if (a, b) in base else 1 - base[(b, a)]) + 0.1

    return judge


def test_pairwise_symmetrises_and_fills_the_matrix():
    log = []
    probs = from_pairwise(_biased_judge(log))(["q"], [["x", "y", "z"]])
    # Both orders asked once per unordered pair (6 calls), the diagonal never.
    assert sorted(log) == sorted(("q", a, b) for a in "xyz" for b in "xyz" if a != b)
    # P[x, y] = ½·(f(x, y) + 1 − f(y, x)) = ½·(0.8 + 1 − 0.4) = 0.7; likewise (0.9 + 1 − 0.3)/2 = 0.8 and
    # (0.7 + 1 − 0.5)/2 = 0.6: the bias cancels.
    expected = t([[[0.5, 0.7, 0.8], [0.3, 0.5, 0.6], [0.2, 0.4, 0.5]]])
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-12)
    assert_probability_matrix(probs)

    log.clear()
    raw = from_pairwise(_biased_judge(log), symmetrize=False)(["q"], [["x", "y", "z"]])
    assert log == [("q", "x", "y"), ("q", "x", "z"), ("q", "y", "z")]  # i < j only
    expected = t([[[0.5, 0.8, 0.9], [0.2, 0.5, 0.7], [0.1, 0.3, 0.5]]])
    torch.testing.assert_close(raw, expected, rtol=0, atol=1e-12)


def test_pairwise_batched_matches_unbatched():
    def judge(prompt, a, b):
        return sigmoid(len(a) - 2 * len(b) + len(prompt))

    calls = []

    def batched(prompts, a_list, b_list):
        calls.append(len(prompts))
        return [judge(p, a, b) for p, a, b in zip(prompts, a_list, b_list)]

    prompts, candidates = ["p", "qq"], [["a", "bb", "ccc"], ["dddd", "e", "ff"]]
    one_by_one = from_pairwise(judge)(prompts, candidates)
    together = from_pairwise(batched, batched=True)(prompts, candidates)
    assert calls == [2 * 2 * 3]  # one call: 2 prompts × 3 pairs × 2 orders
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=0)
    assert_probability_matrix(one_by_one)


def test_pairwise_rejects_non_probabilities_before_averaging():
    # (1.5 + 1 − 0.7) / 2 = 0.9 would look valid after symmetrising: the raw answer must be caught.
    judge = {("a", "b"): 1.5, ("b", "a"): 0.7}
    with pytest.raises(ValueError, match=r"returned 1.5 for P\('a' ≻ 'b'\).*\[0, 1\]"):
        from_pairwise(lambda p, a, b: judge[(a, b)])(["q"], [["a", "b"]])
    with pytest.raises(ValueError, match="returned nan"):
        from_pairwise(lambda p, a, b: float("nan"))(["q"], [["a", "b"]])
    with pytest.raises(ValueError, match="returned 1 probabilities for 2 pairs"):
        from_pairwise(lambda p, a, b: [0.5], batched=True)(["q"], [["a", "b"]])


@pytest.fixture(scope="module")
def reward_model():
    tok = tiny_tokenizer()
    config = tiny_config("qwen2", tok, num_labels=1, initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
    return model.eval(), tok


def _direct_reward(model, tok, text: str) -> float:
    """The reward of one text, unpadded (no batching to get wrong)."""
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits[0, 0].item()


PROMPTS = ["What is 2 + 3?", "Hello!"]
CANDIDATES = [["The answer is 5.", "5", "Let me think about it. 6"], ["Hi, how are you?", "Good night.", "Hi"]]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_reward_model_matches_direct_forward(reward_model, padding_side):
    model, tok = reward_model
    tok = tiny_tokenizer()
    tok.padding_side = padding_side
    modes = []
    hook = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.train()  # the adapter must score in eval mode (no dropout) and restore the mode
    try:
        adapter = from_reward_model(model, tok, batch_size=4)  # 6 texts: batches cross prompts
        probs = annotate(adapter, PROMPTS, CANDIDATES)
        assert model.training
    finally:
        model.eval()
        hook.remove()
    assert modes == [False, False]
    assert probs.shape == (2, 3, 3) and probs.dtype == F64
    assert_probability_matrix(probs)
    assert not adapter.rewards(PROMPTS, CANDIDATES).requires_grad

    def templated(prompt, completion):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return tok.apply_chat_template(messages, tokenize=False)

    rewards = [[_direct_reward(model, tok, templated(p, c)) for c in group] for p, group in zip(PROMPTS, CANDIDATES)]
    expected = t([[[sigmoid(r[i] - r[j]) for j in range(3)] for i in range(3)] for r in rewards])
    torch.testing.assert_close(probs, expected, rtol=0, atol=2e-6)
    # The model must tell the candidates apart for the comparison to mean anything.
    assert (probs - 0.5).abs().max() > 0.01

    # Without the template: prompt + completion as plain text, and a different matrix.
    plain = from_reward_model(model, tok, use_chat_template=False)(PROMPTS, CANDIDATES)
    rewards = [[_direct_reward(model, tok, p + c) for c in group] for p, group in zip(PROMPTS, CANDIDATES)]
    expected_plain = t([[[sigmoid(r[i] - r[j]) for j in range(3)] for i in range(3)] for r in rewards])
    torch.testing.assert_close(plain, expected_plain, rtol=0, atol=2e-6)
    assert (plain - probs).abs().max() > 1e-3


def test_reward_model_errors(reward_model):
    model, _ = reward_model
    tok = tiny_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match=r"no pad token.*tokenizer\.pad_token = tokenizer\.eos_token"):
        from_reward_model(model, tok)

    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        from_reward_model(model, tok, use_chat_template=True)
    assert from_reward_model(model, tok).use_chat_template is False  # auto: plain text

    config = tiny_config("qwen2", tok, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2"):
        from_reward_model(AutoModelForSequenceClassification.from_config(config), tok)
    config = tiny_config("qwen2", tok, num_labels=1, pad_token_id=None)
    with pytest.raises(ValueError, match=r"model\.config\.pad_token_id = tokenizer\.pad_token_id"):
        from_reward_model(AutoModelForSequenceClassification.from_config(config), tok)
    config = tiny_config("qwen2", tok, num_labels=1, pad_token_id=tok.eos_token_id)
    with pytest.raises(ValueError, match=r"differs from tokenizer\.pad_token_id"):
        from_reward_model(AutoModelForSequenceClassification.from_config(config), tok)


def test_pairrm_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_blender", None)  # makes `import llm_blender` raise ImportError
    with pytest.raises(ImportError, match=re.escape("pip install git+https://github.com/yuchenlin/LLM-Blender.git")):
        pairrm()
    with pytest.raises(ImportError, match=re.escape(PAIRRM_INSTALL)):
        pairrm("llm-blender/PairRM")


def test_pairrm_uses_rank_scores_bradley_terry(monkeypatch):
    """With a stand-in for llm_blender: the checkpoint is loaded and σ(s_i − s_j) of the rank scores is returned."""
    events = []

    class Blender:
        def loadranker(self, path, **kwargs):
            events.append(("load", path, kwargs))

        def rank(self, prompts, candidates, return_scores=False, batch_size=1):
            events.append(("rank", prompts, candidates, return_scores, batch_size))
            return [[1.2, 0.3, -0.5, 0.9, -1.1]]

    monkeypatch.setitem(sys.modules, "llm_blender", types.SimpleNamespace(Blender=Blender))
    model = pairrm(batch_size=4, device="cpu")
    candidates = [["a", "b", "c", "d", "e"]]
    probs = annotate(model, ["q"], candidates)
    assert events == [("load", "llm-blender/PairRM", {"device": "cpu"}), ("rank", ["q"], candidates, True, 4)]
    assert probs[0, 0, 4].item() == pytest.approx(sigmoid(2.3))
    assert_probability_matrix(probs)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def test_valid_matrix_passes_within_tolerance():
    probs = t([[[0.5, 0.8], [0.2, 0.5]]])
    assert validate_preference_matrix(probs) is probs
    nudged = probs + t([[[1e-6, -2e-6], [3e-6, 0.0]]])
    validate_preference_matrix(nudged)  # float noise is fine
    assert validate_preference_matrix([[[0.5, 1.0], [0.0, 0.5]]]).shape == (1, 2, 2)  # lists are converted
    # Half precision: rounding of P[i, j] + P[j, i] up to the dtype's resolution is accepted, a real error is not.
    half = bradley_terry(torch.randn(4, 6, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    assert (half.double() + half.double().transpose(1, 2) - 1).abs().max() > 1e-4
    validate_preference_matrix(half)
    with pytest.raises(ValueError, match=r"P\[i, j\] \+ P\[j, i\]"):
        validate_preference_matrix(half * (1 - 0.1 * torch.triu(torch.ones_like(half), diagonal=1)))


@pytest.mark.parametrize(
    ("probs", "error", "match"),
    [
        ([[[0.5, 1.3], [-0.3, 0.5]]], ValueError, r"outside \[0, 1\].*torch\.sigmoid"),
        ([[[0.5, float("nan")], [0.5, 0.5]]], ValueError, r"NaN/inf at \[0, 0, 1\]"),
        ([[0.5, 0.8], [0.2, 0.5]], ValueError, r"shape \(2, 2\).*\(B, K, K\).*unsqueeze"),
        ([[[0.5, 0.8, 0.3], [0.2, 0.5, 0.4]]], ValueError, r"shape \(1, 2, 3\)"),
        ([[[0.4, 0.8], [0.2, 0.6]]], ValueError, r"P\[i, i\] = 0\.4 at \[0, 0, 0\].*diagonal must be 0\.5"),
        ([[[0.5, 0.8], [0.8, 0.5]]], ValueError, r"P\[i, j\] \+ P\[j, i\] = 1\.6.*\(P \+ 1 − Pᵀ\) / 2"),
        ([[[0.5]]], ValueError, r"K ≥ 2.*got K=1"),
        ([[[1, 1], [0, 1]]], TypeError, "floating-point"),
        ("probabilities", TypeError, "tensor of shape"),
    ],
    ids=["range", "nan", "2d", "not-square", "diagonal", "not-antisymmetric", "k1", "int", "str"],
)
def test_invalid_matrices_are_rejected(probs, error, match):
    if not isinstance(probs, str):
        probs = torch.tensor(probs)
    with pytest.raises(error, match=match):
        validate_preference_matrix(probs)


def test_annotate_checks_the_model_and_its_inputs():
    def wrong_shape(prompts, candidates):
        return torch.full((len(prompts), 2, 2), 0.5)

    with pytest.raises(ValueError, match=r"wrong_shape returned shape \(1, 2, 2\) but was given 1 prompts with 3"):
        annotate(wrong_shape, ["q"], [["a", "b", "c"]])

    def logits(prompts, candidates):
        return torch.tensor([[[0.0, 2.0], [-2.0, 0.0]]])

    with pytest.raises(ValueError, match="preference model logits returned values outside"):
        annotate(logits, ["q"], [["a", "b"]])

    with pytest.raises(ValueError, match=r"K ≥ 2 candidates.*got K=1"):
        annotate(from_reward_fn(lambda p, c: [0.0] * len(c)), ["q"], [["only one"]])
    with pytest.raises(ValueError, match="same number K"):
        check_candidates(["q", "r"], [["a", "b"], ["a", "b", "c"]])
    with pytest.raises(ValueError, match="2 prompts but 1 candidate lists"):
        check_candidates(["q", "r"], [["a", "b"]])
    with pytest.raises(TypeError, match=r"candidates\[0\] is a str"):
        check_candidates(["q"], ["ab"])
    with pytest.raises(ValueError, match="no prompts"):
        check_candidates([], [])


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


def test_best_worst_spec_vector():
    """Spec §3.6: PairRM scores s = [1.2, 0.3, −0.5, 0.9, −1.1] → chosen 0, rejected 4 and the three scalars."""
    scores = [1.2, 0.3, -0.5, 0.9, -1.1]
    pairs = select_best_worst(bradley_terry(t([scores])))
    assert indices(pairs) == [(0, 0, 4)]
    assert pairs.pair_win_prob.item() == pytest.approx(0.908877, abs=1e-6)
    assert pairs.chosen_win_prob.item() == pytest.approx(0.707961, abs=1e-6)
    assert pairs.rejected_win_prob.item() == pytest.approx(0.252497, abs=1e-6)
    assert pairs.chosen_win_prob.dtype == F64 and pairs.chosen_index.dtype == torch.long

    # Without the self-comparison: the mean over the 4 others.
    others = select_best_worst(bradley_terry(t([scores])), include_self=False)
    assert indices(others) == [(0, 0, 4)]
    assert others.chosen_win_prob.item() == pytest.approx(sum(sigmoid(1.2 - s) for s in scores[1:]) / 4)
    assert others.rejected_win_prob.item() == pytest.approx(sum(sigmoid(-1.1 - s) for s in scores[:4]) / 4)


def test_best_worst_on_a_general_matrix_and_a_batch():
    # Prompt 0: the cyclic matrix (row means 0.525, 0.4, 0.625, 0.45). Prompt 1: scores [0, 3, 1, 2].
    batch = torch.stack([t(CYCLIC), bradley_terry(t([0.0, 3.0, 1.0, 2.0]))])
    pairs = select_best_worst(batch)
    assert indices(pairs) == [(0, 2, 1), (1, 1, 0)]
    assert pairs.chosen_win_prob.tolist()[0] == pytest.approx(0.625)
    assert pairs.rejected_win_prob.tolist()[0] == pytest.approx(0.4)
    assert pairs.pair_win_prob.tolist() == pytest.approx([0.8, sigmoid(3.0)])
    torch.testing.assert_close(mean_win_rate(batch)[0], t([0.525, 0.4, 0.625, 0.45]))


def test_best_worst_ties_go_to_the_lowest_index():
    batch = torch.stack(
        [
            bradley_terry(t([1.0, 2.0, 2.0, 0.0, 0.0])),  # best tied 1/2, worst tied 3/4 → (1, 3)
            torch.full((5, 5), 0.5, dtype=F64),  # everything ties → (0, 1), never (0, 0)
            bradley_terry(t([5.0, 5.0, 5.0, 5.0, 4.0])),  # best tied 0..3 → 0; unique worst 4
        ]
    )
    pairs = select_best_worst(batch)
    assert indices(pairs) == [(0, 1, 3), (1, 0, 1), (2, 0, 4)]
    assert pairs.pair_win_prob[1].item() == 0.5
    # drop_ties drops the group with no preference; prompt_index keeps the survivors' prompts.
    kept = select_best_worst(batch, drop_ties=True)
    assert indices(kept) == [(0, 1, 3), (2, 0, 4)]
    assert kept.chosen_win_prob.tolist() == [pairs.chosen_win_prob[0].item(), pairs.chosen_win_prob[2].item()]
    # Near-ties within tie_tol count as ties; a larger gap does not.
    near = bradley_terry(t([[0.0, 1e-9, -1.0]]))
    assert indices(select_best_worst(near)) == [(0, 0, 2)]
    assert indices(select_best_worst(near, tie_tol=0.0)) == [(0, 1, 2)]


def test_tournament_brackets():
    # Winners' bracket: (0 v 1) → 0, (2 v 3) → 2, final (0 v 2) → 2. Others {0, 1, 3}, loser advances:
    # (0 v 1) → 1 advances, 3 has a bye, (1 v 3) → 1 wins (0.8), so 3 is the worst. Best/worst says (2, 1).
    pairs = select_tournament(t([CYCLIC]))
    assert indices(pairs) == [(0, 2, 3)]
    assert pairs.pair_win_prob.item() == pytest.approx(0.6)
    assert pairs.chosen_win_prob.item() == pytest.approx(0.625)
    assert pairs.rejected_win_prob.item() == pytest.approx(0.45)

    # Ties: the lower index advances in both brackets (consistent with best/worst).
    assert indices(select_tournament(torch.full((1, 5, 5), 0.5, dtype=F64))) == [(0, 0, 1)]
    assert indices(select_tournament(bradley_terry(t([[1.0, 1.0, 0.0, 0.0]])))) == [(0, 0, 2)]
    assert len(select_tournament(torch.full((1, 3, 3), 0.5, dtype=F64), drop_ties=True)) == 0


def test_tournament_equals_best_worst_for_transitive_preferences():
    generator = torch.Generator().manual_seed(0)
    for k in (2, 3, 5, 8):
        probs = bradley_terry(torch.randn(16, k, generator=generator, dtype=F64))
        expected = indices(select_best_worst(probs))
        assert indices(select_tournament(probs)) == expected
        # And best/worst is argmax/argmin of the scores behind a Bradley–Terry matrix (official SPPO).
        scores = torch.logit(probs[:, :, 0])  # s_i − s_0
        assert [c for _, c, _ in expected] == scores.argmax(-1).tolist()
        assert [r for _, _, r in expected] == scores.argmin(-1).tolist()


def test_all_pairs_orientation_order_and_ties():
    batch = torch.stack([t(CYCLIC), bradley_terry(t([1.0, 1.0, 0.0, 2.0]))])
    pairs = select_all_pairs(batch)
    assert indices(pairs) == [
        (0, 0, 1), (0, 2, 0), (0, 3, 0), (0, 2, 1), (0, 1, 3), (0, 2, 3),
        (1, 0, 1), (1, 0, 2), (1, 3, 0), (1, 1, 2), (1, 3, 1), (1, 3, 2),
    ]  # fmt: skip
    assert pairs.pair_win_prob[:6].tolist() == pytest.approx([0.9, 0.6, 0.7, 0.8, 0.8, 0.6])
    assert (pairs.pair_win_prob >= 0.5).all()
    rates = mean_win_rate(batch)
    torch.testing.assert_close(pairs.chosen_win_prob, rates[pairs.prompt_index, pairs.chosen_index])
    torch.testing.assert_close(pairs.rejected_win_prob, rates[pairs.prompt_index, pairs.rejected_index])
    kept = select_all_pairs(batch, drop_ties=True)
    assert len(kept) == 11 and (1, 0, 1) not in indices(kept)


def test_select_pairs_dispatch_and_columns():
    probs = bradley_terry(t([[0.0, 2.0, 1.0]]))
    assert indices(select_pairs(probs)) == [(0, 1, 0)]
    assert indices(select_pairs(probs, "tournament")) == [(0, 1, 0)]
    assert len(select_pairs(probs, "all_pairs", drop_ties=True)) == 3
    with pytest.raises(ValueError, match=r"unknown pair-selection strategy 'max_min'.*best_worst"):
        select_pairs(probs, "max_min")
    with pytest.raises(ValueError, match="tie_tol"):
        select_best_worst(probs, tie_tol=-1.0)
    with pytest.raises(ValueError, match="outside"):
        select_best_worst(probs * 2)

    columns = select_pairs(probs, "all_pairs").to_columns(["q"], [["a", "b", "c"]])
    assert columns["prompt"] == ["q", "q", "q"]
    assert columns["chosen"] == ["b", "c", "b"] and columns["rejected"] == ["a", "a", "c"]
    assert columns["chosen_index"] == [1, 2, 1] and columns["prompt_index"] == [0, 0, 0]
    assert columns["pair_win_prob"] == pytest.approx([sigmoid(2.0), sigmoid(1.0), sigmoid(1.0)])
    assert set(select_pairs(probs).to_columns()) == {
        "prompt_index", "chosen_index", "rejected_index", "chosen_win_prob", "rejected_win_prob", "pair_win_prob",
    }  # fmt: skip
    from datasets import Dataset

    dataset = Dataset.from_dict(columns)
    assert dataset.num_rows == 3 and dataset.features["chosen_win_prob"].dtype == "float64"


def test_scalars_feed_sppo_loss():
    """The columns are what sppo_loss consumes: p_w, p_l for "sppo", P(y_w ≻ y_l) for "sppo_single"."""
    pairs = select_best_worst(bradley_terry(t([[1.2, 0.3, -0.5, 0.9, -1.1]])))
    policy_w, policy_l, opp_w, opp_l = t([-20.0]), t([-30.0]), t([-21.0]), t([-29.0])
    loss = sppo_loss(policy_w, policy_l, opp_w, opp_l, pairs.chosen_win_prob, pairs.rejected_win_prob, beta=0.01)
    a, b = 1.0, -1.0  # the log-ratios
    scores = [1.2, 0.3, -0.5, 0.9, -1.1]
    p_w, p_l = (sum(sigmoid(scores[i] - s) for s in scores) / 5 for i in (0, 4))
    expected = 0.5 * ((a - 100 * (p_w - 0.5)) ** 2 + (b - 100 * (p_l - 0.5)) ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-12) and loss.dtype == F64
    single = sppo_loss(policy_w, policy_l, opp_w, opp_l, pairs.pair_win_prob, beta=0.01, loss_type="sppo_single")
    p = sigmoid(2.3)
    expected = 0.5 * ((a - 100 * (p - 0.5)) ** 2 + (b + 100 * (p - 0.5)) ** 2)
    assert single.item() == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# The toy task's oracle
# --------------------------------------------------------------------------------------------------

TOY_CANDIDATES = [["5", "6", "15", " 5<|im_end|>x"], ["10", "11", "10", "9"]]


def test_toy_prefer_oracle_through_from_pairwise():
    task = ArithmeticTask(max_operand=10)
    probs = annotate(from_pairwise(task.prefer), ["2+3=", "4+6="], TOY_CANDIDATES)
    # Prompt 0: "5" and " 5<|im_end|>x" are right (equal length after the cut: tie), "6" and "15" wrong
    # ("6" is shorter, so it beats "15"). Prompt 1: both "10" right and tied; "11" and "9" wrong, "9" shorter.
    expected = t(
        [
            [[0.5, 1.0, 1.0, 0.5], [0.0, 0.5, 1.0, 0.0], [0.0, 0.0, 0.5, 0.0], [0.5, 1.0, 1.0, 0.5]],
            [[0.5, 1.0, 0.5, 1.0], [0.0, 0.5, 0.0, 0.0], [0.5, 1.0, 0.5, 1.0], [0.0, 1.0, 0.0, 0.5]],
        ]
    )
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)
    pairs = select_best_worst(probs)
    assert indices(pairs) == [(0, 0, 2), (1, 0, 1)]
    assert pairs.chosen_win_prob.tolist() == [0.75, 0.75]
    assert pairs.rejected_win_prob.tolist() == [0.125, 0.125]
    assert pairs.pair_win_prob.tolist() == [1.0, 1.0]
    columns = pairs.to_columns(["2+3=", "4+6="], TOY_CANDIDATES)
    assert task.reward_fn(columns["prompt"], columns["chosen"]) == [1.0, 1.0]
    assert task.reward_fn(columns["prompt"], columns["rejected"]) == [0.0, 0.0]


def test_toy_reward_fn_through_bradley_terry():
    task = ArithmeticTask(max_operand=10)
    probs = annotate(from_reward_fn(task.reward_fn, scale=4.0), ["2+3=", "4+6="], TOY_CANDIDATES)
    right, wrong = sigmoid(4.0), sigmoid(-4.0)
    expected_0 = [
        [0.5, right, right, 0.5],
        [wrong, 0.5, 0.5, wrong],
        [wrong, 0.5, 0.5, wrong],
        [0.5, right, right, 0.5],
    ]
    torch.testing.assert_close(probs[0], t(expected_0), rtol=0, atol=1e-12)
    pairs = select_best_worst(probs)
    # Rewards [1, 0, 0, 1] and [1, 0, 1, 0]: the lowest-index right answer against the lowest-index wrong one.
    assert indices(pairs) == [(0, 0, 1), (1, 0, 1)]
    assert pairs.chosen_win_prob[0].item() == pytest.approx((1.0 + 2 * right) / 4)
    assert pairs.rejected_win_prob[0].item() == pytest.approx((1.0 + 2 * wrong) / 4)
    assert indices(select_all_pairs(probs, drop_ties=True)) == [
        (0, 0, 1), (0, 0, 2), (0, 3, 1), (0, 3, 2), (1, 0, 1), (1, 0, 3), (1, 2, 1), (1, 2, 3),
    ]  # fmt: skip


def test_doctests():
    result = doctest.testmod(preference, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10 and result.failed == 0
