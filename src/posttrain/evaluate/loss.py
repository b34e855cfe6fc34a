"""Held-out loss of a model on SFT-format data: the ``eval/loss`` an SFT run logs, for comparing models (soups,
merges) by the metric training reports."""

from __future__ import annotations


def heldout_loss(model: str, data: str, limit: int | None = 200, max_length: int = 1024, batch_size: int = 8) -> float:
    """Token-mean negative log-likelihood of the gold completions of the first ``limit`` records of ``data``."""
    from posttrain.config import validate_recipe
    from posttrain.models import load_tokenizer, resolve_model
    from posttrain.train.tasks.sft import SFTTask

    recipe = validate_recipe("sft", {"model": str(model), "output_dir": "unused",
                                     "data": {"train": data, "eval": data, "eval_limit": limit, "max_length": max_length},
                                     "train": {"batch_size": batch_size, "report_to": []}})
    path = resolve_model(recipe.model)
    task = SFTTask(recipe, load_tokenizer(path))
    examples = task.build_dataset("eval", quiet=True)
    module = task.module(task.load_model(path).eval())
    return task.evaluate(module, examples)["eval/loss"]
