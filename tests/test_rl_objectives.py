"""Advantage estimators, policy losses, KL estimators and aggregation against loops and hand values."""

import math
import statistics

import pytest
import torch

from posttrain.objectives.advantages import ADVANTAGES, advantages
from posttrain.objectives.policy import (
    AGGREGATIONS,
    aggregate,
    aggregation_weights,
    cispo,
    gspo,
    kl_estimate,
    ppo_clip,
    reinforce,
)

# three prompts: groups of 4, 4 and 1 completions (a lone completion has no baseline)
REWARDS = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.7]
GROUPS = [0, 0, 0, 0, 5, 5, 5, 5, 9]
LENGTHS = [3, 1, 2, 4, 2, 2, 1, 3, 2]


def layout(lengths=LENGTHS):
    token_seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    penalty = torch.linspace(-0.3, 0.2, len(token_seq), dtype=torch.float64)
    return token_seq, penalty


def members(i):
    return [j for j in range(len(GROUPS)) if GROUPS[j] == GROUPS[i]]


def per_token(values_per_sequence, lengths=LENGTHS):
    return [v for v, n in zip(values_per_sequence, lengths) for _ in range(n)]


def penalised_rewards(penalty):
    out, t = [], 0
    for r, n in zip(REWARDS, LENGTHS):
        out.append(r + sum(penalty[t : t + n].tolist()))
        t += n
    return out


def run(name, penalty=None, **settings):
    token_seq, _ = layout()
    return advantages(name, torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(GROUPS), token_seq, penalty,
                      **settings)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_against_a_loop(scale):
    expected = []
    for i, r in enumerate(REWARDS):
        group = [REWARDS[j] for j in members(i)]
        if len(group) == 1:
            expected.append(0.0)
            continue
        centred = r - statistics.mean(group)
        divisor = {"group": statistics.stdev(group) + 1e-4, "batch": statistics.stdev(REWARDS) + 1e-4,
                   "none": 1.0}[scale]
        expected.append(centred / divisor)
    assert run("grpo", scale_rewards=scale).tolist() == pytest.approx(per_token(expected), abs=1e-12)


def test_grpo_group_with_equal_rewards_gets_zero_advantage():
    values = run("grpo").tolist()
    assert values[sum(LENGTHS[:4]) : sum(LENGTHS[:8])] == [0.0] * sum(LENGTHS[4:8])


def test_dr_grpo_against_a_loop():
    expected = [
        0.0 if len(members(i)) == 1 else r - statistics.mean(REWARDS[j] for j in members(i))
        for i, r in enumerate(REWARDS)
    ]
    assert run("dr_grpo").tolist() == pytest.approx(per_token(expected), abs=1e-12)


def test_rloo_against_a_loop():
    expected = []
    for i, r in enumerate(REWARDS):
        others = [REWARDS[j] for j in members(i) if j != i]
        expected.append(r - sum(others) / len(others) if others else 0.0)
    assert run("rloo").tolist() == pytest.approx(per_token(expected), abs=1e-12)


def test_outcome_estimators_add_the_summed_token_penalty_to_the_reward():
    _, penalty = layout()
    shaped = penalised_rewards(penalty)
    expected = []
    for i, r in enumerate(shaped):
        others = [shaped[j] for j in members(i) if j != i]
        expected.append(r - sum(others) / len(others) if others else 0.0)
    assert run("rloo", penalty).tolist() == pytest.approx(per_token(expected), abs=1e-12)


def whiten_list(values):
    mean = statistics.mean(values)
    return [(v - mean) / math.sqrt(statistics.variance(values) + 1e-8) for v in values]


def test_reinforce_pp_against_a_loop():
    """Reward at the last token, KL penalty at every token, undiscounted returns, whitened over the batch."""
    _, penalty = layout()
    returns, t = [], 0
    for r, n in zip(REWARDS, LENGTHS):
        step_rewards = penalty[t : t + n].tolist()
        step_rewards[-1] += r
        returns += [sum(step_rewards[k:]) for k in range(n)]
        t += n
    assert run("reinforce_pp", penalty).tolist() == pytest.approx(whiten_list(returns), abs=1e-12)


def test_reinforce_pp_baseline_against_a_loop():
    centred = [
        0.0 if len(members(i)) == 1 else r - statistics.mean(REWARDS[j] for j in members(i))
        for i, r in enumerate(REWARDS)
    ]
    assert run("reinforce_pp_baseline").tolist() == pytest.approx(whiten_list(per_token(centred)), abs=1e-12)


def test_remax_against_a_loop():
    """Return (reward at the last token plus the KL penalties from t on) minus the greedy completion's reward."""
    _, penalty = layout()
    greedy = {0: 0.5, 5: 1.0, 9: 0.0}
    baselines = torch.tensor([greedy[g] for g in GROUPS], dtype=torch.float64)
    expected, t = [], 0
    for r, n, g in zip(REWARDS, LENGTHS, GROUPS):
        step_rewards = penalty[t : t + n].tolist()
        step_rewards[-1] += r
        expected += [sum(step_rewards[k:]) - greedy[g] for k in range(n)]
        t += n
    assert run("remax", penalty, baselines=baselines).tolist() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="greedy"):
        run("remax")


@pytest.mark.parametrize("name, settings", [("grpo", {"scale_rewards": s}) for s in ("group", "batch", "none")]
                         + [(n, {}) for n in ("dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")])
@pytest.mark.parametrize("length", [1, 3])
def test_a_step_of_one_completion_gets_zero_advantage_not_nan(name, settings, length):
    """Nothing to compare one completion with (no group, a batch std of one value, whitening over one token): it
    cannot teach, so its advantage is 0, never NaN."""
    token_seq = torch.zeros(length, dtype=torch.long)
    penalty = torch.full((length,), -0.1, dtype=torch.float64) if length == 1 else torch.zeros(length,
                                                                                               dtype=torch.float64)
    values = advantages(name, torch.tensor([0.7], dtype=torch.float64), torch.tensor([3]), token_seq, penalty,
                        **settings)
    assert values.tolist() == pytest.approx([0.0] * length, abs=1e-9)  # identical returns whiten to rounding noise


def test_every_estimator_is_tested_here():
    assert set(ADVANTAGES) == {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax"}


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match="scale_rewards"):
        run("grpo", scale_rewards="sometimes")


# -- policy losses -----------------------------------------------------------------------------
def test_ppo_clip_by_hand():
    logps = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.2], dtype=torch.float64))
    old = torch.log(torch.tensor([0.25, 0.3, 0.2, 0.1], dtype=torch.float64))  # ratios 2, 1, 0.5, 2
    adv = torch.tensor([1.0, -1.0, -2.0, -1.0], dtype=torch.float64)
    out = ppo_clip(logps, old, adv, torch.arange(4), epsilon_low=0.2, epsilon_high=0.28)
    # max(-A r, -A clip(r)): 1 -> max(-2, -1.28) = -1.28; 2 -> 1; 3 -> max(1, 1.6) = 1.6; 4 -> max(2, 1.28) = 2
    assert out.loss.tolist() == pytest.approx([-1.28, 1.0, 1.6, 2.0])
    assert out.clipped_high.tolist() == [True, False, False, False]
    assert out.clipped_low.tolist() == [False, False, True, False]
    dual = ppo_clip(logps, old, adv, torch.arange(4), dual_clip=1.5)
    assert dual.loss.tolist() == pytest.approx([-1.2, 1.0, 1.6, 1.5])  # -A c bounds token 4: min(2, 1.5)


def test_ppo_clip_gradient_vanishes_outside_the_trust_region():
    logps = torch.log(torch.tensor([0.5, 0.26], dtype=torch.float64)).requires_grad_()
    old = torch.log(torch.tensor([0.25, 0.25], dtype=torch.float64))
    ppo_clip(logps, old, torch.tensor([1.0, 1.0], dtype=torch.float64), torch.arange(2)).loss.sum().backward()
    assert logps.grad[0] == 0.0 and logps.grad[1] == pytest.approx(-0.26 / 0.25)


def test_gspo_uses_the_length_normalized_sequence_ratio():
    token_seq = torch.tensor([0, 0, 1])
    old = torch.zeros(3, dtype=torch.float64)
    logps = torch.tensor([0.2, -0.1, 0.0], dtype=torch.float64, requires_grad=True)
    out = gspo(logps, old, torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64), token_seq, epsilon_low=1.0,
               epsilon_high=1.0)
    s0 = math.exp((0.2 - 0.1) / 2)
    assert out.loss.tolist() == pytest.approx([-s0, -s0, 1.0])
    out.loss.sum().backward()  # GSPO-token: each token's gradient is s_i * d log pi_t
    assert logps.grad.tolist() == pytest.approx([-s0, -s0, 1.0])
    clipped = gspo(logps.detach(), old, torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64), token_seq)
    assert clipped.clipped_high.tolist() == [True, True, False]  # s0 = 1.05 > 1 + 4e-4


def test_cispo_keeps_gradients_of_clipped_tokens_with_a_clipped_weight():
    logps = torch.log(torch.tensor([0.6, 0.2], dtype=torch.float64)).requires_grad_()
    old = torch.log(torch.tensor([0.3, 0.2], dtype=torch.float64))  # ratios 2 and 1
    out = cispo(logps, old, torch.tensor([1.0, 1.0], dtype=torch.float64), torch.arange(2))
    out.loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-1.28, -1.0])  # PPO would give 0 for the first token
    assert out.clipped_high.tolist() == [True, False]


def test_reinforce_is_advantage_weighted_log_likelihood():
    logps = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    assert reinforce(logps, logps, torch.tensor([0.5, -1.0], dtype=torch.float64),
                     torch.arange(2)).loss.tolist() == [0.5, -2.0]


def test_on_policy_ppo_gradient_equals_reinforce_gradient():
    """At ratio 1 every clipped objective has the REINFORCE gradient -A * grad log pi (the ratio's gradient
    is grad log pi): the reason the displayed loss of a GRPO step can be 0 while it still learns."""
    base = torch.log(torch.tensor([0.3, 0.1, 0.5], dtype=torch.float64))
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    grads = []
    for loss in (ppo_clip, reinforce, cispo):
        logps = base.clone().requires_grad_()
        loss(logps, base, adv, torch.arange(3)).loss.sum().backward()
        grads.append(logps.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[2], grads[1])


# -- KL --------------------------------------------------------------------------------------------
def test_kl_estimators_by_hand():
    logps, ref = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-1.5, -1.0], dtype=torch.float64)
    log_r = [-0.5, 1.0]
    assert kl_estimate(logps, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_estimate(logps, ref, "k2").tolist() == pytest.approx([x * x / 2 for x in log_r])
    assert kl_estimate(logps, ref, "k3").tolist() == pytest.approx([math.exp(x) - 1 - x for x in log_r])
    with pytest.raises(ValueError):
        kl_estimate(logps, ref, "k4")


def test_kl_estimators_are_unbiased_for_the_true_kl():
    """k1 and k3 are unbiased estimators of KL(p || q) from samples of p; k2 is close for close distributions."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    samples = torch.multinomial(p, 400_000, replacement=True, generator=generator)
    true = float((p * (p / q).log()).sum())
    for estimator in ("k1", "k3"):
        assert float(kl_estimate(p.log()[samples], q.log()[samples], estimator).mean()) == pytest.approx(true, abs=2e-3)


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_kl_gradients_in_the_loss_and_in_the_reward(scale):
    """The expected gradients the README states, exactly over a categorical policy (sum over outcomes, not samples).
    In the loss E_pi[grad k]: k1 0 (refused), k2 grad KL(pi||ref), k3 grad KL(ref||pi). In the reward, the
    score-function term E_pi[sg(k) grad log pi]: k1 grad KL(pi||ref), k3 grad KL(pi||ref) - grad KL(ref||pi), k2
    grad E_pi[k2] - grad KL(pi||ref); the last two cancel to first order near the reference."""
    generator = torch.Generator().manual_seed(0)
    ref = torch.randn(6, dtype=torch.float64, generator=generator).log_softmax(-1)
    theta = (ref + scale * torch.randn(6, dtype=torch.float64, generator=generator)).requires_grad_()

    def grad(f):
        return torch.autograd.grad(f(theta.log_softmax(-1)), theta)[0]

    def in_loss(estimator):
        return grad(lambda logp: (logp.exp().detach() * kl_estimate(logp, ref, estimator)).sum())

    def in_reward(estimator):
        return grad(lambda logp: (logp.exp().detach() * kl_estimate(logp, ref, estimator).detach() * logp).sum())

    forward = grad(lambda logp: (logp.exp() * (logp - ref)).sum())
    reverse = grad(lambda logp: (ref.exp() * (ref - logp)).sum())
    k2_mean = grad(lambda logp: (logp.exp() * 0.5 * (logp - ref) ** 2).sum())
    torch.testing.assert_close(in_loss("k1"), torch.zeros(6, dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(in_loss("k2"), forward, atol=1e-15, rtol=0)
    torch.testing.assert_close(in_loss("k3"), reverse, atol=1e-15, rtol=0)
    torch.testing.assert_close(in_reward("k1"), forward, atol=1e-15, rtol=0)
    torch.testing.assert_close(in_reward("k3"), forward - reverse, atol=1e-15, rtol=0)
    torch.testing.assert_close(in_reward("k2"), k2_mean - forward, atol=1e-15, rtol=0)
    if scale < 1:  # log-ratios ~0.1: k3 / k2 in the reward pull a few percent as hard as k1
        assert float(in_reward("k3").norm()) < 0.05 * float(forward.norm())
        assert float(in_reward("k2").norm()) < 0.05 * float(forward.norm())


# -- aggregation ---------------------------------------------------------------------------------
def by_loop(per_token_loss, lengths, mode, budget):
    sequences, t = [], 0
    for n in lengths:
        sequences.append(per_token_loss[t : t + n])
        t += n
    if mode == "token_mean":
        return sum(per_token_loss) / len(per_token_loss)
    if mode == "seq_mean_token_mean":
        return sum(sum(s) / len(s) for s in sequences) / len(sequences)
    if mode == "seq_mean_token_sum":
        return sum(sum(s) for s in sequences) / len(sequences)
    return sum(sum(s) for s in sequences) / (len(sequences) * budget)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_against_a_loop(mode):
    token_seq, _ = layout()
    loss = torch.linspace(-1, 2, len(token_seq), dtype=torch.float64) ** 2
    assert float(aggregate(loss, token_seq, mode, 16)) == pytest.approx(by_loop(loss.tolist(), LENGTHS, mode, 16),
                                                                        abs=1e-12)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_split_into_micro_batches_sums_to_the_whole(mode):
    """What the engine does: per micro-batch ``sum(weight * loss)``, divided by the normalizer summed over the step."""
    token_seq, _ = layout()
    loss = torch.linspace(-1, 2, len(token_seq), dtype=torch.float64) ** 2
    lengths = torch.tensor(LENGTHS)
    total, normalizer = 0.0, 0.0
    for lo, hi in [(0, 2), (2, 3), (3, 9)]:
        mask = (token_seq >= lo) & (token_seq < hi)
        weights, units = aggregation_weights(mode, token_seq[mask] - lo, lengths[lo:hi], 16)
        total += float((loss[mask] * weights).sum())
        normalizer += units
    assert total / normalizer == pytest.approx(float(aggregate(loss, token_seq, mode, 16)), abs=1e-12)


# -- sampler / trainer mismatch ------------------------------------------------------------------------
def test_sampler_correction_by_hand():
    from posttrain.objectives.policy import sampler_correction

    token_seq = torch.tensor([0, 0, 1])
    old = torch.log(torch.tensor([0.3, 0.5, 0.1], dtype=torch.float64))
    sampler = torch.log(torch.tensor([0.1, 0.5, 0.4], dtype=torch.float64))  # token ratios 3, 1, 0.25
    weights, capped = sampler_correction(old, sampler, token_seq, "token_truncate", cap=2.0)
    assert weights.tolist() == pytest.approx([2.0, 1.0, 0.25]) and capped.tolist() == [True, False, False]
    weights, masked = sampler_correction(old, sampler, token_seq, "token_mask", cap=2.0)
    assert weights.tolist() == [0.0, 1.0, 0.0] and masked.tolist() == [True, False, True]
    weights, _ = sampler_correction(old, sampler, token_seq, "sequence_truncate", cap=4.0)  # products 3 and 0.25
    assert weights.tolist() == pytest.approx([3.0, 3.0, 0.25])
    weights, _ = sampler_correction(old, sampler, token_seq, "sequence_mask", cap=3.5)
    assert weights.tolist() == [1.0, 1.0, 0.0]
    weights, _ = sampler_correction(old, sampler, token_seq, "none")
    assert weights.tolist() == [1.0, 1.0, 1.0]


def test_truncated_importance_weights_make_the_gradient_unbiased_under_a_mismatched_sampler():
    """Tokens drawn from q while the loss is written for p: E_q[rho * grad log p * A] = E_p[grad log p * A] when
    the cap is never reached (here rho <= 1.5 < cap)."""
    from posttrain.objectives.policy import sampler_correction

    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.3], dtype=torch.float64)
    advantage = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    samples = torch.multinomial(q, 400_000, replacement=True, generator=generator)
    logits = p.log().clone().requires_grad_()
    logps = logits.log_softmax(0)[samples]
    weights, _ = sampler_correction(logps.detach(), q.log()[samples], torch.arange(len(samples)), "token_truncate", 2.0)
    (weights * advantage[samples] * logps).mean().backward()
    target = p * (advantage - (p * advantage).sum())  # d/dz E_p[A log softmax(z)] = p (A - E_p A)
    assert logits.grad.tolist() == pytest.approx(target.tolist(), abs=5e-3)
