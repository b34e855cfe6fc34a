"""Advantage estimators for learning from the model's own samples (registered, as verl's ``register_adv_est``).

Every estimator sees one optimizer step's rollouts at once, before they are split into
micro-batches, so a group of completions is never split and accumulation cannot change an
advantage. Inputs, per completion: ``rewards`` [B] and ``groups`` [B] (the prompt each completion
answers: completions of one prompt form a group); per token: ``token_seq`` [N] (the completion each
sampled token belongs to, tokens laid out completion by completion) and ``token_penalty`` [N], the
per-token reward shaping (``-kl_coef * KL estimate`` with ``rl.kl_in: reward``, else zeros). Outcome
estimators add a completion's summed penalty to its reward; REINFORCE++ keeps it per token in the
returns. Every estimator returns per-token advantages [N].
"""

from __future__ import annotations

import torch

from posttrain.objectives.registry import Registry

ADVANTAGES = Registry("advantage estimator", key="rl.advantage", settings="rl")


def group_statistics(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each completion's group mean, unbiased group standard deviation (0 for a group of one) and group size."""
    _, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1, dtype=rewards.dtype, device=rewards.device).index_add(0, inverse,
                                                                                                      torch.ones_like(rewards))
    total = torch.zeros_like(count).index_add(0, inverse, rewards)
    mean = (total / count)[inverse]
    squares = torch.zeros_like(count).index_add(0, inverse, (rewards - mean) ** 2)
    std = (squares / (count - 1).clamp(min=1)).sqrt()[inverse]
    return mean, std, count[inverse]


def whiten(values: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over all values, unbiased variance (verl's ``masked_whiten``). At most one
    value has no variance (NaN): it is its own mean, so it whitens to 0."""
    if values.numel() < 2:
        return torch.zeros_like(values)
    return (values - values.mean()) * torch.rsqrt(values.var() + epsilon)


def _with_penalty(rewards: torch.Tensor, token_seq: torch.Tensor, token_penalty: torch.Tensor) -> torch.Tensor:
    return rewards + torch.zeros_like(rewards).index_add(0, token_seq, token_penalty.to(rewards.dtype))


@ADVANTAGES.register("grpo")
def grpo(rewards, groups, token_seq, token_penalty, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO (Shao et al., 2024, "DeepSeekMath", Sec. 4.1.2, outcome supervision): every token of completion i
    gets ``(r_i - mean(group)) / (std + eps)``, std the unbiased standard deviation of the group (``scale_rewards:
    group``, the paper), of the whole batch (``batch``, as Liu et al. 2025 recommend against the group-std
    difficulty bias), or no scaling (``none``). eps 1e-4 as TRL. A group of one gets advantage 0 (a step of one too)."""
    epsilon = 1e-4
    rewards = _with_penalty(rewards, token_seq, token_penalty)
    mean, std, count = group_statistics(rewards, groups)
    centred = torch.where(count > 1, rewards - mean, torch.zeros_like(rewards))
    if scale_rewards == "group":
        centred = centred / (std + epsilon)
    elif scale_rewards == "batch":  # one completion has no std (NaN), and advantage 0 already
        centred = centred / ((rewards.std() if len(rewards) > 1 else 0.0) + epsilon)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    return centred[token_seq]


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards, groups, token_seq, token_penalty) -> torch.Tensor:
    """Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training", Eq. 3): ``r_i - mean(group)``, no
    division by the group's std (the question-difficulty bias); pair it with the ``seq_mean_token_sum_norm``
    aggregation, which removes the length bias."""
    rewards = _with_penalty(rewards, token_seq, token_penalty)
    mean, _, count = group_statistics(rewards, groups)
    return torch.where(count > 1, rewards - mean, torch.zeros_like(rewards))[token_seq]


@ADVANTAGES.register("rloo")
def rloo(rewards, groups, token_seq, token_penalty) -> torch.Tensor:
    """RLOO (Ahmadian et al., 2024, "Back to Basics", Eq. 8; Kool et al., 2019): each completion's baseline is the
    mean reward of the *other* completions of its prompt, ``r_i - (sum_j r_j - r_i) / (k - 1)``."""
    rewards = _with_penalty(rewards, token_seq, token_penalty)
    mean, _, count = group_statistics(rewards, groups)
    others = (mean * count - rewards) / (count - 1).clamp(min=1)
    return torch.where(count > 1, rewards - others, torch.zeros_like(rewards))[token_seq]


@ADVANTAGES.register("reinforce_pp", needs=["kl_in_reward"])
def reinforce_pp(rewards, groups, token_seq, token_penalty) -> torch.Tensor:
    """REINFORCE++ (Hu et al., 2025, Eqs. 5-7): the reward arrives at the last token, every token pays its KL
    penalty (``rl.kl_in: reward``, ``rl.kl_coef``), the return of token t is the sum of what follows (gamma 1),
    and the returns are whitened over every token of the batch (no critic, no groups)."""
    last = _last_token(token_seq, len(rewards))
    per_token = token_penalty.to(rewards.dtype).index_add(0, last, rewards)
    return whiten(_reverse_cumsum_per_sequence(per_token, token_seq, len(rewards)))


@ADVANTAGES.register("reinforce_pp_baseline")
def reinforce_pp_baseline(rewards, groups, token_seq, token_penalty) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al., 2025, Sec. 3.2): the group mean is subtracted from each reward, then the
    per-token advantages are whitened over every token of the batch (as verl's implementation)."""
    rewards = _with_penalty(rewards, token_seq, token_penalty)
    mean, _, count = group_statistics(rewards, groups)
    centred = torch.where(count > 1, rewards - mean, torch.zeros_like(rewards))
    return whiten(centred[token_seq])


@ADVANTAGES.register("remax", needs=["greedy_baseline"])
def remax(rewards, groups, token_seq, token_penalty, baselines) -> torch.Tensor:
    """ReMax (Li et al., 2024, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
    Aligning LLMs", Alg. 1): the baseline of a prompt is the reward of its *greedy* completion, so each token's
    advantage is its return (the reward at the last token plus the KL penalties from t on, gamma 1) minus
    ``baselines`` [B], the greedy reward of the completion's prompt; no normalization (as verl's
    ``compute_remax_outcome_advantage``). Costs one greedy generation per prompt."""
    last = _last_token(token_seq, len(rewards))
    per_token = token_penalty.to(rewards.dtype).index_add(0, last, rewards)
    return _reverse_cumsum_per_sequence(per_token, token_seq, len(rewards)) - baselines.to(rewards.dtype)[token_seq]


def _last_token(token_seq: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Index of each sequence's last token, for tokens laid out sequence by sequence."""
    positions = torch.arange(len(token_seq), device=token_seq.device)
    return torch.full((num_sequences,), -1, dtype=torch.long, device=token_seq.device).scatter_reduce(
        0, token_seq, positions, reduce="amax")


def _reverse_cumsum_per_sequence(values: torch.Tensor, token_seq: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """``sum_{t' >= t}`` within each sequence, for tokens laid out sequence by sequence, in order."""
    totals = torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add(0, token_seq, values)
    before = values.cumsum(0) - values  # everything before t, across sequences
    first = torch.full((num_sequences,), len(values), dtype=torch.long, device=values.device).scatter_reduce(
        0, token_seq, torch.arange(len(values), device=values.device), reduce="amin")
    return totals[token_seq] - (before - before[first][token_seq])


def advantages(name: str, rewards: torch.Tensor, groups: torch.Tensor, token_seq: torch.Tensor,
               token_penalty: torch.Tensor | None = None, baselines: torch.Tensor | None = None,
               **settings) -> torch.Tensor:
    """Per-token advantages [N] by the registered estimator ``name``; unset settings take its defaults.
    ``baselines`` [B]: the greedy completion's reward per completion, for estimators that need it (remax)."""
    spec = ADVANTAGES[name]
    inputs = {"baselines": baselines} if "greedy_baseline" in spec.needs else {}
    if inputs and baselines is None:
        raise ValueError(f"advantage estimator {name} needs the greedy baselines")
    if rewards.numel() == 0:  # dynamic sampling dropped every group
        return torch.zeros(token_seq.shape, dtype=rewards.dtype, device=rewards.device)
    if token_penalty is None:
        token_penalty = torch.zeros(token_seq.shape, dtype=rewards.dtype, device=rewards.device)
    return spec.fn(rewards, groups, token_seq, token_penalty, **inputs, **spec.options(None, settings))
