"""SWEET-RL's critic loss and turn advantages: the spec's vectors (specs/trainers.md §8.6) and a per-turn loop
re-derivation on random multi-turn layouts (padding and non-agent tokens interleaved)."""

import math
import random

import pytest
import torch

from hfx_trainers.losses import sweet_critic_loss, sweet_turn_advantage

F64 = torch.float64
CHOSEN = (torch.tensor([[-1.0, -0.5, -0.2, -0.8, -0.4]], dtype=F64),
          torch.tensor([[-1.2, -0.6, -0.3, -0.9, -0.5]], dtype=F64), torch.tensor([[0, 0, 0, 1, 1]]))
REJECTED = (torch.tensor([[-1.5, -0.7, -0.9, -0.4, -0.6, -1.0]], dtype=F64),
            torch.tensor([[-1.4, -0.6, -0.8, -0.5, -0.5, -0.9]], dtype=F64), torch.tensor([[0, 0, 1, 1, 1, 1]]))


@pytest.mark.parametrize(("normalization", "expected"), [("trajectory_mean", 0.683857), ("turn_mean_sum", 0.674164)])
def test_critic_loss_matches_spec_vector(normalization, expected):
    loss = sweet_critic_loss(*CHOSEN, *REJECTED, beta=0.1, normalization=normalization)
    assert loss.shape == (1,) and loss.item() == pytest.approx(expected, abs=1e-6)


def test_default_normalization_is_the_papers():
    assert sweet_critic_loss(*CHOSEN, *REJECTED).item() == pytest.approx(0.674164, abs=1e-6)


def _layout(rng, length):
    """Turn ids for one sequence: runs of user (−1) and agent (0, 1, ...) tokens, then padding (−1)."""
    ids, turn = [], 0
    while len(ids) < length - 3:
        ids += [-1] * rng.randint(1, 3)
        ids += [turn] * rng.randint(1, 4)
        turn += 1
    return (ids + [-1] * length)[:length]


def _reference_scores(lp, ref, turns, normalization):
    out = []
    for row_lp, row_ref, row_t in zip(lp.tolist(), ref.tolist(), turns.tolist()):
        per_turn = {}
        for a, b, t in zip(row_lp, row_ref, row_t):
            if t >= 0:
                per_turn.setdefault(t, []).append(a - b)
        if normalization == "turn_mean_sum":
            out.append(sum(sum(v) / len(v) for v in per_turn.values()))
        else:
            tokens = [x for v in per_turn.values() for x in v]
            out.append(sum(tokens) / len(tokens))
    return out


@pytest.mark.parametrize("normalization", ["turn_mean_sum", "trajectory_mean"])
def test_critic_loss_matches_loop_reference(normalization):
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    b, t = 4, 20
    sides = []
    for _ in range(2):
        lp = -torch.rand(b, t, generator=gen, dtype=F64) * 2
        ref = lp + 0.3 * torch.randn(b, t, generator=gen, dtype=F64)
        turns = torch.tensor([_layout(rng, t) for _ in range(b)])
        lp = lp.masked_fill(turns < 0, 123.0)  # values outside the agent's tokens must not matter
        sides.append((lp, ref, turns))
    loss = sweet_critic_loss(*sides[0], *sides[1], beta=0.7, normalization=normalization)
    s_w = _reference_scores(*sides[0], normalization)
    s_l = _reference_scores(*sides[1], normalization)
    expected = [math.log1p(math.exp(-0.7 * (w - l_))) for w, l_ in zip(s_w, s_l)]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


def test_turn_advantages_are_per_turn_mean_log_ratios():
    lp, ref, turns = REJECTED
    adv = sweet_turn_advantage(lp, ref, turns, beta=0.1)
    torch.testing.assert_close(adv, torch.tensor([[0.1 * -0.1, 0.1 * (-0.2 / 4)]], dtype=F64))
    # the paper's trajectory score is the sum of the turn advantages (divided by β)
    padded = (torch.cat([lp, torch.zeros(1, 2, dtype=F64)], 1), torch.cat([ref, torch.zeros(1, 2, dtype=F64)], 1),
              torch.cat([turns, torch.full((1, 2), -1)], 1))
    assert sweet_turn_advantage(*padded).sum().item() / 0.1 == pytest.approx(-0.15)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown normalization"):
        sweet_critic_loss(*CHOSEN, *REJECTED, normalization="mean")
    with pytest.raises(ValueError, match="must all be"):
        sweet_turn_advantage(CHOSEN[0], CHOSEN[1], torch.zeros(1, 4, dtype=torch.long))
