"""GAE, the clipped value loss and explained variance against loops and hand values."""

import math

import pytest
import torch

from posttrain.objectives.value import explained_variance, gae, value_loss

LENGTHS = [3, 1, 4]


def layout():
    token_seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(len(token_seq), generator=generator, dtype=torch.float64)
    values = torch.randn(len(token_seq), generator=generator, dtype=torch.float64)
    return token_seq, rewards, values


def gae_loop(rewards, values, gamma, lam):
    """The textbook recursion, one completion at a time."""
    advantages, t0 = [], 0
    for n in LENGTHS:
        r, v = rewards[t0 : t0 + n].tolist(), values[t0 : t0 + n].tolist()
        out, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            out[t] = running
        advantages += out
        t0 += n
    return advantages


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 1.0)])
def test_gae_against_a_loop(gamma, lam):
    token_seq, rewards, values = layout()
    advantages, returns = gae(rewards, values, token_seq, gamma, lam)
    expected = gae_loop(rewards, values, gamma, lam)
    assert advantages.tolist() == pytest.approx(expected, abs=1e-12)
    assert returns.tolist() == pytest.approx([a + v for a, v in zip(expected, values.tolist())], abs=1e-12)


def test_gae_special_cases():
    """lam 1, gamma 1: the advantage is the return-to-go minus the value (Monte Carlo); lam 0: the TD error."""
    token_seq, rewards, values = layout()
    mc, _ = gae(rewards, values, token_seq, 1.0, 1.0)
    t0, expected = 0, []
    for n in LENGTHS:
        r = rewards[t0 : t0 + n].tolist()
        expected += [sum(r[t:]) - values[t0 + t].item() for t in range(n)]
        t0 += n
    assert mc.tolist() == pytest.approx(expected, abs=1e-12)
    td, _ = gae(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25]), torch.tensor([0, 0]), 0.5, 0.0)
    assert td.tolist() == pytest.approx([1.0 + 0.5 * 0.25 - 0.5, 2.0 - 0.25])


def test_clipped_value_loss_by_hand():
    old = torch.tensor([0.0, 0.0, 0.0])
    new = torch.tensor([0.5, 0.1, -0.5])
    target = torch.tensor([1.0, 1.0, 1.0])
    loss, clipped = value_loss(new, old, target, clip=0.2)
    # 1: max((0.5-1)^2, (0.2-1)^2) = 0.64; 2: inside the range, 0.81; 3: max(2.25, (-0.2-1)^2 = 1.44) = 2.25
    assert loss.tolist() == pytest.approx([0.32, 0.405, 1.125])
    assert clipped.tolist() == [True, False, False]
    assert value_loss(new, old, target, clip=None)[0].tolist() == pytest.approx([0.125, 0.405, 1.125])


def test_clipped_value_loss_stops_the_gradient_beyond_the_range():
    new = torch.tensor([0.5], requires_grad=True)
    value_loss(new, torch.tensor([0.0]), torch.tensor([1.0]), clip=0.2)[0].sum().backward()
    assert new.grad.item() == 0.0


def test_explained_variance():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(returns, returns) == 1.0
    assert explained_variance(torch.full((4,), 2.5), returns) == pytest.approx(0.0)
    assert explained_variance(returns.flip(0), returns) < 0
    assert math.isnan(explained_variance(returns, torch.ones(4)))
