"""One micro-batch of sampled completions and the policy-gradient objective on it, shared by GRPO's family and
PPO."""

from __future__ import annotations

import numpy as np
import torch

from posttrain.objectives.policy import POLICY_LOSSES, kl_estimate, sampler_correction
from posttrain.data.tokenize import completion_example
from posttrain.objectives.policy import aggregation_weights
from posttrain.train.tasks.rollouts import RLBatch, Rollouts


def policy_terms(cfg, logps: torch.Tensor, entropy: torch.Tensor, rl: RLBatch) -> tuple[torch.Tensor, dict]:
    """The per-token policy loss of ``cfg.policy_loss`` (``rl:`` settings), with the sampler correction and the KL
    to the reference where asked, and its statistics as (sum, count) pairs over the trained tokens."""
    old = rl.old_logps.to(logps.dtype) if rl.old_logps is not None else logps.detach()
    spec = POLICY_LOSSES[cfg.policy_loss]
    out = spec.fn(logps, old, rl.advantages.to(logps.dtype), rl.batch.target_example,
                  **spec.options(None, cfg.hyperparameters()))
    sampler = rl.sampler_logps.to(logps.dtype)
    correction, corrected = sampler_correction(old, sampler, rl.batch.target_example, cfg.sampler_correction,
                                               cfg.sampler_correction_cap)
    per_token = out.loss * correction
    weights = rl.weights.to(logps.dtype)
    trained = weights > 0
    count = float(trained.sum())
    metrics = {
        "policy/clip_low_fraction": (float(out.clipped_low[trained].sum()), count),
        "policy/clip_high_fraction": (float(out.clipped_high[trained].sum()), count),
        "policy/entropy": (float(entropy[trained].sum()), count),
        "policy/approx_kl_old": (float((0.5 * (logps.detach() - old) ** 2)[trained].sum()), count),
        "policy/sampler_mismatch": (float((old - sampler).abs()[trained].sum()), count),
        "policy/sampler_kl": (float(kl_estimate(sampler, old, "k3")[trained].sum()), count),
    }
    if cfg.sampler_correction != "none":
        metrics["policy/sampler_corrected_fraction"] = (float(corrected[trained].sum()), count)
    if rl.ref_logps is not None:
        kl = kl_estimate(logps, rl.ref_logps.to(logps.dtype), cfg.kl_estimator)
        per_token = per_token + cfg.kl_coef * kl
        metrics["policy/kl_ref"] = (float(kl.detach()[trained].sum()), count)
    return per_token, metrics


def completions_batch(rollouts: Rollouts, members, pack, aggregation: str, max_new_tokens: int) -> RLBatch:
    """The micro-batch of completions ``members`` of a rollout batch, packed by ``pack`` (a prompt laid out once
    for its completions), with each target's advantage, log-probs and aggregation weight; completions the overlong
    filter masks leave the normalizer too (the active ones are renumbered among themselves)."""
    members = list(members)
    examples = [completion_example(rollouts.prompt_ids[i], rollouts.completion_ids[i], rollouts.mask(i), index=i)
                for i in members]  # tool output tokens are context (weight 0), not targets
    batch = pack(examples, [len(rollouts.prompt_ids[i]) for i in members])
    counts = rollouts.model_tokens()
    offsets = np.cumsum([0] + counts)
    lengths = torch.tensor([counts[i] for i in members])
    starts = torch.tensor([int(offsets[i]) for i in members])
    order = starts[batch.target_example] + batch.target_rank  # each target's place in the rollout's flat tensors
    firsts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), lengths[:-1]]), 0)
    local = firsts[batch.target_example] + batch.target_rank
    active = rollouts.active[members]
    weights, units = aggregation_weights(aggregation, batch.target_example, lengths, max_new_tokens)
    weights = weights * active[batch.target_example].to(weights.dtype)
    if not bool(active.all()):  # inactive completions leave the normalizer too (renumbered among the active)
        kept = active[batch.target_example]
        renumbered = (torch.cumsum(active.long(), 0) - 1)[batch.target_example[kept]]
        _, units = aggregation_weights(aggregation, renumbered, lengths[active], max_new_tokens)
    pick = lambda t: None if t is None else t[order]  # noqa: E731
    return RLBatch(batch, rollouts.advantages[order], rollouts.sampler_logps[order], weights, units,
                   pick(rollouts.old_logps), pick(rollouts.ref_logps), pick(rollouts.values), pick(rollouts.returns),
                   {"order": local})
