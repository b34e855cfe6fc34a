"""Held-out scores of a model directory by the metrics training reports: the ``eval/loss`` of SFT runs and the
per-pair completion log-probs that preference accuracy compares. For comparing models (soups, merges, exports)."""

from __future__ import annotations

import torch


def evaluation_task(command: str, model: str, data: dict, **sections):
    """(task, model placed on the best device) for scoring ``model`` with a command's own data pipeline."""
    from accelerate import PartialState

    from posttrain.commands import COMMANDS
    from posttrain.config import validate_recipe
    from posttrain.models import load_tokenizer, resolve_model

    recipe = validate_recipe(command, {"model": str(model), "output_dir": "unused", "data": data,
                                       "train": {"batch_size": 8, "report_to": []}, **sections})
    path = resolve_model(recipe.model)
    task = COMMANDS[command].task_class()(recipe, load_tokenizer(path))
    task.accelerator = PartialState()
    return task, task.load_model(path).to(task.device).eval()


def heldout_loss(model: str, data: str, limit: int | None = 200, max_length: int = 1024) -> float:
    """Token-mean negative log-likelihood of the gold completions of the first ``limit`` records of ``data``."""
    task, loaded = evaluation_task("sft", model, {"train": data, "eval": data, "eval_limit": limit,
                                                  "max_length": max_length})
    return task.evaluate(task.module(loaded), task.build_dataset("eval", quiet=True))["eval/loss"]


@torch.no_grad()
def pair_logprobs(model: str, data: str, limit: int | None = 200, max_length: int = 320) -> dict[str, torch.Tensor]:
    """Summed log-probs and lengths of the chosen and rejected completions of held-out preference pairs (prompts
    truncated from the left, as DPO trains)."""
    from posttrain.train.tasks.preference import sequence_stats

    task, loaded = evaluation_task("dpo", model, {"train": data, "eval": data, "eval_limit": limit,
                                                  "max_length": max_length, "truncation": "left"},
                                   loss={"name": "simpo"}, reference="none")
    module, pairs = task.module(loaded), task.build_dataset("eval", quiet=True)
    out: dict[str, list] = {"chosen": [], "rejected": [], "chosen_len": [], "rejected_len": []}
    for start in range(0, len(pairs), 8):
        batch = task.collate(pairs[start:start + 8]).to(task.device)
        stats, half = sequence_stats(module, batch), batch.num_pairs
        for key, side in (("chosen", slice(0, half)), ("rejected", slice(half, 2 * half))):
            out[key].append(stats["logps"][side].double().cpu())
            out[f"{key}_len"].append(stats["lengths"][side].double().cpu())
    return {key: torch.cat(values) for key, values in out.items()}


def preference_accuracy(policy: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None = None) -> dict:
    """Share of pairs the model prefers the chosen completion of: by DPO's implicit reward
    ``log pi/pi_ref(chosen) - log pi/pi_ref(rejected) > 0`` against a reference, or by mean log-prob without one.
    Ties count half. With n and a 95% Wilson interval."""
    from posttrain.evaluate.accuracy import wilson_interval

    if reference is None:
        margin = policy["chosen"] / policy["chosen_len"] - policy["rejected"] / policy["rejected_len"]
    else:
        margin = (policy["chosen"] - reference["chosen"]) - (policy["rejected"] - reference["rejected"])
    correct = float((margin > 0).sum() + 0.5 * (margin == 0).sum())
    n = len(margin)
    low, high = wilson_interval(round(correct), n)
    return {"accuracy": correct / n, "n": n, "low": low, "high": high}
