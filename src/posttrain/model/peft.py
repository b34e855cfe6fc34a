"""Wrap a model for training: PEFT adapters, selective and random freezing, and merging adapters back."""

from __future__ import annotations

import fnmatch
import random
import re
import sys

import torch

from posttrain.core.errors import UserError

LORA_ALIASES = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "eva": {"init_lora_weights": "eva"},
    "corda": {"init_lora_weights": "corda"},
}


# recipe key -> peft config field names it may map to
COMMON_FIELDS = {
    "r": ("r",),
    "alpha": ("lora_alpha", "alpha"),
    "dropout": ("lora_dropout", "dropout", "module_dropout"),
    "target_modules": ("target_modules",),
    "num_virtual_tokens": ("num_virtual_tokens",),
}


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def peft_config(cfg, explicitly_set: set[str], task_type: str = "CAUSAL_LM"):
    """Build the peft config for ``peft.method``: LoRA aliases, or any method peft registers."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    method = cfg.method.lower()
    peft_type = "LORA" if method in LORA_ALIASES else method.upper()
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        known = sorted(set(LORA_ALIASES) | {t.lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING})
        raise UserError(f"peft.method: unknown method {cfg.method!r} (known: none, {', '.join(known)})")
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    fields = config_class.__dataclass_fields__
    kwargs = {"task_type": task_type, **LORA_ALIASES.get(method, {})}
    for key, names in COMMON_FIELDS.items():
        name = next((n for n in names if n in fields), None)
        if key == "target_modules" and peft_type != "LORA" and key not in explicitly_set:
            continue  # other methods keep peft's per-architecture defaults (IA3 also needs feedforward_modules)
        if name is not None:
            kwargs[name] = getattr(cfg, key)
        elif key in explicitly_set:
            raise UserError(f"peft.{key} does not apply to peft.method: {cfg.method}")
    if method == "eva":
        kwargs.setdefault("eva_config", peft.EvaConfig())
    if task_type != "CAUSAL_LM" and "exclude_modules" in fields:  # the head trains in full (modules_to_save)
        kwargs["exclude_modules"] = ["score", "classifier"]
    unknown = set(cfg.options) - set(fields)
    if unknown:
        raise UserError(f"peft.options: {sorted(unknown)} are not fields of {config_class.__name__}")
    kwargs.update(cfg.options)
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"peft: {config_class.__name__} rejected the settings: {exc}") from None


def apply_peft(model, cfg, explicitly_set: set[str], seed: int = 0, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with the recipe's adapter, or freeze parameters for selective fine-tuning. With ``SEQ_CLS`` /
    ``TOKEN_CLS``, peft also trains (and saves) the classification head in full."""
    if cfg.method == "none":
        adapter_keys = sorted(explicitly_set & {*COMMON_FIELDS, "options"})
        if adapter_keys:  # said out loud, not an error: `peft.method=none` on a LoRA recipe is a normal override
            print(f"posttrain: note: peft.{', peft.'.join(adapter_keys)} ignored: they configure an adapter and "
                  "peft.method is none", file=sys.stderr, flush=True)
        apply_freezing(model, cfg.trainable, cfg.frozen, cfg.random_freeze, seed)
        return model
    if cfg.trainable or cfg.frozen or cfg.random_freeze:
        raise UserError(f"peft.trainable / peft.frozen / peft.random_freeze select parameters for full fine-tuning; "
                        f"they cannot be combined with peft.method: {cfg.method}")
    from peft import get_peft_model

    config = peft_config(cfg, explicitly_set, task_type)
    if config.is_prompt_learning and task_type != "CAUSAL_LM":
        raise UserError(f"peft.method: {cfg.method} is a prompt method; classification heads train with LoRA-like "
                        "methods or in full")
    if config.is_prompt_learning and config.peft_type not in ("PROMPT_TUNING", "P_TUNING"):
        raise UserError(f"peft.method: {cfg.method} feeds past key values into attention, which posttrain's "
                        "forward pass does not route; prompt_tuning and p_tuning are the supported prompt methods")
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def needs_data_init(model) -> bool:
    """EVA initializes adapters from activations of the training data."""
    config = getattr(model, "active_peft_config", None)
    return getattr(config, "init_lora_weights", None) == "eva"


def apply_freezing(model, trainable: list[str], frozen: list[str], random_freeze: float, seed: int) -> None:
    """Selective fine-tuning: glob patterns on parameter names and HFT-style random freezing.

    HFT (Hui et al., 2024, "HFT: Half Fine-Tuning") freezes a random half of the parameters
    in each round; here ``random_freeze`` freezes that fraction of the weight matrices of every
    transformer layer, chosen with the run's seed.
    """
    named = dict(model.named_parameters())
    if trainable:
        for name, param in named.items():
            param.requires_grad_(any(fnmatch.fnmatch(name, p) for p in trainable))
    for name, param in named.items():
        if any(fnmatch.fnmatch(name, p) for p in frozen):
            param.requires_grad_(False)
    if random_freeze:
        rng = random.Random(seed)
        by_layer: dict[str, list[str]] = {}
        for name, param in named.items():
            match = _LAYER.search(name)
            if match and param.ndim == 2 and param.requires_grad:
                by_layer.setdefault(match.group(1), []).append(name)
        for names in by_layer.values():
            for name in rng.sample(names, round(random_freeze * len(names))):
                named[name].requires_grad_(False)
    if not any(p.requires_grad for p in named.values()):
        examples = ", ".join(list(named)[:4])
        raise UserError(f"peft.trainable / peft.frozen leave no parameter to train (names look like: {examples}, ...)")


def trainable_summary(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{_count(trainable)} of {_count(total)} parameters trainable ({100 * trainable / total:.2f}%)"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def merged(model):
    """The model with its adapter merged into the base weights (prompt-learning adapters cannot be)."""
    if not hasattr(model, "peft_config"):
        return model
    if is_prompt_learning(model):
        raise UserError("export: prompt-learning adapters cannot be merged into the weights; use the adapter directory")
    return model.merge_and_unload()
