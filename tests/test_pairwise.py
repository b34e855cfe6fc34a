"""Pairwise preference losses: hand-computed values, then TRL's own implementations on identical inputs."""

import math
import types
from collections import defaultdict

import pytest
import torch

from posttrain.core.errors import UserError
from posttrain.objectives.pairwise import PAIRWISE, check_pairwise, pairwise_loss


def sig(x):
    return 1 / (1 + math.exp(-x))


def logsig(x):
    return math.log(sig(x))


# One pair worked by hand: policy log-probs -10 (chosen, 5 tokens) and -14 (rejected, 7 tokens);
# reference -11 and -12. So l_w = 1, l_l = -2, Delta = 3; beta = 0.5.
ONE = dict(chosen_logps=torch.tensor([-10.0]), rejected_logps=torch.tensor([-14.0]),
           ref_chosen_logps=torch.tensor([-11.0]), ref_rejected_logps=torch.tensor([-12.0]),
           chosen_lengths=torch.tensor([5.0]), rejected_lengths=torch.tensor([7.0]), beta=0.5)
LW, LL, DELTA, BETA = 1.0, -2.0, 3.0, 0.5
AW, AL = -10 / 5, -14 / 7

HAND = {
    "dpo": ({}, -logsig(BETA * DELTA)),
    "cdpo": ({"label_smoothing": 0.1}, -0.9 * logsig(1.5) - 0.1 * logsig(-1.5)),
    "robust": ({"label_smoothing": 0.1}, (-0.9 * logsig(1.5) + 0.1 * logsig(-1.5)) / 0.8),
    "ipo": ({}, (LW / 5 - LL / 7 - 1 / (2 * BETA)) ** 2),
    "hinge": ({}, max(0.0, 1 - BETA * DELTA)),
    "exo_pair": ({"label_smoothing": 1e-3},
                 sig(1.5) * (logsig(1.5) - math.log(0.999)) + sig(-1.5) * (logsig(-1.5) - math.log(1e-3))),
    "nca_pair": ({}, -logsig(0.5) - 0.5 * logsig(-0.5) - 0.5 * logsig(1.0)),
    "bco_pair": ({}, -logsig(0.5) - logsig(1.0)),
    "sppo_hard": ({}, (LW - 1) ** 2 + (LL + 1) ** 2),
    "aot": ({}, -logsig(BETA * ((-10 + 14) - (-11 + 12)))),  # one pair: sorting is the identity
    "aot_pair": ({}, -logsig(BETA * (LW - LL))),
    "apo_zero": ({}, 1 - sig(BETA * LW) + sig(BETA * LL)),
    "apo_down": ({}, sig(BETA * LW) + 1 - sig(BETA * DELTA)),
    "discopop": ({"discopop_tau": 0.05}, (1 - sig(1.5 / 0.05)) * -logsig(1.5) + sig(1.5 / 0.05) * math.exp(-1.5)),
    "ln_dpo": ({}, -logsig(BETA * (LW / 5 - LL / 7))),
    "sigmoid_norm": ({}, -logsig(BETA * (LW / 5 - LL / 7))),
    "rdpo_length": ({"length_alpha": 0.1}, -logsig(BETA * DELTA + 0.1 * (5 - 7))),
    "f_dpo": ({"divergence": "forward_kl"}, -logsig(BETA * ((1 - math.exp(-LW)) - (1 - math.exp(-LL))))),
    "rpo": ({"alpha": 2.0}, -logsig(BETA * DELTA) + 2.0 * 10 / 5),
    "sft": ({}, 10 / 5),
    "simpo": ({"gamma": 0.3}, -logsig(BETA * (AW - AL) - 0.3)),
    "cpo": ({"alpha": 1.0}, -logsig(BETA * (-10 + 14)) + 10 / 5),
    "orpo": ({}, -AW - BETA * logsig((AW - AL) - (math.log(1 - math.exp(AW)) - math.log(1 - math.exp(AL))))),
    # ASFT with odds(y) = log(p / (1 - p)): -log p_w - lambda [log sigma(odds_w) + log sigma(-odds_l)]
    "asft": ({}, -AW - BETA * (logsig(AW - math.log(1 - math.exp(AW))) + logsig(-(AL - math.log(1 - math.exp(AL)))))),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_loss_matches_hand_computed_value(name):
    options, expected = HAND[name]
    losses, metrics = pairwise_loss(name, **ONE, **options)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(expected, rel=1e-5)


def test_ld_dpo_by_hand_and_its_limits():
    # chosen has 5 tokens, rejected 7: the last 2 rejected tokens are the tail (log-probs -3 policy, -1 reference)
    tails = dict(chosen_tail_logps=torch.tensor([0.0]), rejected_tail_logps=torch.tensor([-3.0]),
                 ref_chosen_tail_logps=torch.tensor([0.0]), ref_rejected_tail_logps=torch.tensor([-1.0]))
    loss, _ = pairwise_loss("ld_dpo", **ONE, ld_alpha=0.25, **tails)
    rejected_ratio = (-14 + 0.75 * 3) - (-12 + 0.75 * 1)
    assert loss.item() == pytest.approx(-logsig(BETA * (LW - rejected_ratio)), rel=1e-6)
    dpo, _ = pairwise_loss("dpo", **ONE)
    assert pairwise_loss("ld_dpo", **ONE, ld_alpha=1.0, **tails)[0].item() == pytest.approx(dpo.item())


def test_tpo_by_hand():
    gold = dict(gold_logps=torch.tensor([-6.0]), gold_lengths=torch.tensor([3.0]))
    tpo, _ = pairwise_loss("tpo", **ONE, **gold, alpha=1.0)
    assert tpo.item() == pytest.approx(-logsig(BETA * (-10 + 14)) + 6 / 3)
    tpo_l, _ = pairwise_loss("tpo_l", **ONE, **gold, alpha=0.5, gamma=0.5)
    assert tpo_l.item() == pytest.approx(-logsig(BETA * (AW - AL) - 0.5) + 0.5 * 6 / 3)


def test_dft_by_hand():
    from posttrain.objectives.pairwise import dft_log_partition

    # s = log pi(y')/tau - log pi_ref(y') = -14 + 12 = -2; with u = -1.5 the negative's weight is exp(-0.5)
    inputs = {k: (v.clone().requires_grad_(k == "rejected_logps") if torch.is_tensor(v) else v) for k, v in ONE.items()}
    loss, _ = pairwise_loss("dft", **inputs, log_partition=torch.tensor([-1.5]))
    assert loss.item() == pytest.approx(10 + math.exp(-0.5) * -14)
    loss.sum().backward()
    assert inputs["rejected_logps"].grad.item() == pytest.approx(math.exp(-0.5))  # pushes the negative down
    u = dft_log_partition(torch.tensor([-2.0]), torch.tensor([0.0]), gamma=0.95)
    assert u.item() == pytest.approx(math.log(0.05 * math.exp(0.0) + 0.95 * math.exp(-2.0)))
    # DFT2: length-averaged, no reference; without a partition estimate the weight is 1
    loss2, _ = pairwise_loss("dft2", **ONE)
    assert loss2.item() == pytest.approx(-AW + AL)


def test_every_registered_loss_has_a_hand_test():
    assert set(PAIRWISE) == set(HAND) | {"ld_dpo", "tpo", "tpo_l", "dft", "dft2"}


def test_weighted_sum_of_losses():
    mixed, _ = pairwise_loss(["dpo", "bco_pair", "sft"], **ONE, weights=[1.0, 0.5, 2.0])
    assert mixed.item() == pytest.approx(HAND["dpo"][1] + 0.5 * HAND["bco_pair"][1] + 2.0 * HAND["sft"][1], rel=1e-6)


def test_metrics_are_implicit_rewards():
    _, metrics = pairwise_loss("dpo", **ONE)
    assert metrics["rewards/chosen"].item() == pytest.approx(BETA * LW)
    assert metrics["rewards/margin"].item() == pytest.approx(BETA * DELTA)
    assert metrics["rewards/accuracy"].item() == 1.0


def test_reference_needed_and_unused_hyperparameters_are_errors():
    with pytest.raises(ValueError, match="reference"):
        pairwise_loss("dpo", torch.zeros(1), torch.zeros(1))
    with pytest.raises(UserError, match="gamma"):
        check_pairwise(["dpo"], {"gamma": 0.5})
    with pytest.raises(UserError, match="unknown pairwise loss"):
        check_pairwise(["dpoo"], {})
    check_pairwise(["simpo", "dpo"], {"gamma": 0.5})


def test_a_setting_no_chosen_loss_reads_is_refused():
    """beta means nothing to sft / dft / dft2; alpha (an NLL weight) and length_alpha are two settings."""
    for names in (["sft"], ["dft"], ["dft2"]):
        with pytest.raises(UserError, match="beta not used"):
            check_pairwise(names, {}, beta=0.5)
    with pytest.raises(UserError, match="length_alpha not used by rpo"):
        check_pairwise(["rpo"], {"length_alpha": 0.1})
    with pytest.raises(UserError, match="alpha not used by rdpo_length"):
        check_pairwise(["rdpo_length"], {"alpha": 0.1})
    with pytest.raises(UserError, match="discopop_tau not used by dft"):
        check_pairwise(["dft"], {"discopop_tau": 0.1})
    check_pairwise(["rpo", "cpo"], {"alpha": 0.5}, beta=0.2)  # the same meaning for both: one name


def test_values_a_loss_rejects_are_refused_before_training():
    with pytest.raises(UserError, match="robust DPO needs"):
        check_pairwise(["robust"], {"label_smoothing": 0.6})
    with pytest.raises(UserError, match="weights"):
        check_pairwise(["dpo", "sft"], {}, weights=[1.0])


def test_unset_hyperparameters_take_the_papers_defaults():
    """SimPO: beta 2.0 and gamma 1.0 (princeton-nlp/SimPO, Llama-3-8B-Base); DPO: beta 0.1."""
    inputs = {k: v for k, v in ONE.items() if k != "beta"}
    simpo, _ = pairwise_loss("simpo", **inputs)
    assert simpo.item() == pytest.approx(-logsig(2.0 * (AW - AL) - 1.0), rel=1e-6)
    dpo, _ = pairwise_loss("dpo", **inputs)
    assert dpo.item() == pytest.approx(-logsig(0.1 * DELTA), rel=1e-6)
    assert PAIRWISE["simpo"].defaults == {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0}
    assert "beta" not in PAIRWISE["sft"].defaults


@pytest.mark.parametrize("name", ["simpo", "orpo", "tpo_l", "asft", "dft2"])
def test_reference_free_rewards_are_what_the_loss_compares(name):
    """Mean log-probs -1 (chosen, 10 tokens) and -2 (rejected, 5 tokens): equal sums, so a summed-log-prob reward
    would call it a tie; these losses compare the averages, and so must rewards/*."""
    pair = dict(chosen_logps=torch.tensor([-10.0]), rejected_logps=torch.tensor([-10.0]),
                chosen_lengths=torch.tensor([10.0]), rejected_lengths=torch.tensor([5.0]),
                gold_logps=torch.tensor([-3.0]), gold_lengths=torch.tensor([3.0]))
    _, metrics = pairwise_loss(name, **pair, beta=0.5 if name != "dft2" else None)
    scale = 0.5 if name != "dft2" else 1.0
    assert metrics["rewards/accuracy"].item() == 1.0
    assert metrics["rewards/chosen"].item() == pytest.approx(-1.0 * scale)
    assert metrics["rewards/margin"].item() == pytest.approx(1.0 * scale)


def test_cpo_rewards_are_summed_log_probs():
    _, metrics = pairwise_loss("cpo", **{k: v for k, v in ONE.items() if "ref" not in k})
    assert metrics["rewards/chosen"].item() == pytest.approx(BETA * -10)


def test_gradients_flow_to_policy_only():
    inputs = {k: (v.clone().requires_grad_(k in ("chosen_logps", "rejected_logps")) if torch.is_tensor(v) else v)
              for k, v in ONE.items()}
    loss, _ = pairwise_loss("dpo", **inputs)
    loss.sum().backward()
    # d/d chosen_logps of -log sigma(beta Delta) = -beta * sigma(-beta Delta)
    assert inputs["chosen_logps"].grad.item() == pytest.approx(-BETA * sig(-BETA * DELTA))


# --- against TRL ------------------------------------------------------------------------------


def batch(seed=0, equal_lengths=False, b=6):
    g = torch.Generator().manual_seed(seed)
    pc, pr = -torch.rand(b, generator=g) * 40, -torch.rand(b, generator=g) * 40
    rc, rr = pc + torch.randn(b, generator=g), pr + torch.randn(b, generator=g)
    lc = torch.full((b,), 9) if equal_lengths else torch.randint(3, 20, (b,), generator=g)
    lr = torch.full((b,), 9) if equal_lengths else torch.randint(3, 20, (b,), generator=g)
    return pc, pr, rc, rr, lc, lr


def trl_dpo(loss_types, weights, pc, pr, rc, rr, lc, lr, beta, label_smoothing=0.0, f_div="reverse_kl",
            f_alpha=0.5, tau=0.05, ld_alpha=None, use_weighting=False):
    """TRL's DPOTrainer._compute_loss on precomputed log-probs: each sequence's sum is spread evenly over its tokens."""
    from trl.trainer.dpo_trainer import DPOTrainer

    b = pc.shape[0]
    lens, sums = torch.cat([lc, lr]), torch.cat([pc, pr])
    width = int(lens.max()) + 1
    mask = torch.zeros(2 * b, width + 1, dtype=torch.long)
    per_token = torch.zeros(2 * b, width)
    for i in range(2 * b):
        mask[i, 1 : 1 + int(lens[i])] = 1
        per_token[i, : int(lens[i])] = sums[i] / lens[i]
    out = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                                mean_logits=torch.zeros_like(per_token),
                                is_top1=torch.zeros_like(per_token, dtype=torch.bool),
                                log_sum_sq_probs=torch.zeros_like(per_token))  # aligned log-probs = plain ones
    accelerator = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=ld_alpha,
        precompute_ref_logps=True, f_divergence_type=f_div, f_alpha_divergence_coef=f_alpha, loss_types=loss_types,
        loss_weights=weights, beta=beta, label_smoothing=label_smoothing, use_weighting=use_weighting,
        args=types.SimpleNamespace(discopop_tau=tau), _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return DPOTrainer._compute_loss(trainer, lambda **kw: out, inputs, False)


TRL_NAMES = {
    "dpo": ("sigmoid", {}), "hinge": ("hinge", {}), "ipo": ("ipo", {}), "nca_pair": ("nca_pair", {}),
    "bco_pair": ("bco_pair", {}), "sppo_hard": ("sppo_hard", {}), "aot": ("aot", {}), "aot_pair": ("aot_unpaired", {}),
    "apo_zero": ("apo_zero", {}), "apo_down": ("apo_down", {}), "discopop": ("discopop", {}),
    "ln_dpo": ("sigmoid_norm", {}),
    "exo_pair": ("exo_pair", {"label_smoothing": 1e-3}), "robust": ("robust", {"label_smoothing": 0.2}),
}


@pytest.mark.parametrize("name", sorted(TRL_NAMES))
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_matches_trl_dpo_trainer(name, beta):
    trl_name, options = TRL_NAMES[name]
    pc, pr, rc, rr, lc, lr = batch()
    ours, _ = pairwise_loss(name, pc, pr, rc, rr, lc.float(), lr.float(), beta=beta, **options)
    theirs = trl_dpo([trl_name], [1.0], pc, pr, rc, rr, lc, lr, beta, **options)
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("divergence,trl_name,alpha", [("forward_kl", "forward_kl", 0.5), ("js", "js_divergence", 0.5),
                                                        ("alpha", "alpha_divergence", 0.3),
                                                       ("reverse_kl", "reverse_kl", 0.5)])
def test_f_dpo_matches_trl(divergence, trl_name, alpha):
    pc, pr, rc, rr, lc, lr = batch(1)
    ours, _ = pairwise_loss("f_dpo", pc, pr, rc, rr, beta=0.2, divergence=divergence, divergence_alpha=alpha)
    theirs = trl_dpo(["sigmoid"], [1.0], pc, pr, rc, rr, lc, lr, 0.2, f_div=trl_name, f_alpha=alpha)
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-5)


def test_ld_dpo_matches_trl():
    pc, pr, rc, rr, lc, lr = batch(2)
    shared = torch.minimum(lc, lr)
    tail = lambda total, n: total * (n - shared) / n  # even spreading, as trl_dpo does
    ours, _ = pairwise_loss("ld_dpo", pc, pr, rc, rr, lc.float(), lr.float(), beta=0.3, ld_alpha=0.4,
                            chosen_tail_logps=tail(pc, lc), rejected_tail_logps=tail(pr, lr),
                            ref_chosen_tail_logps=tail(rc, lc), ref_rejected_tail_logps=tail(rr, lr))
    # TRL applies ld_alpha to precomputed reference log-probs when it computes them; pass them weighted
    ref_c, ref_r = rc - 0.6 * tail(rc, lc), rr - 0.6 * tail(rr, lr)
    theirs = trl_dpo(["sigmoid"], [1.0], pc, pr, ref_c, ref_r, lc, lr, 0.3, ld_alpha=0.4)
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-5)


def test_rpo_matches_trl_sigmoid_plus_sft():
    pc, pr, rc, rr, lc, lr = batch(3, equal_lengths=True)  # TRL's sft term is a batch token mean
    ours, _ = pairwise_loss("rpo", pc, pr, rc, rr, lc.float(), lr.float(), beta=0.1, alpha=0.7)
    theirs = trl_dpo(["sigmoid", "sft"], [1.0, 0.7], pc, pr, rc, rr, lc, lr, 0.1)
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-5)


def trl_cpo_trainer(loss_type, beta, gamma=0.5, label_smoothing=0.0):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    return types.SimpleNamespace(alpha=0.0, loss_type=loss_type, simpo_gamma=gamma, beta=beta,
                                 label_smoothing=label_smoothing,
                                 accelerator=types.SimpleNamespace(device="cpu")), CPOTrainer


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_and_cpo_match_trl_cpo_trainer(label_smoothing):
    pc, pr, _, _, lc, lr = batch(4)
    fake, CPOTrainer = trl_cpo_trainer("simpo", 2.0, 0.8, label_smoothing)
    theirs, _, _ = CPOTrainer.cpo_loss(fake, pc / lc, pr / lr)  # TRL passes length-averaged log-probs for simpo
    ours, _ = pairwise_loss("simpo", pc, pr, chosen_lengths=lc.float(), rejected_lengths=lr.float(), beta=2.0,
                            gamma=0.8, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    fake, _ = trl_cpo_trainer("sigmoid", 0.1, label_smoothing=label_smoothing)
    theirs, _, _ = CPOTrainer.cpo_loss(fake, pc, pr)
    ours, _ = pairwise_loss("cpo", pc, pr, chosen_lengths=lc.float(), rejected_lengths=lr.float(), beta=0.1,
                            alpha=0.0, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_orpo_matches_trl_odds_ratio_loss():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    pc, pr, _, _, lc, lr = batch(5)
    fake = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device="cpu"))
    odds_term, *_ = ORPOTrainer.odds_ratio_loss(fake, pc / lc, pr / lr)  # TRL: loss = nll - mean(odds_term)
    ours, _ = pairwise_loss("orpo", pc, pr, chosen_lengths=lc.float(), rejected_lengths=lr.float(), beta=0.25)
    torch.testing.assert_close(ours, -pc / lc - odds_term, rtol=1e-5, atol=1e-6)


def test_wpo_weighting_matches_trl():
    pc, pr, rc, rr, lc, lr = batch(6)
    pc, pr = pc / 10, pr / 10  # keep exp(mean log-prob) weights away from underflow
    ours, metrics_ = pairwise_loss("dpo", pc, pr, rc, rr, lc.float(), lr.float(), beta=0.1,
                                   chosen_wpo_logps=pc / lc, rejected_wpo_logps=pr / lr)
    theirs = trl_dpo(["sigmoid"], [1.0], pc, pr, rc, rr, lc, lr, 0.1, use_weighting=True)
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-5)
    assert 0 < metrics_["wpo/weight"].item() < 1
