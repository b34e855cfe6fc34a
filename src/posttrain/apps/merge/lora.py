"""LoRA adapters in weight space: merge one into its base, or combine several into one exact adapter.

An adapter's update of a module's weight is ``scaling * B @ A`` (``scaling = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA). Averaging A and B matrices separately does not average the updates (the
product is not linear in them); concatenating the ranks does: ``A = [A_1; A_2]``, ``B = [w_1 s_1 B_1, w_2 s_2 B_2]``
gives ``B A = sum_i w_i s_i B_i A_i`` exactly, as peft's ``add_weighted_adapter(combination_type="cat")``.
"""

from __future__ import annotations

import math

import torch

from posttrain.core.errors import UserError

StateDict = dict[str, torch.Tensor]
_A, _B = ".lora_A.weight", ".lora_B.weight"


def adapter_scaling(config: dict) -> float:
    """The update scale of a plain LoRA adapter config (peft's ``adapter_config.json`` as a dict)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"adapter: {config.get('peft_type')} is not a LoRA adapter; merge it with posttrain export")
    if config.get("use_dora"):
        raise UserError("adapter: DoRA rescales each column by a learned magnitude; merge it with posttrain export")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError("adapter: per-module ranks or alphas (rank_pattern / alpha_pattern) are not supported here; "
                        "merge it with posttrain export")
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _modules(adapter: StateDict) -> list[str]:
    modules = sorted(key[: -len(_A)] for key in adapter if key.endswith(_A))
    if not modules:
        raise UserError("adapter: no lora_A weights found")
    for module in modules:
        if module + _B not in adapter:
            raise UserError(f"adapter: {module}{_A} has no matching lora_B")
    return modules


def base_key(module: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj.weight`` (the base model's name)."""
    return module.removeprefix("base_model.model.") + ".weight"


def merge_lora(base: StateDict, adapter: StateDict, scaling: float) -> StateDict:
    """The base weights with ``scaling * B @ A`` added to every adapted module (computed in float32 at least)."""
    out = dict(base)
    for module in _modules(adapter):
        key = base_key(module)
        if key not in base:
            raise UserError(f"adapter: {module} adapts {key}, which the base model does not have")
        weight = base[key]
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        delta = scaling * adapter[module + _B].to(dtype) @ adapter[module + _A].to(dtype)
        if delta.shape != weight.shape:
            raise UserError(f"adapter: {module} gives an update of shape {tuple(delta.shape)} for {key} of shape "
                            f"{tuple(weight.shape)}")
        out[key] = (weight.to(dtype) + delta).to(weight.dtype)
    return out


def concat_adapters(adapters: list[StateDict], scalings: list[float], weights: list[float] | None = None) -> StateDict:
    """One adapter (scaling 1: save it with ``lora_alpha = r = the summed ranks``) whose update is exactly
    ``sum_i weights[i] * scalings[i] * B_i @ A_i``. Every adapter must adapt the same modules."""
    weights = weights if weights is not None else [1.0] * len(adapters)
    modules = _modules(adapters[0])
    for i, adapter in enumerate(adapters[1:], 1):
        if _modules(adapter) != modules:
            raise UserError(f"adapter {i} adapts other modules than adapter 0")
    out = {}
    for module in modules:
        out[module + _A] = torch.cat([a[module + _A] for a in adapters], dim=0)
        out[module + _B] = torch.cat([w * s * a[module + _B] for a, w, s in zip(adapters, weights, scalings)], dim=1)
    return out
