"""Reward-model objectives: pure functions of the scalar rewards a model gives to chosen and rejected completions.

Per-pair losses (summed by the caller over a step's pairs and divided by the step's pair count, so gradient
accumulation cannot change the loss scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_coefficient: float = 0.0) -> torch.Tensor:
    """Bradley-Terry pairwise loss (Bradley & Terry, 1952; as trained in Ouyang et al., 2022, Eq. 1), per pair:
    ``-log sigmoid(r_c - r_r - m)``, with Llama 2's per-pair margin ``m`` (Touvron et al., 2023, Eq. 2) when given,
    plus the ``center_rewards`` regularizer ``coefficient * (r_c + r_r)^2`` (Eisenstein et al., 2023), which keeps
    rewards near zero mean. The mean over pairs is TRL's ``RewardTrainer`` loss."""
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin.to(difference.dtype)
    losses = -F.logsigmoid(difference)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses
