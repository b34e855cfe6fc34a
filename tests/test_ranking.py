"""Ranking losses (AFT, RRHF, PRO, ListNet): hand-computed values, masks, and the rank command."""

import math

import pytest
import torch

from conftest import write_jsonl
from helpers import metrics, tiny_recipe
from posttrain.core.errors import UserError
from posttrain.objectives.ranking import check_ranking, ranking_loss

# One prompt, three responses with data scores 3 > 2 > 1. Summed log-probs -4, -9, -3 over
# lengths 2, 3, 1, so the model's mean log-probs are s = [-2, -3, -3].
LOGPS, LENGTHS, SCORES = torch.tensor([[-4.0, -9.0, -3.0]]), torch.tensor([[2.0, 3.0, 1.0]]), torch.tensor([[3.0, 2.0,
                                                                                                             1.0]])
S = [-2.0, -3.0, -3.0]
PAIRS = [(0, 1), (0, 2), (1, 2)]  # (better, worse)


def test_aft_boundary_by_hand():
    tau = 0.5
    expected = math.log(1 + sum(math.exp(max(S[j] - S[i], -tau)) for i, j in PAIRS))
    losses, _ = ranking_loss("aft", LOGPS, LENGTHS, SCORES, constraint="boundary", tau=tau)
    assert losses.item() == pytest.approx(expected + 2.0)  # L_A + L_VFT: the best response's mean NLL is 2


def test_aft_detach_gives_negatives_no_gradient():
    logps = LOGPS.clone().requires_grad_(True)
    losses, _ = ranking_loss("aft", logps, LENGTHS, SCORES, constraint="detach", sft_weight=0.0)
    assert losses.item() == pytest.approx(math.log(1 + sum(math.exp(S[j] - S[i]) for i, j in PAIRS)))
    losses.sum().backward()
    # response 2 is only ever the worse one: detached, no gradient; response 0 only the better one
    assert logps.grad[0, 2].item() == 0 and logps.grad[0, 0].item() < 0


def test_aft_boundary_stops_pushing_far_negatives():
    logps = torch.tensor([[-1.0, -50.0]], requires_grad=True)
    losses, _ = ranking_loss("aft", logps, torch.ones(1, 2), torch.tensor([[1.0, 0.0]]), tau=1.0, sft_weight=0.0)
    losses.sum().backward()
    assert logps.grad.abs().sum().item() == 0  # the negative is already more than tau below


def test_rrhf_by_hand():
    # data order 1 > 2 > 0, while the model prefers 0: pairs (1, 0) and (2, 0) are misordered by 1 each
    losses, _ = ranking_loss("rrhf", LOGPS, LENGTHS, torch.tensor([[1.0, 3.0, 2.0]]), sft_weight=0.5)
    hinge = max(0.0, S[0] - S[1]) + max(0.0, S[2] - S[1]) + max(0.0, S[0] - S[2])
    assert hinge == 2.0
    assert losses.item() == pytest.approx(hinge + 0.5 * 9.0)  # Eq. 4: the best response's (index 1) summed NLL


def test_pro_without_temperature_by_hand():
    losses, _ = ranking_loss("pro", LOGPS, LENGTHS, SCORES, reward_temperature=False, sft_weight=0.0)
    first = -math.log(math.exp(S[0]) / sum(math.exp(x) for x in S))
    second = -math.log(math.exp(S[1]) / (math.exp(S[1]) + math.exp(S[2])))
    assert losses.item() == pytest.approx(first + second)


def authors_pro(scores, rewards, sum_scores, sft_weight):
    """PRO as the authors compute it (DAMO-ConvAI PRO/train/utils/process_manager.py, compute_loss), transcribed:
    lists already sorted by reward, best first; scores are length-averaged log-probs; sft on index 0."""
    stages = scores.shape[1]
    total = 0.0
    for time in range(stages - 1):
        neg_temperatures = rewards[:, time, None] - rewards[:, time + 1:]
        pos_temperature = neg_temperatures.max(1).values
        loss = torch.log(1e-10 + torch.exp(scores[:, time] * pos_temperature)
                         + torch.exp(scores[:, time + 1:] * neg_temperatures).sum(1)) - scores[:,
                                                                                               time] * pos_temperature
        total = total + loss.mean()
    return total + sft_weight * (stages - 1) ** 2 * (-sum_scores[:, 0]).mean()


@pytest.mark.parametrize("seed", range(4))
def test_pro_matches_the_authors_code(seed):
    """Without ties; with ties theirs depends on the order of the tied responses (see the next test)."""
    g = torch.Generator().manual_seed(seed)
    b, k = 5, 4
    rewards = (3 * torch.rand(b, k, generator=g, dtype=torch.float64)).sort(1, descending=True).values
    lengths = torch.randint(2, 9, (b, k), generator=g).double()
    logps = -torch.rand(b, k, generator=g, dtype=torch.float64) * 3 * lengths
    ours, _ = ranking_loss("pro", logps, lengths, rewards, sft_weight=0.05)
    theirs = authors_pro(logps / lengths, rewards, logps, 0.05)
    assert ours.mean().item() == pytest.approx(theirs.item(), abs=1e-8)


@pytest.mark.parametrize("temperature", [True, False])
def test_pro_tied_responses_are_not_ranked_against_each_other(temperature):
    logps = torch.tensor([[-4.0, -9.0]], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    losses, _ = ranking_loss("pro", logps, lengths, torch.tensor([[1.0, 1.0]]), reward_temperature=temperature,
                             sft_weight=0.0)
    losses.sum().backward()
    assert logps.grad.abs().max().item() == 0  # two equally good answers: nothing to learn from their order


@pytest.mark.parametrize("temperature", [True, False])
@pytest.mark.parametrize("sft_weight", [0.0, 0.05])
def test_pro_does_not_depend_on_the_order_of_tied_responses(temperature, sft_weight):
    """Binary feedback [1, 1, 0]: each correct answer is ranked against the wrong one only (the reward gap is 1, so
    both forms agree), and the SFT term is the mean of the two correct answers' summed NLLs, in any order."""
    logps = torch.tensor([[-4.0, -9.0, -3.0]], dtype=torch.float64)
    lengths = torch.tensor([[2.0, 3.0, 1.0]], dtype=torch.float64)
    scores = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    s = [-2.0, -3.0, -3.0]
    ranked = sum(math.log(math.exp(s[k]) + math.exp(s[2])) - s[k] for k in (0, 1))
    expected = ranked + sft_weight * 2 ** 2 * (4.0 + 9.0) / 2
    for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0], [1, 2, 0]):
        losses, _ = ranking_loss("pro", logps[:, order], lengths[:, order], scores[:, order],
                                 reward_temperature=temperature, sft_weight=sft_weight)
        assert losses.item() == pytest.approx(expected, rel=1e-12), order
    g = torch.Generator().manual_seed(0)  # several tied groups, random orders
    rewards = torch.tensor([[2.0, 2.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    lengths = torch.randint(2, 9, (1, 6), generator=g).double()
    logps = -torch.rand(1, 6, generator=g, dtype=torch.float64) * 3 * lengths
    first, _ = ranking_loss("pro", logps, lengths, rewards, reward_temperature=temperature, sft_weight=sft_weight)
    for _ in range(6):
        order = torch.randperm(6, generator=g)
        again, _ = ranking_loss("pro", logps[:, order], lengths[:, order], rewards[:, order],
                                reward_temperature=temperature, sft_weight=sft_weight)
        assert again.item() == pytest.approx(first.item(), rel=1e-12)


@pytest.mark.parametrize("name", ["aft", "rrhf"])
def test_tied_best_responses_share_the_sft_term(name):
    scores = torch.tensor([[3.0, 3.0, 1.0]])
    losses, _ = ranking_loss(name, LOGPS.double(), LENGTHS.double(), scores, sft_weight=1.0)
    swapped, _ = ranking_loss(name, LOGPS.double()[:, [1, 0, 2]], LENGTHS.double()[:, [1, 0, 2]], scores,
                              sft_weight=1.0)
    without, _ = ranking_loss(name, LOGPS.double(), LENGTHS.double(), scores, sft_weight=0.0)
    nll = (2.0 + 3.0) / 2 if name == "aft" else (4.0 + 9.0) / 2  # mean NLL per token (AFT) or summed (RRHF)
    assert losses.item() == pytest.approx(swapped.item(), rel=1e-12)
    assert (losses - without).item() == pytest.approx(nll, rel=1e-12)


def test_listnet_by_hand():
    ref = torch.tensor([[-5.0, -8.0, -4.0]])
    losses, _ = ranking_loss("listnet", LOGPS, LENGTHS, SCORES, ref_logps=ref, beta=0.5)
    rewards = [0.5 * (a - b) for a, b in zip([-4.0, -9.0, -3.0], [-5.0, -8.0, -4.0])]
    target = [math.exp(x) / sum(math.exp(y) for y in [3, 2, 1]) for x in [3, 2, 1]]
    log_sm = [r - math.log(sum(math.exp(x) for x in rewards)) for r in rewards]
    assert losses.item() == pytest.approx(-sum(t * l for t, l in zip(target, log_sm)))


@pytest.mark.parametrize("name", ["aft", "rrhf", "pro", "listnet"])
def test_missing_responses_are_masked_with_finite_gradients(name):
    """A prompt with 2 of 3 slots filled gives the same loss as the 2-response list alone."""
    logps = torch.tensor([[-4.0, -9.0, 0.0]], requires_grad=True)
    lengths, scores, mask = torch.tensor([[2.0, 3.0, 1.0]]), torch.tensor([[3.0, 2.0, 0.0]]), torch.tensor([[True,
                                                                                                             True,
                                                                                                             False]])
    ref = torch.tensor([[-5.0, -8.0, 0.0]])
    padded, _ = ranking_loss(name, logps, lengths, scores, mask, ref_logps=ref)
    alone, _ = ranking_loss(name, logps[:, :2], lengths[:, :2], scores[:, :2], ref_logps=ref[:, :2])
    assert padded.item() == pytest.approx(alone.item())
    padded.sum().backward()
    assert torch.isfinite(logps.grad).all() and logps.grad[0, 2] == 0


def test_unknown_and_unused_settings():
    with pytest.raises(UserError, match="unknown ranking loss"):
        check_ranking("listmle", {})
    with pytest.raises(UserError, match="tau not used by rrhf"):
        check_ranking("rrhf", {"tau": 1.0})
    for name in ("aft", "rrhf", "pro"):  # no temperature: a recipe's beta would be silently ignored
        with pytest.raises(UserError, match="beta not used"):
            check_ranking(name, {}, beta=0.5)
    check_ranking("listnet", {}, beta=0.5)


def ranked_file(tmp_path, n=16):
    records = []
    for i in range(n):
        a, b = i % 7 + 2, i % 5 + 3
        records.append({"prompt": f"What is {a} + {b}?",
                        "responses": [f"{a} + {b} = {a + b}", f"It is {a + b + 1}.",
                                      f"I think it is {a * b + 1}, or so."][: 2 + i % 2],
                        "scores": [2, 1, 0][: 2 + i % 2]})
    return write_jsonl(tmp_path / "ranked.jsonl", records)


@pytest.mark.parametrize("name", ["aft", "rrhf", "pro", "listnet"])
def test_rank_command_trains(tiny_model_dir, tmp_path, name):
    from accelerate.state import AcceleratorState, PartialState

    from posttrain.apps.recipes import load_recipe
    from posttrain.train.run import run

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    data = ranked_file(tmp_path)
    recipe = load_recipe("rank", None, tiny_recipe(tiny_model_dir, tmp_path / "run", **{
        "data.train": str(data), "data.eval": str(data), "loss.name": name, "peft.method": "lora",
        "train.batch_size": 4, "train.max_steps": 6, "train.lr": 3e-2}))
    run("rank", recipe)
    evals = metrics(tmp_path / "run", "eval.jsonl")
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert "ranking/pair_accuracy" in metrics(tmp_path / "run")[0]


def test_ranked_record_validation():
    from posttrain.data.formats import parse_ranked

    with pytest.raises(UserError, match="scores"):
        parse_ranked("x", "line 1", {"prompt": "q", "responses": ["a", "b"], "scores": [1]})
    with pytest.raises(UserError, match="nothing to rank"):
        parse_ranked("x", "line 1", {"prompt": "q", "responses": ["a", "b"], "scores": [1, 1]})
