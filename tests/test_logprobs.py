"""The chunked target log-prob op against the plain logits -> log_softmax path."""

import pytest
import torch

from posttrain.model.logprobs import target_logprobs


def plain(hidden, weight, targets, bias=None):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_match_plain_path(chunk, with_bias):
    torch.manual_seed(0)
    n, h, v = 50, 16, 97
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n,))
    upstream = torch.randn(n, dtype=torch.float64)

    ours = target_logprobs(hidden, weight, targets, bias, chunk_size=chunk)
    grads = torch.autograd.grad((ours * upstream).sum(), [hidden, weight] + ([bias] if with_bias else []))
    ref = plain(hidden, weight, targets, bias)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [hidden, weight] + ([bias] if with_bias else []))

    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=0)


def test_float32_matches_to_1e5():
    torch.manual_seed(1)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(500, 32, requires_grad=True)
    targets = torch.randint(0, 500, (300,))
    ours = target_logprobs(hidden, weight, targets, chunk_size=64)
    ref = plain(hidden, weight, targets)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad(ours.sum(), [hidden, weight])
    g2 = torch.autograd.grad(ref.sum(), [hidden, weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_logprob_of_uniform_logits_is_minus_log_vocab():
    hidden = torch.zeros(3, 4)
    weight = torch.randn(10, 4)
    out = target_logprobs(hidden, weight, torch.tensor([0, 5, 9]))
    torch.testing.assert_close(out, torch.full((3,), -torch.log(torch.tensor(10.0))))


def test_log_sum_of_squared_probabilities():
    torch.manual_seed(2)
    hidden, weight = torch.randn(20, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    targets = torch.randint(0, 30, (20,))
    logps, sum_sq = target_logprobs(hidden, weight, targets, chunk_size=7, with_sum_sq=True)
    probs = (hidden @ weight.T).softmax(-1)
    torch.testing.assert_close(sum_sq, (probs ** 2).sum(-1).log())
    torch.testing.assert_close(logps, plain(hidden, weight, targets))
