"""Ranking / listwise losses over K responses per prompt, ordered by given scores.

Inputs are ``[B, K]`` tensors with a ``mask`` for prompts that have fewer than K responses:
summed log-probs, completion lengths and the data's ``scores`` (higher is better; binary
feedback is 1 / 0). The model's score of a response is its length-averaged log-prob
``s = log pi(y|x) / |y|``. Each loss returns ``[B]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.objectives.registry import LossSpec, Registry


@dataclass
class Ranked:
    logps: torch.Tensor  # [B, K]
    lengths: torch.Tensor  # [B, K]
    scores: torch.Tensor  # [B, K] from the data
    mask: torch.Tensor  # [B, K] bool
    ref_logps: torch.Tensor | None = None

    @property
    def model_scores(self) -> torch.Tensor:
        return self.logps / self.lengths.clamp(min=1)

    @property
    def counts(self) -> torch.Tensor:
        return self.mask.sum(1)

    def better(self) -> torch.Tensor:
        """[B, K, K]: True where response i is strictly better than response j (both present)."""
        both = self.mask[:, :, None] & self.mask[:, None, :]
        return (self.scores[:, :, None] > self.scores[:, None, :]) & both

    def best_nll(self, per_token: bool = True) -> torch.Tensor:
        """NLL of each prompt's best-scored response (the SFT term of RRHF / PRO / AFT): length-averaged,
        or summed over the response's tokens with ``per_token=False``. Tied bests share it (their mean), so the
        loss does not depend on the order of the records' responses."""
        scores = self.scores.masked_fill(~self.mask, float("-inf"))
        best = (scores == scores.amax(1, keepdim=True)) & self.mask
        logps = self.model_scores if per_token else self.logps
        return -logps.masked_fill(~best, 0.0).sum(1) / best.sum(1).clamp(min=1)


RANKING = Registry("ranking")


@RANKING.register("aft")
def aft(r: Ranked, constraint: str = "boundary", tau: float = 1.0, sft_weight: float = 1.0) -> torch.Tensor:
    """AFT constraint alignment loss (Wang et al., 2023, "Making Large Language Models Better Reasoners with
    Alignment", arXiv 2309.02144), over every (better i, worse j) pair of a prompt: ``log(1 + sum exp(m_ij))``
    with boundary constraint ``m_ij = max(s_j - s_i, -tau)`` (a negative stops being pushed down once it is
    tau below the positive), or detached constraint ``m_ij = sg(s_j) - s_i`` (negatives get no gradient),
    plus ``sft_weight`` times the best response's per-token NLL (the paper trains L_VFT + L_A). Binary
    feedback is scores 1 / 0. The paper's abstract confirms the two aims (positives above negatives;
    negative scores kept in a reasonable range); its equations could not be read from any stored copy of
    the paper, and its authors published no code, so the form above follows a transcription of Eqs. 7-8."""
    s = r.model_scores
    if constraint == "boundary":
        margins = (s[:, None, :] - s[:, :, None]).clamp(min=-tau)  # [b, i, j] = s_j - s_i
    elif constraint == "detach":
        margins = s.detach()[:, None, :] - s[:, :, None]
    else:
        raise ValueError(f"aft constraint must be 'boundary' or 'detach', got {constraint!r}")
    better = r.better()
    terms = margins.masked_fill(~better, _very_negative(s)).exp() * better  # masked before exp: no inf * 0 in backward
    return torch.log1p(terms.sum((1, 2))) + sft_weight * r.best_nll()


@RANKING.register("rrhf")
def rrhf(r: Ranked, sft_weight: float = 1.0) -> torch.Tensor:
    """RRHF (Yuan et al., 2023, Eqs. 2-4): hinge on every misordered pair of length-averaged scores plus the
    best response's NLL summed over its tokens, as in Eq. 4 (the authors' code divides that sum by the padded
    batch length, a batch-dependent scale not copied here): ``sum_{score_i > score_j} max(0, s_j - s_i)
    + sft_weight * -log pi(y_best|x)``."""
    s = r.model_scores
    hinge = torch.relu(s[:, None, :] - s[:, :, None]) * r.better()
    return hinge.sum((1, 2)) + sft_weight * r.best_nll(per_token=False)


@RANKING.register("pro")
def pro(r: Ranked, reward_temperature: bool = True, sft_weight: float = 0.05) -> torch.Tensor:
    """PRO (Song et al., 2024, arXiv 2306.17492, Eq. 5 with the reward-gap temperature of Sec. 3.3), as the
    authors' code computes it (AlibabaResearch/DAMO-ConvAI, PRO/train/utils/process_manager.py) for responses with
    distinct rewards r; s the length-averaged log-probs. Each response k against those strictly worse than it:
    ``log(exp(s_k T_k) + sum_{r_i < r_k} exp(s_i (r_k - r_i))) - s_k T_k`` with ``T_k = max_{r_i < r_k} (r_k - r_i)``.
    ``reward_temperature: false`` gives plain Plackett-Luce, ``log(exp(s_k) + sum_{r_i < r_k} exp(s_i)) - s_k``.
    The SFT term is weighted as in the authors' code, ``sft_weight * (n - 1)^2 * -log pi(y_best|x)`` summed over
    tokens, n the prompt's response count (their scripts use sft_weight 0.05). Their 1e-10 inside the log is left
    out. Where rewards tie, this departs from their code, whose loss depends on the order of tied responses: there
    a response tied with k and listed after it enters k's denominator as a constant exp(0) = 1 (and one listed before
    it does not), and the SFT term takes one record-given best. Here tied responses are kept out of each other's
    terms and the SFT term is the mean over the tied best responses, so any order of the records gives one loss."""
    worse = r.better()  # [b, k, i]: response i strictly worse than response k
    s = r.model_scores
    if reward_temperature:
        neg_scale = (r.scores[:, :, None] - r.scores[:, None, :]).masked_fill(~worse, 0.0)  # r_k - r_i > 0
        pos_scale = neg_scale.amax(2)
    else:
        neg_scale, pos_scale = torch.ones_like(worse, dtype=s.dtype), torch.ones_like(s)
    active = worse.any(2)  # k has a response below it
    pos = (s * pos_scale).masked_fill(~active, 0.0)
    neg = (s[:, None, :] * neg_scale).masked_fill(~worse, _very_negative(s))
    terms = torch.logsumexp(torch.cat([pos[:, :, None], neg], 2), 2) - pos
    squared = (r.counts - 1).clamp(min=0).to(s.dtype) ** 2
    return terms.masked_fill(~active, 0.0).sum(1) + sft_weight * squared * r.best_nll(per_token=False)


@RANKING.register("listnet", needs=("reference",))
def listnet(r: Ranked, beta: float = 0.1, score_temperature: float = 1.0) -> torch.Tensor:
    """Listwise softmax cross-entropy (ListNet, Cao et al., 2007; as in LiPO, Liu et al., 2024):
    the data's scores define a target distribution softmax(scores / T), the policy's DPO rewards
    beta * (log pi - log pi_ref) the predicted one: ``-sum_i softmax(scores/T)_i log softmax(beta r)_i``."""
    rewards = (beta * (r.logps - r.ref_logps)).masked_fill(~r.mask, _very_negative(r.logps))
    target = (r.scores / score_temperature).masked_fill(~r.mask, float("-inf")).softmax(1)  # no gradient: -inf is safe
    return -(target * rewards.log_softmax(1)).masked_fill(~r.mask, 0.0).sum(1)


def _very_negative(like: torch.Tensor) -> float:
    """A finite stand-in for -inf: exp() of it is 0, and its gradients stay finite."""
    return torch.finfo(like.dtype).min / 4


def check_ranking(name: str, settings, beta: float | None = None) -> LossSpec:
    return RANKING.check([name], set(settings) | ({"beta"} if beta is not None else set()))[0]


def ranking_loss(name: str, logps, lengths, scores, mask=None, ref_logps=None, beta: float | None = None,
                 **hyperparameters):
    """Per-prompt losses [B] and metrics for ``[B, K]`` inputs; unset hyperparameters take the loss's defaults."""
    spec = RANKING[name]
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    if spec.needs_reference and ref_logps is None:
        raise ValueError(f"{name} needs reference log-probs")
    ranked = Ranked(logps, lengths.to(logps.dtype), scores.to(logps.dtype), mask, ref_logps)
    losses = spec.fn(ranked, **spec.options(beta, hyperparameters))
    with torch.no_grad():
        better = ranked.better()
        s = ranked.model_scores
        agree = (s[:, :, None] > s[:, None, :]) & better
        metrics = {"ranking/pair_accuracy": agree.sum().float() / better.sum().clamp(min=1),
                   "ranking/best_nll": ranked.best_nll().mean()}
    return losses, metrics
