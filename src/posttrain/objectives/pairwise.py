"""Pairwise preference losses: the DPO family and its reference-free relatives.

Every loss takes one :class:`Pair` of sequence-level tensors (shape ``[B]``) and returns the
per-pair loss ``[B]``. Notation in the docstrings:

    l_w = log pi(y_w|x) - log pi_ref(y_w|x)   (chosen log-ratio;   l_l for rejected)
    Delta = l_w - l_l                         (the DPO margin)
    a_w = log pi(y_w|x) / |y_w|               (length-averaged log-prob)
    sigma = logistic function

``pairwise_loss(name, ...)`` looks a loss up by name; ``name`` may also be a list with
``weights`` for weighted sums (MPO-style, e.g. ``["dpo", "bco_pair", "sft"]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.core.errors import UserError
from posttrain.objectives.registry import LossSpec, Registry


@dataclass
class Pair:
    chosen_logps: torch.Tensor  # summed log-probs of the chosen completion, [B]
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_lengths: torch.Tensor | None = None  # completion token counts, [B]
    rejected_lengths: torch.Tensor | None = None
    # LD-DPO: the parts of the sums that lie beyond the shorter completion's length
    chosen_tail_logps: torch.Tensor | None = None
    rejected_tail_logps: torch.Tensor | None = None
    ref_chosen_tail_logps: torch.Tensor | None = None
    ref_rejected_tail_logps: torch.Tensor | None = None
    # TPO: a gold (reference answer) completion per prompt, besides chosen and rejected
    gold_logps: torch.Tensor | None = None
    gold_lengths: torch.Tensor | None = None
    # DFT: the running estimate u of each prompt's log partition function (see dft_log_partition)
    log_partition: torch.Tensor | None = None

    @property
    def chosen_ratio(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_ratio(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_ratio - self.rejected_ratio

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError("this loss needs chosen_lengths and rejected_lengths")
        return self.chosen_lengths.clamp(min=1), self.rejected_lengths.clamp(min=1)


PAIRWISE = Registry("pairwise")
REF = ("reference",)


def register_pairwise(name: str, needs=REF, reward: str = "ratio"):
    """``needs``: reference, gold (TPO's third answer), tails (LD-DPO), log_partition (DFT's task state);
    ``reward``: what the loss compares, logged as rewards/* (ratio: beta * log-ratio; logps: beta * log-prob;
    mean_logps: beta * length-averaged log-prob)."""
    return PAIRWISE.register(name, needs, reward)


def _smoothed(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Conservative BCE: ``-(1-e) log sigma(z) - e log sigma(-z)``."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


# --- reference-based ---------------------------------------------------------------------------


@register_pairwise("dpo")
def dpo(pair: Pair, beta: float = 0.1) -> torch.Tensor:
    """DPO (Rafailov et al., 2023, Eq. 7): ``-log sigma(beta * Delta)``."""
    return -F.logsigmoid(beta * pair.margin)


@register_pairwise("cdpo")
def cdpo(pair: Pair, beta: float = 0.1, label_smoothing: float = 0.1) -> torch.Tensor:
    """Conservative DPO (Mitchell, 2023): the preference label is flipped with probability e.
    ``-(1-e) log sigma(beta Delta) - e log sigma(-beta Delta)``."""
    return _smoothed(beta * pair.margin, label_smoothing)


@register_pairwise("robust")
def robust(pair: Pair, beta: float = 0.1, label_smoothing: float = 0.1) -> torch.Tensor:
    """Robust DPO (Chowdhury et al., 2024, Eq. 8): an unbiased loss under label-flip rate e.
    ``[-(1-e) log sigma(beta Delta) + e log sigma(-beta Delta)] / (1 - 2e)``."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5")
    z = beta * pair.margin
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)


@register_pairwise("ipo")
def ipo(pair: Pair, beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al., 2023, Eq. 17): ``(Delta' - 1/(2 beta))^2``, with the log-ratios averaged
    per token (Delta' = l_w/|y_w| - l_l/|y_l|), as TRL does after confirming with the authors."""
    n_w, n_l = pair.lengths()
    return (pair.chosen_ratio / n_w - pair.rejected_ratio / n_l - 1 / (2 * beta)) ** 2


@register_pairwise("hinge")
def hinge(pair: Pair, beta: float = 0.1) -> torch.Tensor:
    """SLiC-HF / RSO hinge (Zhao et al., 2023; Liu et al., 2023): ``max(0, 1 - beta Delta)``."""
    return torch.relu(1 - beta * pair.margin)


@register_pairwise("exo_pair")
def exo_pair(pair: Pair, beta: float = 0.1, label_smoothing: float = 1e-3) -> torch.Tensor:
    """EXO (Ji et al., 2024, Eq. 16): reverse KL from softmax(beta * [l_w, l_l]) to the label
    distribution [1-e, e]: ``q_w (log q_w - log(1-e)) + q_l (log q_l - log e)``."""
    if not 0 < label_smoothing < 1:
        raise ValueError("exo_pair needs 0 < label_smoothing < 1")
    z = beta * pair.margin
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))


@register_pairwise("nca_pair")
def nca_pair(pair: Pair, beta: float = 0.1) -> torch.Tensor:
    """NCA (Chen et al., 2024, Eq. 12 for K=2): absolute rewards r = beta * l.
    ``-log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)``."""
    r_w, r_l = beta * pair.chosen_ratio, beta * pair.rejected_ratio
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@register_pairwise("bco_pair")
def bco_pair(pair: Pair, beta: float = 0.1) -> torch.Tensor:
    """BCO on pairs (Jung et al., 2024), without the reward shift: chosen is class 1, rejected class 0.
    ``-log sigma(beta l_w) - log sigma(-beta l_l)``."""
    return -F.logsigmoid(beta * pair.chosen_ratio) - F.logsigmoid(-beta * pair.rejected_ratio)


@register_pairwise("sppo_hard")
def sppo_hard(pair: Pair, beta: float = 0.1) -> torch.Tensor:
    """SPPO (Wu et al., 2024, Eq. 4.7) with hard win probabilities (1 for y_w, 0 for y_l).
    ``(l_w - 1/(2 beta))^2 + (l_l + 1/(2 beta))^2``."""
    return (pair.chosen_ratio - 0.5 / beta) ** 2 + (pair.rejected_ratio + 0.5 / beta) ** 2


@register_pairwise("aot")
def aot(pair: Pair, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, paired (Melnyk et al., 2024): distributional dominance by optimal transport in 1-D,
    i.e. the *sorted* policy log-odds against the sorted reference log-odds across the batch.
    The loss couples the pairs of a micro-batch, so it depends on the micro-batch size."""
    policy = torch.sort(pair.chosen_logps - pair.rejected_logps).values
    reference = torch.sort(pair.ref_chosen_logps - pair.ref_rejected_logps).values
    return _smoothed(beta * (policy - reference), label_smoothing)


@register_pairwise("aot_pair")
def aot_pair(pair: Pair, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al., 2024): sorted chosen log-ratios against sorted rejected ones
    (TRL's ``aot_unpaired``). Depends on the micro-batch size, like ``aot``."""
    chosen = torch.sort(pair.chosen_ratio).values
    rejected = torch.sort(pair.rejected_ratio).values
    return _smoothed(beta * (chosen - rejected), label_smoothing)


@register_pairwise("apo_zero")
def apo_zero(pair: Pair, beta: float = 0.1) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al., 2024, Eq. 7): raise chosen, lower rejected, each anchored at 0.
    ``1 - sigma(beta l_w) + sigma(beta l_l)``."""
    return 1 - torch.sigmoid(beta * pair.chosen_ratio) + torch.sigmoid(beta * pair.rejected_ratio)


@register_pairwise("apo_down")
def apo_down(pair: Pair, beta: float = 0.1) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al., 2024, Eq. 8): for chosen answers worse than the model's own.
    ``sigma(beta l_w) + 1 - sigma(beta Delta)``."""
    return torch.sigmoid(beta * pair.chosen_ratio) + 1 - torch.sigmoid(beta * pair.margin)


@register_pairwise("discopop")
def discopop(pair: Pair, beta: float = 0.1, discopop_tau: float = 0.05) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss (Lu et al., 2024, Eq. 5), z = beta Delta, tau = ``discopop_tau``
    (TRL's name): ``(1 - sigma(z/tau)) * -log sigma(z) + sigma(z/tau) * exp(-z)``."""
    z = beta * pair.margin
    mix = torch.sigmoid(z / discopop_tau)
    return (1 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)


@register_pairwise("ln_dpo")
def ln_dpo(pair: Pair, beta: float = 0.1) -> torch.Tensor:
    """Length-normalized DPO (LN-DPO; TRL's ``sigmoid_norm``): DPO on per-token log-ratios,
    ``-log sigma(beta (l_w/|y_w| - l_l/|y_l|))``, against DPO's drift to long answers."""
    n_w, n_l = pair.lengths()
    return -F.logsigmoid(beta * (pair.chosen_ratio / n_w - pair.rejected_ratio / n_l))


PAIRWISE.alias("sigmoid_norm", "ln_dpo")  # TRL's name for the same loss


@register_pairwise("rdpo_length")
def rdpo_length(pair: Pair, beta: float = 0.1, length_alpha: float = 0.01) -> torch.Tensor:
    """R-DPO (Park et al., 2024, Eq. 9): the length term is added back to the implicit reward so
    that the policy need not encode length: ``-log sigma(beta Delta + alpha (|y_w| - |y_l|))``, alpha =
    ``length_alpha`` (the paper's 0.005-0.05 range)."""
    n_w, n_l = pair.lengths()
    return -F.logsigmoid(beta * pair.margin + length_alpha * (n_w - n_l))


@register_pairwise("ld_dpo", needs=("reference", "tails"))
def ld_dpo(pair: Pair, beta: float = 0.1, ld_alpha: float = 0.5) -> torch.Tensor:
    """LD-DPO (Liu et al., 2024, Eq. 9): the log-prob of tokens beyond the shorter completion's length
    is scaled by alpha in [0, 1] (policy and reference alike), then DPO: 1 is DPO, 0 compares only
    the shared-length prefixes."""
    tails = (pair.chosen_tail_logps, pair.rejected_tail_logps, pair.ref_chosen_tail_logps, pair.ref_rejected_tail_logps)
    if any(t is None for t in tails):
        raise ValueError("ld_dpo needs the tail log-probs of chosen and rejected, for policy and reference")
    shrink = 1 - ld_alpha
    margin = ((pair.chosen_logps - shrink * tails[0]) - (pair.ref_chosen_logps - shrink * tails[2])
              - (pair.rejected_logps - shrink * tails[1]) + (pair.ref_rejected_logps - shrink * tails[3]))
    return -F.logsigmoid(beta * margin)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


@register_pairwise("f_dpo")
def f_dpo(pair: Pair, beta: float = 0.1, divergence: str = "js", divergence_alpha: float = 0.5) -> torch.Tensor:
    """f-DPO (Wang et al., 2023, Eq. 9): DPO with the reverse-KL regularizer replaced by an
    f-divergence; the implicit reward becomes beta f'(pi/pi_ref) with, for u = log(pi/pi_ref),
    reverse KL: u; forward KL: 1 - exp(-u); JS: log 2 + log sigma(u); alpha: (exp((alpha-1) u) - 1)/(alpha - 1)."""
    def score(u):
        if divergence == "reverse_kl":
            return u
        if divergence == "forward_kl":
            return 1 - torch.exp(-u)
        if divergence == "js":
            return math.log(2) + F.logsigmoid(u)
        if divergence == "alpha":
            if abs(divergence_alpha - 1) < 1e-6:
                return u
            return (torch.exp(((divergence_alpha - 1) * u).clamp(max=80.0)) - 1) / (divergence_alpha - 1)
        raise ValueError(f"divergence must be one of {F_DIVERGENCES}, got {divergence!r}")

    return -F.logsigmoid(beta * (score(pair.chosen_ratio) - score(pair.rejected_ratio)))


@register_pairwise("rpo")
def rpo(pair: Pair, beta: float = 0.1, alpha: float = 1.0) -> torch.Tensor:
    """RPO (Pang et al., 2024, Eq. 4; "your SFT loss is implicitly an adversarial regularizer"):
    DPO plus alpha times the chosen completion's length-normalized NLL."""
    n_w, _ = pair.lengths()
    return dpo(pair, beta) + alpha * -pair.chosen_logps / n_w


# --- reference-free ----------------------------------------------------------------------------


@register_pairwise("sft", needs=(), reward="logps")
def sft(pair: Pair) -> torch.Tensor:
    """Length-normalized NLL of the chosen completion, ``-log pi(y_w|x) / |y_w|`` (for loss mixtures)."""
    n_w, _ = pair.lengths()
    return -pair.chosen_logps / n_w


@register_pairwise("simpo", needs=(), reward="mean_logps")
def simpo(pair: Pair, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al., 2024, Eq. 6): length-averaged log-probs as the reward, with a target margin
    gamma: ``-log sigma(beta (a_w - a_l) - gamma)`` (TRL's CPO trainer with loss_type simpo)."""
    n_w, n_l = pair.lengths()
    return _smoothed(beta * (pair.chosen_logps / n_w - pair.rejected_logps / n_l) - gamma, label_smoothing)


@register_pairwise("cpo", needs=(), reward="logps")
def cpo(pair: Pair, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """CPO (Xu et al., 2024, Eq. 3 plus the NLL term of Eq. 4):
    ``-log sigma(beta (log pi(y_w) - log pi(y_l))) + alpha * NLL(y_w)/|y_w|``."""
    n_w, _ = pair.lengths()
    return _smoothed(beta * (pair.chosen_logps - pair.rejected_logps),
                     label_smoothing) + alpha * -pair.chosen_logps / n_w


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, stable on both ends (Maechler, 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register_pairwise("orpo", needs=(), reward="mean_logps")
def orpo(pair: Pair, beta: float = 0.1) -> torch.Tensor:
    """ORPO (Hong et al., 2024, Eqs. 4-7): SFT on the chosen answer minus lambda (here ``beta``) times
    the log-sigmoid of the log odds ratio, odds(y) = p / (1 - p) with p = exp(a), a the per-token mean
    log-prob: ``-a_w - beta log sigma(log odds(y_w) - log odds(y_l))``."""
    n_w, n_l = pair.lengths()
    a_w, a_l = pair.chosen_logps / n_w, pair.rejected_logps / n_l
    log_odds = (a_w - a_l) - (_log1mexp(a_w) - _log1mexp(a_l))
    return -a_w - beta * F.logsigmoid(log_odds)


@register_pairwise("tpo", needs=("gold",), reward="logps")
def tpo(pair: Pair, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """TPO (Saeidi et al., 2024, Eq. 6): one step on gold, preferred and rejected answers, no SFT stage and
    no reference model: ``-log sigma(beta (log pi(y_w) - log pi(y_l))) + alpha * NLL(y_gold)/|y_gold|``."""
    if pair.gold_logps is None:
        raise ValueError("tpo needs gold_logps and gold_lengths")
    return (_smoothed(beta * (pair.chosen_logps - pair.rejected_logps), label_smoothing)
            + alpha * -pair.gold_logps / pair.gold_lengths.clamp(min=1))


@register_pairwise("tpo_l", needs=("gold",), reward="mean_logps")
def tpo_l(pair: Pair, beta: float = 2.0, alpha: float = 1.0, gamma: float = 1.0,
          label_smoothing: float = 0.0) -> torch.Tensor:
    """TPO-L (Saeidi et al., 2024): TPO on length-averaged log-probs with a SimPO-style target margin gamma:
    ``-log sigma(beta (a_w - a_l) - gamma) + alpha * NLL(y_gold)/|y_gold|`` (beta and gamma default to SimPO's)."""
    if pair.gold_logps is None:
        raise ValueError("tpo_l needs gold_logps and gold_lengths")
    n_w, n_l = pair.lengths()
    margin = beta * (pair.chosen_logps / n_w - pair.rejected_logps / n_l) - gamma
    return _smoothed(margin, label_smoothing) + alpha * -pair.gold_logps / pair.gold_lengths.clamp(min=1)


def dft_log_partition(scores: torch.Tensor, previous: torch.Tensor, gamma: float) -> torch.Tensor:
    """DFT's moving estimate of log E[exp(score)] over negatives (Guo et al., 2025, Alg. 1; the official code's
    ``u = log((1 - gamma) exp(u_prev) + gamma exp(w))`` with one negative per prompt, w = its score)."""
    if gamma >= 1:
        return scores.detach()
    return torch.logaddexp(math.log1p(-gamma) + previous, math.log(gamma) + scores.detach())


def _dft(positive: torch.Tensor, negative: torch.Tensor, scores: torch.Tensor, log_partition) -> torch.Tensor:
    u = scores.detach() if log_partition is None else log_partition
    return -positive + torch.exp(scores - u).detach() * negative


@register_pairwise("dft", needs=("reference", "log_partition"))
def dft(pair: Pair, tau: float = 1.0) -> torch.Tensor:
    """DFT (Guo et al., 2025, "Discriminative Finetuning ..."): raise the gold answer (``chosen``) and push down
    model-generated negatives (``rejected``) by their importance weight in the discriminative likelihood,
    ``-log pi(y+) + sg(exp(s - u)) log pi(y')`` with s = log pi(y')/tau - log pi_ref(y') and u the running log
    partition estimate (``dft_log_partition``), as in the authors' DFTTrainer.dft_loss."""
    scores = pair.rejected_logps / tau - pair.ref_rejected_logps
    return _dft(pair.chosen_logps, pair.rejected_logps, scores, pair.log_partition)


@register_pairwise("dft2", needs=("log_partition",), reward="mean_logps")
def dft2(pair: Pair, tau: float = 1.0) -> torch.Tensor:
    """DFT2, the reference-free variant (the authors' dft_loss_ref_free): the same on length-averaged log-probs,
    ``-a+ + sg(exp(a'/tau - u)) a'``."""
    n_w, n_l = pair.lengths()
    a_w, a_l = pair.chosen_logps / n_w, pair.rejected_logps / n_l
    return _dft(a_w, a_l, a_l / tau, pair.log_partition)


def dft_scores(name: str, rejected_logps, ref_rejected_logps, rejected_lengths, tau: float) -> torch.Tensor:
    """The per-pair score s whose log partition the task tracks, for ``dft`` or ``dft2``."""
    if name == "dft":
        return (rejected_logps / tau - ref_rejected_logps).detach()
    return (rejected_logps / rejected_lengths.clamp(min=1) / tau).detach()


@register_pairwise("asft", needs=(), reward="mean_logps")
def asft(pair: Pair, beta: float = 0.1) -> torch.Tensor:
    """ASFT (Wang et al., 2024, arXiv 2409.10571; as written in Gorbatovski et al., 2025, Sec. 2.4): absolute
    likelihoods instead of Bradley-Terry, with lambda = ``beta`` as for ORPO and per-token mean probabilities
    p = exp(a): ``-log p_w - lambda [log sigma(odds(y_w)) + log sigma(-odds(y_l))]``, odds(y) = log(p / (1 - p)),
    which simplifies to ``-(1 + lambda) log p_w - lambda log(1 - p_l)``."""
    n_w, n_l = pair.lengths()
    a_w, a_l = pair.chosen_logps / n_w, pair.rejected_logps / n_l
    return -a_w - beta * (a_w + _log1mexp(a_l))


# --- the entry point ---------------------------------------------------------------------------

# Optional inputs that a loss may need besides the four sums and the lengths (see ``Pair``).
EXTRA_INPUTS = ("chosen_tail_logps", "rejected_tail_logps", "ref_chosen_tail_logps", "ref_rejected_tail_logps",
                "gold_logps", "gold_lengths", "log_partition")


def check_pairwise(names: list[str], settings: dict, beta: float | None = None,
                   weights: list[float] | None = None) -> list[LossSpec]:
    """Refuse, before any training, unknown losses, settings no chosen loss reads, and values a loss rejects
    (each loss is run once on a dummy pair with the recipe's settings)."""
    given = set(settings) | ({"beta"} if beta is not None else set())
    specs = PAIRWISE.check(names, given)
    if weights is not None and len(weights) != len(names):
        raise UserError(f"loss.weights has {len(weights)} entries for {len(names)} losses in loss.name")
    one = torch.ones(1, dtype=torch.float64)
    dummy = {k: -one for k in EXTRA_INPUTS} | {"gold_lengths": one}
    try:
        pairwise_loss(names, -one, -2 * one, -one, -one, one, one, beta=beta, weights=weights, **settings, **dummy)
    except ValueError as exc:
        raise UserError(f"loss: {exc}") from None
    return specs


def pairwise_loss(
    name: str | list[str],
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    beta: float | None = None,
    weights: list[float] | None = None,
    **hyperparameters,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [B] and metrics (means over the batch) for one loss or a weighted sum of losses.

    ``beta`` and every other hyperparameter left unset take each loss's own paper default. Optional
    tensors among ``hyperparameters``: the four ``*_tail_logps`` of LD-DPO, ``gold_logps`` and
    ``gold_lengths`` of TPO, ``log_partition`` of DFT, and ``chosen_wpo_logps`` /
    ``rejected_wpo_logps`` (mean aligned token log-probs) to apply WPO weights."""
    names = [name] if isinstance(name, str) else list(name)
    weights = weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} losses but {len(weights)} weights")
    extra = {k: hyperparameters.pop(k) for k in EXTRA_INPUTS if k in hyperparameters}
    wpo = [hyperparameters.pop(k, None) for k in ("chosen_wpo_logps", "rejected_wpo_logps")]
    pair = Pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
                **extra)
    total = torch.zeros_like(chosen_logps)
    for loss_name, weight in zip(names, weights):
        spec = PAIRWISE[loss_name]
        if spec.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
            raise ValueError(f"{loss_name} needs reference log-probs")
        total = total + weight * spec.fn(pair, **spec.options(beta, hyperparameters))
    metrics = pair_metrics(pair, *implicit_rewards(names, pair, beta))
    if wpo[0] is not None:
        # WPO (Zhou et al., 2024, Eq. 2 with the aligned probabilities of Sec. 3.2): weight each pair by
        # exp(mean log p(y_w) + mean log p(y_l)), token log-probs aligned by subtracting log sum_v p_v^2; no gradient
        pair_weights = torch.exp(wpo[0] + wpo[1]).detach()
        total = total * pair_weights
        metrics["wpo/weight"] = pair_weights.mean()
    return total, metrics


def implicit_rewards(names: list[str], pair: Pair, beta: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards the loss compares, chosen and rejected [B], without gradient: beta * log-ratio for
    reference-based losses, beta * (length-averaged) log-prob for SimPO, ORPO, CPO and the like (as TRL and
    the SimPO repository log them). A mixture reports its first loss with a temperature."""
    specs = [PAIRWISE[n] for n in names]
    spec = next((s for s in specs if "beta" in s.defaults), specs[0])
    scale = spec.beta(beta) or 1.0
    with torch.no_grad():
        if spec.reward == "ratio":
            return scale * pair.chosen_ratio, scale * pair.rejected_ratio
        if spec.reward == "mean_logps":
            n_w, n_l = pair.lengths()
            return scale * pair.chosen_logps / n_w, scale * pair.rejected_logps / n_l
        return scale * pair.chosen_logps, scale * pair.rejected_logps


def pair_metrics(pair: Pair, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        metrics = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margin": (chosen - rejected).mean(),
            "rewards/accuracy": (chosen > rejected).float().mean(),
            "logps/chosen": pair.chosen_logps.mean(),
            "logps/rejected": pair.rejected_logps.mean(),
        }
        if pair.chosen_lengths is not None:
            metrics["length/chosen"] = pair.chosen_lengths.float().mean()
            metrics["length/rejected"] = pair.rejected_lengths.float().mean()
    return metrics
