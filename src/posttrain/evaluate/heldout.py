"""Held-out scores by the metrics training reports: the token NLL of gold completions (an SFT run's ``eval/loss``),
per record, and the per-pair completion log-probs that preference accuracy compares. Each works on a model spec
or on a loaded (model, tokenizer), through the training commands' own data pipelines."""

from __future__ import annotations

import torch

from posttrain.train.forward import batch_logprobs, per_example_sum


def scoring_task(command: str, tokenizer, data: dict, **sections):
    """A command's task, set up to build and collate ``data`` with ``tokenizer`` on the best device."""
    from accelerate import PartialState

    from posttrain.commands import COMMANDS
    from posttrain.config import validate_recipe

    recipe = validate_recipe(command, {"model": "unused", "output_dir": "unused", "data": data,
                                       "train": {"batch_size": 8, "report_to": []}, **sections})
    task = COMMANDS[command].task_class()(recipe, tokenizer)
    task.accelerator = PartialState()
    return task


def loaded(model):
    """(model, tokenizer) from a spec, or the pair itself."""
    if isinstance(model, tuple):
        return model
    from posttrain.evaluate.model import EvalModel

    spec = EvalModel(str(model))
    return spec.model, spec.tokenizer


def record_losses(model, data: str, limit: int | None = 200, max_length: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, number of target tokens) of each record's gold completion, records in file order; ``model``
    is a spec or (model, tokenizer). Their ratio of sums is an SFT run's ``eval/loss`` (unit weights)."""
    model, tokenizer = loaded(model)
    task = sft_scoring_task(tokenizer, data, limit, max_length)
    return example_losses(model, task, task.build_dataset("eval", quiet=True))


def sft_scoring_task(tokenizer, data: str, limit: int | None, max_length: int):
    return scoring_task("sft", tokenizer, {"train": data, "eval": data, "eval_limit": limit, "max_length": max_length})


@torch.no_grad()
def example_losses(model, task, examples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, target tokens) of tokenized SFT ``examples``, through ``task``'s batching."""
    module = task.module(model)
    was_training = model.training
    model.eval()
    nll, tokens = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.float64)]
    try:
        for start in range(0, len(examples), 8):
            batch = task.collate(examples[start:start + 8]).to(task.device)
            logps = batch_logprobs(module, batch)
            mask = (batch.target_weights > 0).to(logps.dtype)
            nll.append(per_example_sum(-logps * mask, batch).double().cpu())
            tokens.append(per_example_sum(mask, batch).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(nll), torch.cat(tokens)


def heldout_loss(model, data: str, limit: int | None = 200, max_length: int = 1024) -> float:
    """Token-mean negative log-likelihood of the gold completions of the first ``limit`` records of ``data``."""
    nll, tokens = record_losses(model, data, limit, max_length)
    return float(nll.sum() / tokens.sum())


@torch.no_grad()
def pair_logprobs(model, data: str, limit: int | None = 200, max_length: int = 320) -> dict[str, torch.Tensor]:
    """Summed log-probs and lengths of the chosen and rejected completions of held-out preference pairs (prompts
    truncated from the left, as DPO trains); ``model`` is a spec or (model, tokenizer)."""
    from posttrain.train.tasks.preference import sequence_stats

    model, tokenizer = loaded(model)
    task = scoring_task("dpo", tokenizer, {"train": data, "eval": data, "eval_limit": limit, "max_length": max_length,
                                           "truncation": "left"}, loss={"name": "simpo"}, reference="none")
    module, pairs = task.module(model), task.build_dataset("eval", quiet=True)
    out: dict[str, list] = {"chosen": [], "rejected": [], "chosen_len": [], "rejected_len": []}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), 8):
            batch = task.collate(pairs[start:start + 8]).to(task.device)
            stats, half = sequence_stats(module, batch), batch.num_pairs
            for key, side in (("chosen", slice(0, half)), ("rejected", slice(half, 2 * half))):
                out[key].append(stats["logps"][side].double().cpu())
                out[f"{key}_len"].append(stats["lengths"][side].double().cpu())
    finally:
        model.train(was_training)
    return {key: torch.cat(values) for key, values in out.items()}


def preference_margins(policy: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per pair: DPO's implicit reward margin ``log pi/pi_ref(chosen) - log pi/pi_ref(rejected)`` against a
    reference, or the difference of mean token log-probs without one."""
    if reference is None:
        return policy["chosen"] / policy["chosen_len"] - policy["rejected"] / policy["rejected_len"]
    return (policy["chosen"] - reference["chosen"]) - (policy["rejected"] - reference["rejected"])


def preference_accuracy(policy: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None = None) -> dict:
    """Share of pairs whose margin (:func:`preference_margins`) prefers the chosen completion; ties count half.
    With n and a 95% Wilson interval."""
    from posttrain.evaluate.stats import wilson_interval

    margin = preference_margins(policy, reference)
    correct = float((margin > 0).sum() + 0.5 * (margin == 0).sum())
    n = len(margin)
    low, high = wilson_interval(round(correct), n)
    return {"accuracy": correct / n, "n": n, "low": low, "high": high}
