"""Weight-space merging as pure functions on state dicts ``{name: tensor}``.

Every method is a per-tensor rule (``*_tensor``, used by the streaming CLI one tensor at a time) and a dict-level
function over whole state dicts. Floating tensors are combined in float32 at least (float64 stays float64) and
returned in the dtype of the first input; integer and boolean tensors (buffers, position ids) are copied from the
first input. Keys and shapes must agree: a difference is reported with the tensor's name.

Task vectors are ``tau_i = theta_i - theta_base``. Methods and their papers:
- ``linear``: weighted average, the uniform soup with equal weights (Wortsman et al., 2022, "Model soups"), whose
  ``greedy_soup`` adds ingredients only while a held-out score does not get worse; ``slerp``: spherical
  interpolation of two models; ``task_arithmetic``: ``base + sum_i s_i tau_i`` (Ilharco et al., 2023, "Editing
  Models with Task Arithmetic"; negative scales negate a task); ``ties``: trim each task vector to its
  top-``density`` magnitudes, elect a sign per entry by the sign of the weighted sum, average the agreeing entries
  (Yadav et al., 2023, "TIES-Merging"); ``dare``: drop each task-vector entry with probability ``1 - density`` and
  rescale the rest by ``1 / density`` (Yu et al., 2024, "Language Models are Super Mario"), then add linearly or by
  TIES' sign election; ``model_stock``: ``t * mean(theta_i) + (1 - t) * theta_base`` with ``t = N cos / (1 + (N - 1)
  cos)`` from the mean pairwise cosine of the task vectors (Jang et al., 2024, "Model Stock"); ``lines``: scale the
  update of layer ``l`` of ``L`` by ``alpha + beta * l / (L - 1)`` (Wang et al., 2025, "LiNeS"); ``wise_ft``: ``(1 -
  alpha) base + alpha tuned`` (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"); ``transfer``: the
  fine-tuning difference of one model pair added to another base (Lin et al., 2025, "Efficient Model Development
  through Fine-tuning Transfer"). Conventions (normalization, ties' ``sum`` sign election, model stock's mean
  pairwise cosine) follow mergekit, so results can be compared with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from posttrain.core.errors import UserError

StateDict = dict[str, torch.Tensor]


# -- per-tensor rules -----------------------------------------------------------------------------------------
def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear_tensor(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    w = torch.tensor(weights, dtype=_work_dtype(tensors[0]))
    out = sum(wi * t.to(w.dtype) for wi, t in zip(w, tensors))
    return out / w.sum() if normalize and abs(float(w.sum())) > 1e-8 else out


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8,
                 parallel: float = 0.9995) -> torch.Tensor:
    """Interpolate along the great circle between the directions of ``a`` and ``b`` (flattened); nearly parallel
    tensors (|cos| > ``parallel``) are interpolated linearly, as mergekit does."""
    dtype = _work_dtype(a)
    a64, b64 = a.to(dtype).reshape(-1), b.to(dtype).reshape(-1)
    cos = torch.dot(a64 / (a64.norm() + eps), b64 / (b64.norm() + eps)).clamp(-1, 1)
    if abs(float(cos)) > parallel:
        out = (1 - t) * a64 + t * b64
    else:
        theta = torch.arccos(cos)
        out = (torch.sin((1 - t) * theta) * a64 + torch.sin(t * theta) * b64) / torch.sin(theta)
    return out.reshape(a.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """1 on the ``int(density * numel)`` entries of largest magnitude (TIES' trim step)."""
    if density >= 1:
        return torch.ones_like(delta)
    k = int(density * delta.numel())
    if k < 1:
        return torch.zeros_like(delta)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.topk(delta.abs().reshape(-1), k).indices] = 1
    return mask.reshape(delta.shape)


def elect_and_merge(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES' sign election (the sign of the weighted sum, ties counting as +) and disjoint mean: each entry averages
    the weighted deltas whose sign agrees with the elected one (divided by their weights' sum when normalizing)."""
    weights = weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * weights
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = (weighted.sign() == elected).to(deltas.dtype)
    mixed = (weighted * agree).sum(0)
    if not normalize:
        return mixed
    divisor = (weights * agree).sum(0)
    return mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def task_vectors(base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    dtype = _work_dtype(base)
    return torch.stack([t.to(dtype) - base.to(dtype) for t in tensors])


def task_arithmetic_tensor(base: torch.Tensor, tensors: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
    deltas = task_vectors(base, tensors)
    s = torch.tensor(scales, dtype=deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    return base.to(deltas.dtype) + (deltas * s).sum(0)


def ties_tensor(base: torch.Tensor, tensors: list[torch.Tensor], density: float, weights: list[float],
                normalize: bool = True, scale: float = 1.0) -> torch.Tensor:
    deltas = task_vectors(base, tensors)
    trimmed = torch.stack([d * magnitude_mask(d, density) for d in deltas])
    w = torch.tensor(weights, dtype=deltas.dtype)
    return base.to(deltas.dtype) + scale * elect_and_merge(trimmed, w, normalize)


def dare_tensor(base: torch.Tensor, tensors: list[torch.Tensor], density: float, weights: list[float],
                generator: torch.Generator, elect_signs: bool = False, normalize: bool = True) -> torch.Tensor:
    deltas = task_vectors(base, tensors)
    keep = torch.rand(deltas.shape, generator=generator, dtype=torch.float64) < density
    dropped = deltas * keep.to(deltas.dtype) / density
    w = torch.tensor(weights, dtype=deltas.dtype)
    if elect_signs:
        return base.to(deltas.dtype) + elect_and_merge(dropped, w, normalize)
    mixed = (dropped * w.reshape(-1, *([1] * (deltas.dim() - 1)))).sum(0)
    total = float(w.sum())
    return base.to(deltas.dtype) + (mixed / total if normalize and abs(total) > 1e-8 else mixed)


def model_stock_tensor(base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) < 2:
        raise UserError("model_stock needs at least two fine-tuned models besides the base")
    deltas = task_vectors(base, tensors).reshape(len(tensors), -1)
    norms = deltas.norm(dim=1)
    cosines = [float((deltas[i] @ deltas[j]) / (norms[i] * norms[j]).clamp(min=1e-6))
               for i in range(len(tensors)) for j in range(i + 1, len(tensors))]
    cos = max(-1.0, min(1.0, sum(cosines) / len(cosines)))
    n = len(tensors)
    t = n * cos / (1 + (n - 1) * cos)
    average = torch.stack([x.to(deltas.dtype) for x in tensors]).mean(0)
    return t * average + (1 - t) * base.to(deltas.dtype)


# -- state dicts ----------------------------------------------------------------------------------------------
def check_compatible(names: list[str], shapes: list[dict[str, tuple[int, ...]]]) -> None:
    """Same tensor names and shapes in every input (``shapes``: name -> shape per input), or a message naming the
    first difference."""
    keys = set(shapes[0])
    for name, state in zip(names[1:], shapes[1:]):
        if set(state) != keys:
            missing, extra = sorted(keys - set(state)), sorted(set(state) - keys)
            what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which {names[0]} lacks"
            raise UserError(f"merge: {name} {what} ({len(missing)} missing, {len(extra)} extra tensors)")
        for key, shape in state.items():
            if tuple(shape) != tuple(shapes[0][key]):
                raise UserError(f"merge: {key}: shape {tuple(shape)} in {name} but {tuple(shapes[0][key])} in "
                                f"{names[0]}")


def combine(rule: Callable[..., torch.Tensor], states: list[StateDict], names: list[str] | None = None) -> StateDict:
    """Apply ``rule(name, tensors)`` to every tensor name; non-float tensors are copied from the first state, and
    the result keeps the first state's dtype."""
    names = names or [f"model {i}" for i in range(len(states))]
    check_compatible(names, [{k: tuple(v.shape) for k, v in s.items()} for s in states])
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        out[key] = rule(key, [s[key] for s in states]).to(first.dtype)
    return out


def linear(models: list[StateDict], weights: list[float] | None = None, normalize: bool = True) -> StateDict:
    weights = weights if weights is not None else [1.0] * len(models)
    return combine(lambda _, ts: linear_tensor(ts, weights, normalize), models)


def slerp(a: StateDict, b: StateDict, t: float) -> StateDict:
    return combine(lambda _, ts: slerp_tensor(ts[0], ts[1], t), [a, b])


def task_arithmetic(base: StateDict, models: list[StateDict], scales: list[float] | float = 1.0) -> StateDict:
    scales = scales if isinstance(scales, list) else [float(scales)] * len(models)
    return combine(lambda _, ts: task_arithmetic_tensor(ts[0], ts[1:], scales), [base, *models])


def ties(base: StateDict, models: list[StateDict], density: float = 0.5, weights: list[float] | None = None,
         normalize: bool = True) -> StateDict:
    weights = weights if weights is not None else [1.0] * len(models)
    return combine(lambda _, ts: ties_tensor(ts[0], ts[1:], density, weights, normalize), [base, *models])


def dare(base: StateDict, models: list[StateDict], density: float = 0.5, weights: list[float] | None = None,
         seed: int = 0, normalize: bool = True, elect_signs: bool = False) -> StateDict:
    """DARE with a linear sum (``elect_signs=True``: TIES' sign election, i.e. ``dare_ties``). The drop masks are
    drawn tensor by tensor, in key order, from ``seed``."""
    weights = weights if weights is not None else [1.0] * len(models)
    generator = torch.Generator().manual_seed(seed)
    return combine(lambda _, ts: dare_tensor(ts[0], ts[1:], density, weights, generator, elect_signs, normalize),
                   [base, *models])


def dare_ties(base: StateDict, models: list[StateDict], density: float = 0.5, weights: list[float] | None = None,
              seed: int = 0, normalize: bool = True) -> StateDict:
    return dare(base, models, density, weights, seed, normalize, elect_signs=True)


def model_stock(base: StateDict, models: list[StateDict]) -> StateDict:
    return combine(lambda _, ts: model_stock_tensor(ts[0], ts[1:]), [base, *models])


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def lines_scale(name: str, num_layers: int, alpha: float, beta: float) -> float:
    """LiNeS' factor for a tensor: ``alpha + beta * l / (L - 1)`` for layer ``l``; tensors before the first block
    (embeddings) take the first layer's factor, tensors after the last (final norm, head) the last layer's."""
    index = layer_index(name)
    if index is None:
        index = 0 if "embed" in name else num_layers - 1
    return alpha + beta * index / max(num_layers - 1, 1)


def lines_tensor(name: str, before: torch.Tensor, after: torch.Tensor, num_layers: int, alpha: float,
                 beta: float) -> torch.Tensor:
    dtype = _work_dtype(before)
    return before.to(dtype) + lines_scale(name, num_layers, alpha, beta) * (after.to(dtype) - before.to(dtype))


def transfer_tensor(target: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                    scale: float = 1.0) -> torch.Tensor:
    dtype = _work_dtype(target)
    return target.to(dtype) + scale * (after.to(dtype) - before.to(dtype))


def lines(base: StateDict, tuned: StateDict, alpha: float = 0.0, beta: float = 1.0) -> StateDict:
    """LiNeS: shallow layers keep close to the base (the general features a fine-tune tends to damage), deep
    layers keep more of the update; ``alpha = 0, beta = 1`` scales the update linearly from 0 to 1 with depth."""
    layers = {layer_index(k) for k in base} - {None}
    if not layers:
        raise UserError("lines: no tensor name has a layer number (layers.N.); cannot scale by depth")
    num_layers = max(layers) + 1
    return combine(lambda key, ts: lines_tensor(key, ts[0], ts[1], num_layers, alpha, beta), [base, tuned])


def wise_ft(base: StateDict, tuned: StateDict, alpha: float = 0.5) -> StateDict:
    return combine(lambda _, ts: linear_tensor(ts, [1 - alpha, alpha], normalize=False), [base, tuned])


def transfer(source_base: StateDict, source_tuned: StateDict, target_base: StateDict, scale: float = 1.0) -> StateDict:
    """``target_base + scale * (source_tuned - source_base)``: carry a fine-tune to another version of the base."""
    return combine(lambda _, ts: transfer_tensor(ts[0], ts[1], ts[2], scale), [target_base, source_base, source_tuned],
                   ["target_base", "source_base", "source_tuned"])


def greedy_selection(count: int, soup_score: Callable[[list[int]], float],
                     higher_is_better: bool = False) -> tuple[list[int], list[dict]]:
    """Greedy soup's recipe (Wortsman et al., 2022, "Model soups", Algorithm 1): rank the ingredients by their own
    held-out score, start from the best, and add each next one only if the uniform soup scores no worse with it.
    ``soup_score(indices)`` scores the uniform average of those ingredients (one index: the model itself).
    Returns the kept indices and one record per decision."""
    better = (lambda a, b: a >= b) if higher_is_better else (lambda a, b: a <= b)
    alone = [soup_score([i]) for i in range(count)]
    order = sorted(range(count), key=lambda i: -alone[i] if higher_is_better else alone[i])
    kept, best = [order[0]], alone[order[0]]
    history = [{"ingredient": order[0], "alone": alone[order[0]], "soup": best, "kept": True}]
    for i in order[1:]:
        score = soup_score(kept + [i])
        history.append({"ingredient": i, "alone": alone[i], "soup": score, "kept": better(score, best)})
        if better(score, best):
            kept, best = kept + [i], score
    return kept, history


def greedy_soup(models: list[StateDict], score: Callable[[StateDict], float],
                higher_is_better: bool = False) -> tuple[StateDict, list[int]]:
    """The greedy soup of ``models`` under ``score`` (e.g. held-out loss of the state dict), and the kept indices.
    The uniform soup is :func:`linear` with equal weights."""
    kept, _ = greedy_selection(len(models), lambda idx: score(linear([models[i] for i in idx])), higher_is_better)
    return linear([models[i] for i in kept]), kept
