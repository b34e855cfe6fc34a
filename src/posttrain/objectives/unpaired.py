"""Unpaired preference losses: each completion is labelled desirable or undesirable on its own.

    l = log pi(y|x) - log pi_ref(y|x)      (the completion's log-ratio, shape [B])
    label = True for desirable (thumbs up), False for undesirable

``unpaired_loss(name, logps, ref_logps, labels, ...)`` returns per-example losses [B] (already
multiplied by the desirable / undesirable weights) and metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from posttrain.objectives.registry import LossSpec, Registry

UNPAIRED = Registry("unpaired")


@UNPAIRED.register("kto", needs=("reference", "kl"))
def kto(ratios, labels, kl, shift, beta: float = 0.1) -> torch.Tensor:
    """KTO (Ethayarajh et al., 2024, Eq. 7): a prospect-theory value around the reference point
    z0 = max(0, KL estimate) (detached): desirable ``1 - sigma(beta (l - z0))``, undesirable
    ``1 - sigma(beta (z0 - l))``. z0 is estimated from mismatched prompt / completion pairs of the
    micro-batch, as in TRL."""
    z0 = kl.detach().clamp(min=0)
    return torch.where(labels, 1 - torch.sigmoid(beta * (ratios - z0)), 1 - torch.sigmoid(beta * (z0 - ratios)))


@UNPAIRED.register("bco", needs=("reference", "reward_shift", "density_ratio"))
def bco(ratios, labels, kl, shift, beta: float = 0.1) -> torch.Tensor:
    """BCO (Jung et al., 2024, Eq. 7): a binary classifier whose logit is the implicit reward
    r = beta l minus the reward shift delta (a running mean of the rewards, Eq. 9):
    desirable ``-log sigma(r - delta)``, undesirable ``-log sigma(-(r - delta))``."""
    logits = beta * ratios - shift
    return torch.where(labels, -F.logsigmoid(logits), -F.logsigmoid(-logits))


@UNPAIRED.register("apo_zero_unpaired", needs=("reference",))
def apo_zero_unpaired(ratios, labels, kl, shift, beta: float = 0.1) -> torch.Tensor:
    """APO-zero, unpaired (D'Oosterlinck et al., 2024, Eq. 7 per completion):
    desirable ``1 - sigma(beta l)``, undesirable ``sigma(beta l)``."""
    return torch.where(labels, 1 - torch.sigmoid(beta * ratios), torch.sigmoid(beta * ratios))


def check_unpaired(name: str, beta: float | None = None) -> LossSpec:
    return UNPAIRED.check([name], {"beta"} if beta is not None else set())[0]


def unpaired_loss(
    name: str,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    beta: float | None = None,
    kl: torch.Tensor | None = None,
    shift: float = 0.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    density_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example losses [B] (weighted by label) and metrics. ``kl`` is KTO's reference point,
    ``shift`` BCO's reward shift delta, ``density_ratio`` BCO's underlying-distribution-matching weight
    of each undesirable example (Jung et al., 2024, Sec. 4.2: p(desirable | x) / p(undesirable | x))."""
    spec = check_unpaired(name)
    if "kl" in spec.needs and kl is None:
        raise ValueError(f"{name} needs the KL estimate")
    beta = spec.beta(beta)
    labels = labels.bool()
    ratios = logps - ref_logps
    kl = torch.zeros((), device=logps.device) if kl is None else kl
    losses = spec.fn(ratios, labels, kl, torch.as_tensor(shift, dtype=ratios.dtype, device=ratios.device), beta=beta)
    losses = losses * torch.where(labels, desirable_weight, undesirable_weight).to(losses.dtype)
    if density_ratio is not None:
        losses = losses * torch.where(labels, torch.ones_like(density_ratio), density_ratio).to(losses.dtype)
    with torch.no_grad():
        rewards = beta * ratios
        metrics = {"kl": kl.detach().clamp(min=0).float()}
        for name_, mask in (("chosen", labels), ("rejected", ~labels)):
            if mask.any():
                metrics[f"rewards/{name_}"] = rewards[mask].mean()
                metrics[f"logps/{name_}"] = logps[mask].mean()
    return losses, metrics


def fit_prompt_classifier(embeddings: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> Callable:
    """BCO's density-ratio classifier: L2-regularized logistic regression with balanced class weights (the
    setting of the BCO authors' scikit-learn classifier), fitted with L-BFGS. Returns x -> p(desirable | x)."""
    x = embeddings.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x = (x - mean) / std
    y = labels.double()
    balance = torch.where(labels, len(y) / (2 * y.sum()), len(y) / (2 * (len(y) - y.sum())))
    weight = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros((), dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (balance * F.binary_cross_entropy_with_logits(x @ weight + bias, y, reduction="none")).sum()
        loss = loss + 0.5 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda e: torch.sigmoid(((e.double() - mean) / std) @ weight + bias)


def density_ratio(p_desirable: torch.Tensor, low: float = 0.5, high: float = 10.0) -> torch.Tensor:
    """``clamp(p / (1 - p), low, high)``: how much more likely the prompt is under the desirable distribution."""
    return (p_desirable / (1 - p_desirable + 1e-8)).clamp(min=low, max=high)
