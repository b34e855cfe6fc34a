"""Policy-gradient losses, KL estimators and loss aggregation for learning from the model's own samples.

All three are pure functions of per-token tensors (the sampled tokens of a micro-batch, flat [N]),
registered by name so a recipe picks them with ``rl.policy_loss``, ``rl.kl_estimator`` and
``rl.aggregation``. A policy loss returns the per-token loss and clip indicators; aggregation turns
per-token losses into the step loss through per-token weights and a normalizer that the engine sums
over every micro-batch and process of the step before any backward pass, so neither accumulation
nor the number of processes changes the loss (the bug TRL #3021, verl #5625 and ms-swift #10117 report).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.objectives.registry import Registry

POLICY_LOSSES = Registry("policy loss", key="rl.policy_loss", settings="rl")


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # [N] per-token loss
    clipped_low: torch.Tensor  # [N] bool: the ratio hit the lower bound where it mattered
    clipped_high: torch.Tensor  # [N] bool: the ratio hit the upper bound where it mattered


def _log_ratio(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    return (logps - old_logps).clamp(-20.0, 20.0)  # as verl: keeps exp finite on wild first steps


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logps, old_logps, advantages, token_seq, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
             dual_clip: float | None = None) -> PolicyLossOutput:
    """PPO's clipped surrogate (Schulman et al., 2017, Eq. 7), per token:
    ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` with ``r = pi / pi_old``. DAPO (Yu et al., 2025)
    raises ``epsilon_high`` to 0.28 ("clip-higher") so low-probability tokens can grow. ``dual_clip`` c > 1
    (Ye et al., 2020) also bounds the loss of negative-advantage tokens by ``-A c``."""
    ratio = _log_ratio(logps, old_logps).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = torch.maximum(unclipped, clipped)
    low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
    high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"rl.dual_clip must be > 1, got {dual_clip}")
        bounded = torch.minimum(loss, -advantages * dual_clip)
        low = low | ((advantages < 0) & (bounded < loss))
        loss = torch.where(advantages < 0, bounded, loss)
    return PolicyLossOutput(loss, low, high)


@POLICY_LOSSES.register("gspo")
def gspo(logps, old_logps, advantages, token_seq, epsilon_low: float = 3e-4,
         epsilon_high: float = 4e-4) -> PolicyLossOutput:
    """GSPO (Zheng et al., 2025, "Group Sequence Policy Optimization", Eqs. 5-7 and GSPO-token, Eq. 13): the
    importance ratio is the sequence's length-normalized likelihood ratio
    ``s_i = exp(mean_t log(pi / pi_old))``, clipped per sequence; the per-token form
    ``s_i,t = sg(s_i) * pi_t / sg(pi_t)`` has the same value and gradient and allows token advantages.
    The paper's clip range is (3e-4, 4e-4) around 1; aggregate with ``seq_mean_token_mean``."""
    log_ratio = _log_ratio(logps, old_logps)
    num = int(token_seq.max()) + 1 if token_seq.numel() else 0
    count = torch.zeros(num, dtype=log_ratio.dtype, device=log_ratio.device).index_add(0, token_seq,
                                                                                       torch.ones_like(log_ratio))
    mean = torch.zeros_like(count).index_add(0, token_seq, log_ratio.detach()) / count.clamp(min=1)
    ratio = (mean[token_seq] + logps - logps.detach()).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
    high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    return PolicyLossOutput(torch.maximum(unclipped, clipped), low, high)


@POLICY_LOSSES.register("cispo")
def cispo(logps, old_logps, advantages, token_seq, epsilon_low: float = 1.0,
          epsilon_high: float = 0.28) -> PolicyLossOutput:
    """CISPO (MiniMax, 2025, "MiniMax-M1", Eq. 4): clip the importance weight, not the update, so every token keeps
    its gradient: ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi``. As the paper, no lower bound by
    default (eps_low 1); eps_high 0.28 as verl / Trinity-RFT."""
    ratio = _log_ratio(logps, old_logps).exp().detach()
    weight = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    return PolicyLossOutput(-weight * advantages * logps, ratio < 1.0 - epsilon_low, ratio > 1.0 + epsilon_high)


@POLICY_LOSSES.register("reinforce", needs=["on_policy"])
def reinforce(logps, old_logps, advantages, token_seq) -> PolicyLossOutput:
    """REINFORCE (Williams, 1992) with the advantage as the weight: ``-A * log pi``. Unbiased only on-policy
    (``rl.num_iterations: 1``); RLOO and REINFORCE++ are this loss with their advantage estimators."""
    never = torch.zeros_like(logps, dtype=torch.bool)
    return PolicyLossOutput(-advantages * logps, never, never)


# -- sampler / trainer mismatch -------------------------------------------------------------------
CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_correction(old_logps: torch.Tensor, sampler_logps: torch.Tensor, token_seq: torch.Tensor, mode: str,
                       cap: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights for tokens drawn by a sampler whose log-probs differ from the trainer's (another engine,
    another precision): ``rho = pi_trainer_old / pi_sampler`` per token, or its product over a completion at the
    sequence level. ``*_truncate`` multiplies the loss by ``min(rho, cap)`` (truncated importance sampling, Yao et
    al., 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; verl's cap 2.0);
    ``*_mask`` drops what lies outside ``[1 / cap, cap]``. Returns the detached per-token weights and which tokens
    were capped or masked."""
    if mode == "none":
        return torch.ones_like(old_logps), torch.zeros_like(old_logps, dtype=torch.bool)
    log_rho = (old_logps - sampler_logps).detach()
    level, action = mode.split("_")
    if level == "sequence":
        num = int(token_seq.max()) + 1 if token_seq.numel() else 0
        log_rho = torch.zeros(num, dtype=log_rho.dtype, device=log_rho.device).index_add(0, token_seq,
                                                                                         log_rho)[token_seq]
    rho = log_rho.clamp(-20.0, 20.0).exp()
    if action == "truncate":
        return rho.clamp(max=cap), rho > cap
    outside = (rho > cap) | (rho < 1.0 / cap)
    return (~outside).to(rho.dtype), outside


# -- KL to the reference --------------------------------------------------------------------------
def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, 2020, "Approximating KL divergence"),
    with ``log_r = log pi_ref - log pi``: ``k1 = -log_r`` (unbiased, high variance, may be negative),
    ``k2 = log_r^2 / 2`` (its gradient is the true KL gradient on-policy), ``k3 = exp(log_r) - 1 - log_r``
    (unbiased, low variance, always >= 0; GRPO's choice). Their expected gradients differ from their values'
    (TRL #4967): in the loss k1 gives 0 (refused), k2 grad KL(pi || ref), k3 grad KL(ref || pi); in the reward
    (``rl.kl_in: reward``, score function) k1 gives grad KL(pi || ref), k3 grad KL(pi || ref) - grad KL(ref || pi)."""
    log_r = (ref_logps - logps).clamp(-20.0, 20.0)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return (log_r.exp() - 1.0 - log_r).clamp(max=10.0)  # verl's bound against rare huge ratios
    raise ValueError(f"rl.kl_estimator must be k1, k2, k3 or none, got {estimator!r}")


# -- aggregation ----------------------------------------------------------------------------------
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def aggregation_weights(mode: str, token_seq: torch.Tensor, lengths: torch.Tensor,
                        max_new_tokens: int) -> tuple[torch.Tensor, float]:
    """Per-token weights and this micro-batch's share of the normalizer, such that the step loss is
    ``sum over the step's tokens (weight * loss) / sum over the step's micro-batches (normalizer)``:

    - ``token_mean`` (DAPO, Yu et al. 2025): every token counts once: weight 1, normalizer = tokens;
    - ``seq_mean_token_mean`` (GRPO paper, Shao et al. 2024, Eq. 3): mean over tokens, then over sequences:
      weight 1 / |o_i|, normalizer = sequences;
    - ``seq_mean_token_sum``: summed over tokens, mean over sequences: weight 1, normalizer = sequences;
    - ``seq_mean_token_sum_norm`` (Dr. GRPO, Liu et al. 2025): token sums divided by a constant, the generation
      budget: weight 1, normalizer = sequences x max_new_tokens.

    ``lengths`` [S] are the sequences' token counts, ``token_seq`` [N] the sequence of each token."""
    ones = torch.ones(token_seq.shape, dtype=torch.float64, device=token_seq.device)
    sequences = float(len(lengths))
    if mode == "token_mean":
        return ones, float(len(token_seq))
    if mode == "seq_mean_token_mean":
        return 1.0 / lengths.to(torch.float64)[token_seq], sequences
    if mode == "seq_mean_token_sum":
        return ones, sequences
    if mode == "seq_mean_token_sum_norm":
        return ones, sequences * max_new_tokens
    raise ValueError(f"rl.aggregation must be one of {', '.join(AGGREGATIONS)}, got {mode!r}")


def aggregate(per_token: torch.Tensor, token_seq: torch.Tensor, mode: str, max_new_tokens: int) -> torch.Tensor:
    """The aggregated loss of a whole step at once (what the engine's micro-batch sums add up to)."""
    lengths = torch.bincount(token_seq)
    weights, normalizer = aggregation_weights(mode, token_seq, lengths, max_new_tokens)
    return (per_token * weights.to(per_token.dtype)).sum() / normalizer
