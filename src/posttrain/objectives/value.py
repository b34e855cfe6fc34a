"""What PPO with a value model adds to the policy-gradient pieces: GAE, the clipped value loss, and how well
the values explain the returns. Pure functions of flat per-token tensors laid out completion by completion
(``token_seq`` [N] names each token's completion), like ``advantages.py``.
"""

from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, token_seq: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", Eqs. 11-16), per completion:
    ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` after the last token is 0: the completion has ended),
    ``A_t = sum_l (gamma lam)^l delta_{t+l}``, and the value targets ``returns = A + V``.
    ``rewards`` [N] are per-token (the outcome at the last token, KL penalties at every token), ``values`` [N]
    the value model's estimates. Defaults are TRL's PPO (gamma 1, lam 0.95); whitening is left to the caller."""
    num = int(token_seq.max()) + 1 if token_seq.numel() else 0
    lengths = torch.bincount(token_seq, minlength=num)
    width = int(lengths.max()) if num else 0
    rank = torch.arange(len(token_seq), device=token_seq.device) - (torch.cumsum(lengths, 0) - lengths)[token_seq]
    padded_r = torch.zeros(num, width + 1, dtype=values.dtype, device=values.device)
    padded_v = torch.zeros_like(padded_r)
    padded_r[token_seq, rank] = rewards.to(values.dtype)
    padded_v[token_seq, rank] = values.detach()
    advantage = torch.zeros_like(padded_r)
    running = torch.zeros(num, dtype=values.dtype, device=values.device)
    for t in range(width - 1, -1, -1):  # padding past the end has r = V = 0, so it adds nothing
        delta = padded_r[:, t] + gamma * padded_v[:, t + 1] - padded_v[:, t]
        running = delta + gamma * lam * running
        advantage[:, t] = running
    advantages = advantage[token_seq, rank]
    return advantages, advantages + values.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (Schulman et al., 2017, as in OpenAI baselines' ppo2 and TRL):
    ``0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`` per token, so one rollout batch cannot move a
    value further than ``c`` (TRL's ``cliprange_value`` 0.2); ``clip=None`` is the plain squared error.
    Returns the per-token loss and whether the clipped branch was taken."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(values, dtype=torch.bool)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)``: 1 for perfect values, 0 for a constant, negative for worse than a constant."""
    variance = returns.var()
    return float("nan") if variance == 0 else float(1 - (returns - values).var() / variance)
