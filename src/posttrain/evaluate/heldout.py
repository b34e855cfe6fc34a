"""Held-out scores by the metrics training reports: the token NLL of gold completions (an SFT run's ``eval/loss``),
per record, and the per-pair completion log-probs that preference accuracy compares. Each works on a model spec
or on a loaded (model, tokenizer), through the training commands' own data pipelines."""

from __future__ import annotations

import torch
from accelerate import PartialState

from posttrain.data.batching import Layout
from posttrain.data.config import DataConfig
from posttrain.data.encoders import PairEncoder, PairExample, SFTEncoder, collate_pairs, sft_example
from posttrain.data.store import load_examples
from posttrain.data.tokenize import ExampleTokenizer
from posttrain.evaluate.model import EvalModel
from posttrain.evaluate.stats import wilson_interval
from posttrain.model.forward import TargetLogprobs, batch_logprobs, per_example_sum, sequence_stats


class Scoring:
    """Held-out records of one file as the training commands encode and batch them (default layout: packed rows),
    on the best device, without a recipe or a task."""

    def __init__(self, tokenizer, data: DataConfig, encoder, make):
        self.tokenizer, self.data, self.encoder, self.make = tokenizer, data, encoder, make
        self.layout = Layout(tokenizer.pad_token_id)
        self.device = PartialState().device

    def examples(self) -> list:
        return load_examples(self.data, 0, "eval", self.encoder, self.make, quiet=True)


def loaded(model):
    """(model, tokenizer) from a spec, or the pair itself."""
    if isinstance(model, tuple):
        return model
    spec = EvalModel(str(model))
    return spec.model, spec.tokenizer


def record_losses(model, data: str, limit: int | None = 200, max_length: int = 1024) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """(summed NLL, number of target tokens) of each record's gold completion, records in file order; ``model``
    is a spec or (model, tokenizer). Their ratio of sums is an SFT run's ``eval/loss`` (unit weights)."""
    model, tokenizer = loaded(model)
    scoring = sft_scoring(tokenizer, data, limit, max_length)
    return example_losses(model, scoring, scoring.examples())


def sft_scoring(tokenizer, data: str, limit: int | None, max_length: int) -> Scoring:
    """SFT records: each gold completion's tokens are the targets (as ``posttrain sft`` trains on them)."""
    cfg = DataConfig(train=data, eval=data, eval_limit=limit, max_length=max_length)
    return Scoring(tokenizer, cfg, SFTEncoder(ExampleTokenizer(tokenizer, cfg, cfg.assistant_only_loss), False),
                   sft_example)


@torch.no_grad()
def example_losses(model, scoring: Scoring, examples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, target tokens) of tokenized SFT ``examples``, batched as ``scoring`` lays them out."""
    module = TargetLogprobs(model)
    was_training = model.training
    model.eval()
    nll, tokens = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.float64)]
    try:
        for start in range(0, len(examples), 8):
            batch = scoring.layout.collate(examples[start:start + 8], max_length=scoring.data.max_length)
            batch = batch.to(scoring.device)
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
    model, tokenizer = loaded(model)
    cfg = DataConfig(train=data, eval=data, eval_limit=limit, max_length=max_length, truncation="left")
    make = lambda sides, extra, index: PairExample(sides[0], sides[1], index, "eval")  # noqa: E731
    scoring = Scoring(tokenizer, cfg, PairEncoder(ExampleTokenizer(tokenizer, cfg), False, ["simpo"]), make)
    module, pairs = TargetLogprobs(model), scoring.examples()
    out: dict[str, list] = {"chosen": [], "rejected": [], "chosen_len": [], "rejected_len": []}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), 8):
            batch = collate_pairs(pairs[start:start + 8], scoring.layout, max_length).to(scoring.device)
            stats, half = sequence_stats(module, batch), batch.num_pairs
            for key, side in (("chosen", slice(0, half)), ("rejected", slice(half, 2 * half))):
                out[key].append(stats["logps"][side].double().cpu())
                out[f"{key}_len"].append(stats["lengths"][side].double().cpu())
    finally:
        model.train(was_training)
    return {key: torch.cat(values) for key, values in out.items()}


def preference_margins(policy: dict[str, torch.Tensor],
                       reference: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per pair: DPO's implicit reward margin ``log pi/pi_ref(chosen) - log pi/pi_ref(rejected)`` against a
    reference, or the difference of mean token log-probs without one."""
    if reference is None:
        return policy["chosen"] / policy["chosen_len"] - policy["rejected"] / policy["rejected_len"]
    return (policy["chosen"] - reference["chosen"]) - (policy["rejected"] - reference["rejected"])


def preference_accuracy(policy: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None = None) -> dict:
    """Share of pairs whose margin (:func:`preference_margins`) prefers the chosen completion; ties count half.
    With n and a 95% Wilson interval."""
    margin = preference_margins(policy, reference)
    correct = float((margin > 0).sum() + 0.5 * (margin == 0).sum())
    n = len(margin)
    low, high = wilson_interval(round(correct), n)
    return {"accuracy": correct / n, "n": n, "low": low, "high": high}
