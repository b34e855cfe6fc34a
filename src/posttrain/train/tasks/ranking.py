"""Ranking task: a prompt with K scored responses -> [B, K] log-probs -> a listwise loss (AFT, RRHF, PRO, ListNet)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from posttrain.core.errors import UserError
from posttrain.data.store import load_examples
from posttrain.data.tokenize import ExampleTokenizer, TokenizedExample
from posttrain.model.forward import sequence_logps
from posttrain.objectives.ranking import check_ranking, ranking_loss
from posttrain.train.reference import Reference
from posttrain.train.task import OfflineTask
from posttrain.data.encoders import RankedBatch, RankedEncoder, RankedItem


def ranked_stats(module, batch: RankedBatch) -> dict[str, torch.Tensor]:
    logps = sequence_logps(module, batch.batch)
    lengths = torch.bincount(batch.batch.target_example, minlength=batch.batch.num_examples).to(logps.dtype)
    return {"logps": batch.grid(logps), "lengths": batch.grid(lengths)}


class RankingTask(OfflineTask):
    name = "rank"

    def __init__(self, recipe, tokenizer):
        self.recipe, self.tokenizer, self.loss_cfg = recipe, tokenizer, recipe.loss
        self.hyperparameters = self.loss_cfg.hyperparameters()
        self.spec = check_ranking(self.loss_cfg.name, self.hyperparameters, self.loss_cfg.beta)
        self.reference = Reference(recipe, self.spec.needs_reference, [self.loss_cfg.name])
        self.tokenize = ExampleTokenizer(tokenizer, recipe.data)
        self.width: dict[str, int] = {}  # the largest K of each split: the cache's grid width

    def build_dataset(self, which: str, quiet: bool = False):
        items = load_examples(self.recipe.data, self.recipe.train.seed, which, RankedEncoder(self.tokenize),
                              lambda responses, extra, index: RankedItem(responses, extra["scores"], index, which),
                              quiet)
        if not items and self.recipe.data.sources(which):
            raise UserError(f"data.{which}: every record was dropped (too long for "
                            f"data.max_length={self.recipe.data.max_length})")
        if not items:
            return items
        self.track_sources(which, items)
        self.width[which] = int(items.summary["max_width"])
        if not quiet:
            print(f"data.{which}: {items.summary['records']} records -> {len(items)} ranked lists of up to "
                  f"{self.width[which]} responses, dropped {items.summary['dropped']}", flush=True)
        return items

    def adapter_init_examples(self, items: Sequence[RankedItem]) -> Iterable[TokenizedExample]:
        """EVA initializes from the prompts with their best-scored responses."""
        return (item.responses[max(range(len(item.scores)), key=item.scores.__getitem__)] for item in items)

    def collate(self, items: list[RankedItem]) -> RankedBatch:
        width = self.width[items[0].split]
        sequences, slots, shared = [], [], []
        scores = torch.zeros(len(items), width)
        mask = torch.zeros(len(items), width, dtype=torch.bool)
        for b, item in enumerate(items):
            shared.append(list(range(len(sequences), len(sequences) + len(item.responses))))  # one prompt each
            for k, response in enumerate(item.responses):
                sequences.append(response)
                slots.append(b * width + k)
            scores[b, : len(item.scores)] = torch.tensor(item.scores)
            mask[b, : len(item.scores)] = True
        batch = self.pack(sequences, shared, self.recipe.data.max_length)
        return RankedBatch(batch, torch.tensor(slots), scores, mask, torch.tensor([i.index for i in items]),
                           items[0].split)

    def setup(self, model, accelerator, train: list, evaluation: list) -> None:
        super().setup(model, accelerator, train, evaluation)
        self.reference.prepare(model, accelerator, {"train": train, "eval": evaluation}, self.collate, _reference_logps)

    def reference_logps(self, module, batch: RankedBatch) -> torch.Tensor | None:
        if self.reference.mode == "none":
            return None
        if self.reference.mode == "precomputed":
            return self.reference.cached(batch.split, batch.index, ["logps"], batch.mask.device)["logps"]
        return self.reference.run(module, _reference_logps, batch)["logps"]

    def normalizer(self, batch: RankedBatch) -> float:
        return float(len(batch.index))

    def compute(self, module, batch: RankedBatch):
        stats = ranked_stats(module, batch)
        return ranking_loss(self.loss_cfg.name, stats["logps"], stats["lengths"], batch.scores, batch.mask,
                            self.reference_logps(module, batch), self.loss_cfg.beta, **self.hyperparameters)

    def loss(self, module, batch: RankedBatch, normalizer: float):
        losses, metrics = self.compute(module, batch)
        share = len(batch.index) / normalizer
        return losses.sum() / normalizer, {k: float(v) * share for k, v in metrics.items()}

    @torch.no_grad()
    def eval_sums(self, module, batch: RankedBatch) -> dict[str, float]:
        """Pair accuracy: the share of (better, worse) pairs the model orders the same way by mean log-prob."""
        losses, _ = self.compute(module, batch)
        stats = ranked_stats(module, batch)
        s = stats["logps"] / stats["lengths"].clamp(min=1)
        better = (batch.scores[:, :, None] > batch.scores[:, None, :]) & batch.mask[:, :, None] & batch.mask[:, None, :]
        agree = (s[:, :, None] > s[:, None, :]) & better
        return {"lists": float(len(batch.index)), "loss": float(losses.sum()), "agree": float(agree.sum()),
                "pairs": float(better.sum())}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"eval/loss": sums["loss"] / max(sums["lists"], 1.0),
                "eval/pair_accuracy": sums["agree"] / max(sums["pairs"], 1.0)}


def _reference_logps(module, batch: RankedBatch) -> dict[str, torch.Tensor]:
    return {"logps": ranked_stats(module, batch)["logps"]}
