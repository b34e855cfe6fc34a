"""Reward-model objectives by hand (the comparison with TRL's RewardTrainer comes with the rm task)."""

import math

import pytest
import torch

from posttrain.objectives.reward import bradley_terry


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)
    losses = bradley_terry(chosen, rejected)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))], abs=1e-12)
    with_margin = bradley_terry(chosen, rejected, torch.tensor([1.0, 0.0]))
    assert with_margin.tolist() == pytest.approx([math.log(2.0), math.log(1 + math.exp(0.5))], abs=1e-12)
    centered = bradley_terry(chosen, rejected, center_coefficient=0.01)
    assert (centered - losses).tolist() == pytest.approx([0.01 * 9.0, 0.01 * 0.25], abs=1e-12)

