"""Reward-model task: preference pairs (and, for multi-objective heads, ratings) -> a score per sequence.

The score is a head on the model's last hidden state at each sequence's last token (a decoder classifier's
``score``; sequences are packed, so the head reads one position per sequence and no padding is computed), or
any sequence-classification model's own output. Pairs train the reward by Bradley-Terry; with ``rm.objectives``
the model has one output per rated attribute, regressed on the records' ratings, and the reward is their
weighted sum with fixed weights or weights learned from the pairs (ArmoRM's two stages in one run, with a
global weighting instead of its prompt-conditioned gate).

``final/`` is a plain sequence-classification model (adapters merged) that transformers'
``AutoModelForSequenceClassification`` loads directly; its ``config.json`` carries the attribute names, the
reward weights and the reward mean / std measured on the held-out data (for later normalization).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from posttrain.core.errors import UserError
from posttrain.data.batching import Batch
from posttrain.data.store import load_examples
from posttrain.data.tokenize import ExampleTokenizer, TokenizedExample
from posttrain.model.forward import HeadOutputs, decoder_trunk_and_head
from posttrain.model.load import load_classifier, save_final
from posttrain.model.peft import merged
from posttrain.objectives.reward import bradley_terry
from posttrain.train.task import OfflineTask
from posttrain.data.encoders import RatedEncoder, RewardBatch, RewardExample


class RewardWeighting(nn.Module):
    """The reward as a weighted sum of per-attribute scores: fixed weights, or softmax weights learned from the
    pairs with the attribute scores held fixed (so the heads stay regressors of their attributes)."""

    def __init__(self, names: list[str], fixed: list[float] | None = None, learned: bool = False, dtype=torch.float32):
        super().__init__()
        self.names, self.learned = list(names), learned
        if learned:
            self.logits = nn.Parameter(torch.zeros(len(names), dtype=dtype))
        else:
            weights = fixed if fixed is not None else [1.0 / len(names)] * len(names)
            self.register_buffer("fixed", torch.tensor(weights, dtype=dtype))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, 0) if self.learned else self.fixed

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores.detach() if self.learned else scores) @ self.weights().to(scores.dtype)


def last_positions(batch: Batch) -> torch.Tensor:
    """Each sequence's last-token flat position, in sequence order (packed rows list them out of order)."""
    last = torch.empty(batch.num_examples, dtype=torch.long)
    last[batch.target_example] = batch.target_index + 1
    return last


class ClassifierTask(OfflineTask):
    """What reward and process reward models share: a classifier model in, a plain classifier (adapters merged, pad
    token set, the task's annotations in config.json) out."""

    per_token = False  # token classification (one output per position) instead of sequence classification
    num_labels = 1

    def load_model(self, path: str):
        model = load_classifier(path, self.num_labels, self.per_token, self.recipe.trust_remote_code,
                                self.recipe.allow_pickle)
        model.config.pad_token_id = self.tokenizer.pad_token_id  # transformers' own forward needs it for batches
        if decoder_trunk_and_head(model)[0] is None and (self.recipe.train.packing or self.recipe.train.padding_free):
            raise UserError(f"model: {type(model).__name__} pools with its own head, which packed rows would mix; "
                            "set train.packing: false (and train.padding_free: false)")
        return model

    def save_final(self, model, tokenizer, directory) -> None:
        model = merged(model)
        model.config.pad_token_id = tokenizer.pad_token_id
        self.annotate(model)
        save_final(model, tokenizer, directory)

    def annotate(self, model) -> None:
        """Write what later users of the model need into ``model.config``."""


class RewardModelTask(ClassifierTask):
    name = "rm"
    peft_task_type = "SEQ_CLS"
    progress = {"acc": "accuracy"}

    def __init__(self, recipe, tokenizer):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.cfg = recipe.rm
        self.objectives = list(self.cfg.objectives)
        self.tokenize = ExampleTokenizer(tokenizer, recipe.data)
        self.weighting: RewardWeighting | None = None
        self.reward_stats: dict[str, float] | None = None
        self.train_examples: list[RewardExample] = []

    @property
    def num_labels(self) -> int:
        return max(len(self.objectives), 1)

    # -- data ---------------------------------------------------------------------------------
    def build_dataset(self, which: str, quiet: bool = False):
        out = load_examples(self.recipe.data, self.recipe.train.seed, which,
                            RatedEncoder(self.tokenize, self.objectives), self.example, quiet)
        if not out and self.recipe.data.sources(which):
            raise UserError(f"data.{which}: every record was dropped (too long for "
                            f"data.max_length={self.recipe.data.max_length})")
        if not out:
            return out
        self.track_sources(which, out)
        r = out.summary
        if not quiet:
            print(f"data.{which}: {r['records']} records -> {r['pairs']:.0f} pairs, {len(out) - r['pairs']:.0f} rated "
                  f"completions, {r['tokens']:,.0f} tokens; truncated {r['truncated']:.0f} "
                  f"({self.recipe.data.truncation}), "
                  f"dropped {r['dropped']}", flush=True)
        if which == "train":
            self.check_supervision(rated=r["rated"] > 0, pairs=r["pairs"] > 0)
        return out

    def example(self, sequences: list[TokenizedExample], extra: dict, index: int) -> RewardExample:
        ratings = np.array([[np.nan if v is None else v for v in row] for row in extra["ratings"]], dtype=np.float64)
        return RewardExample(sequences, ratings, extra["margin"], index)

    def check_supervision(self, rated: bool, pairs: bool) -> None:
        if self.cfg.weighting == "learned" and not pairs:
            raise UserError(
                "rm.weighting: learned learns the weights from preference pairs; the training data has none"
            )
        if self.objectives and not rated:
            raise UserError(f"rm.objectives: no training record rates {', '.join(self.objectives)} "
                            "(ratings / chosen_ratings / rejected_ratings)")

    def adapter_init_examples(self, examples: Sequence[RewardExample]) -> Iterable[TokenizedExample]:
        return (e.sequences[0] for e in examples)

    def collate(self, examples: list[RewardExample]) -> RewardBatch:
        sequences, pairs, pair_record, margins, sequence_record = [], [], [], [], []
        for r, example in enumerate(examples):
            if example.is_pair:
                pairs.append((len(sequences), len(sequences) + 1))
                pair_record.append(r)
                margins.append(example.margin)
            sequences += example.sequences
            sequence_record += [r] * len(example.sequences)
        batch = self.pack(sequences, max_length=self.recipe.data.max_length)
        return RewardBatch(batch, last_positions(batch), torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
                           torch.tensor(pair_record, dtype=torch.long), torch.tensor(margins, dtype=torch.float64),
                           torch.from_numpy(np.concatenate([e.ratings for e in examples])),
                           torch.tensor(sequence_record),
                           len(examples))

    # -- model ----------------------------------------------------------------------------------
    def setup(self, model, accelerator, train: list, evaluation: list) -> None:
        super().setup(model, accelerator, train, evaluation)
        self.train_examples = train
        dtype = next(model.parameters()).dtype
        fixed = [self.cfg.weights[name] for name in self.objectives] if self.cfg.weights else None
        self.weighting = RewardWeighting(self.objectives or ["reward"], fixed, self.cfg.weighting == "learned", dtype)
        self.weighting.to(self.device)

    def module(self, model) -> HeadOutputs:
        return HeadOutputs(model, self.weighting)

    def trained(self, model) -> nn.Module:
        return nn.ModuleDict({"model": model, "weighting": self.weighting}) if self.weighting.learned else model

    # -- loss -----------------------------------------------------------------------------------
    def normalizer(self, rb: RewardBatch) -> float:
        """The loss is a mean over the records (pairs, rated completions) of the whole optimizer step."""
        return float(rb.num_records)

    def record_losses(self, module, rb: RewardBatch) -> tuple[torch.Tensor, dict]:
        b = rb.batch
        scores, reward = module(b.input_ids, b.position_ids, b.attention_mask, rb.last_index, segments=b.segments)
        chosen, rejected = reward[rb.pairs[:, 0]], reward[rb.pairs[:, 1]]
        per_pair = bradley_terry(chosen, rejected, rb.margins, self.cfg.center_rewards_coefficient)
        losses = torch.zeros(rb.num_records, dtype=scores.dtype, device=scores.device).index_add(0, rb.pair_record,
                                                                                                 per_pair)
        out = {"scores": scores, "reward": reward, "chosen": chosen, "rejected": rejected}
        if self.objectives:
            rated = torch.isfinite(rb.ratings)
            squared = torch.where(rated, scores - torch.nan_to_num(rb.ratings).to(scores.dtype), 0.0) ** 2
            count = torch.zeros(rb.num_records, device=scores.device).index_add(0, rb.sequence_record,
                                                                                rated.sum(1).float())
            total = torch.zeros_like(losses).index_add(0, rb.sequence_record, squared.sum(1))
            losses = losses + self.cfg.regression_weight * total / count.clamp(min=1).to(total.dtype)
            out.update(squared=squared, rated=rated)
        return losses, out

    def loss(self, module, rb: RewardBatch, normalizer: float):
        losses, out = self.record_losses(module, rb)
        margin = (out["chosen"] - out["rejected"]).detach()
        pairs = float(len(margin))
        metrics = {"accuracy": (float((margin > 0).sum()), pairs), "margin": (float(margin.sum()), pairs),
                   "reward_mean": (float(out["reward"].detach().sum()), float(len(out["reward"])))}
        if self.objectives:
            for k, name in enumerate(self.objectives):
                metrics[f"mse/{name}"] = (float(out["squared"][:, k].detach().sum()), float(out["rated"][:, k].sum()))
            if self.weighting.learned:
                metrics.update({f"weight/{n}": float(w) * rb.num_records / normalizer
                                for n, w in zip(self.objectives, self.weighting.weights().detach())})
        return losses.sum() / normalizer, metrics

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def eval_sums(self, module, rb: RewardBatch) -> dict[str, float]:
        """Pairwise accuracy counts a tie as wrong (as RewardBench does); reward moments for normalization."""
        losses, out = self.record_losses(module, rb)
        reward = out["reward"].double()
        margin = out["chosen"] - out["rejected"]
        sums = {"records": float(rb.num_records), "loss": float(losses.sum()), "pairs": float(len(margin)),
                "correct": float((margin > 0).sum()), "margin": float(margin.sum()),
                "sequences": float(len(reward)), "reward": float(reward.sum()), "reward_sq": float((reward ** 2).sum())}
        for k, name in enumerate(self.objectives):
            sums[f"se/{name}"] = float(out["squared"][:, k].sum())
            sums[f"rated/{name}"] = float(out["rated"][:, k].sum())
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["sequences"], 1.0)
        mean = sums["reward"] / n
        std = math.sqrt(max(sums["reward_sq"] / n - mean ** 2, 0.0))
        self.reward_stats = {"reward_mean": mean, "reward_std": std, "reward_stats_n": int(sums["sequences"])}
        metrics = {"eval/loss": sums["loss"] / max(sums["records"], 1.0), "eval/reward_mean": mean,
                   "eval/reward_std": std}
        if sums["pairs"]:
            metrics.update({"eval/accuracy": sums["correct"] / sums["pairs"],
                            "eval/margin": sums["margin"] / sums["pairs"]})
        for name in self.objectives:
            if sums[f"rated/{name}"]:
                metrics[f"eval/rmse/{name}"] = math.sqrt(sums[f"se/{name}"] / sums[f"rated/{name}"])
        return metrics

    # -- the saved model --------------------------------------------------------------------------
    def annotate(self, model) -> None:
        config = model.config
        if self.objectives:
            config.id2label = dict(enumerate(self.objectives))
            config.label2id = {name: k for k, name in enumerate(self.objectives)}
            config.reward_weights = dict(zip(self.objectives, self.weighting.weights().detach().double().tolist()))
        for key, value in (self.reward_stats or self.training_reward_stats(model)).items():
            setattr(config, key, value)

    @torch.no_grad()
    def training_reward_stats(self, model, limit: int = 256) -> dict[str, float]:
        """Without held-out data: the reward moments over (up to ``limit``) training records (none when exporting
        a checkpoint, which has no data at hand)."""
        if not self.train_examples:
            return {}
        module = HeadOutputs(model, self.weighting).eval()
        size = self.recipe.train.batch_size
        sums: dict[str, float] = {}
        for start in range(0, min(limit, len(self.train_examples)), size):
            batch = self.collate(self.train_examples[start : start + size]).to(self.device)
            for key, value in self.eval_sums(module, batch).items():
                sums[key] = sums.get(key, 0.0) + value
        self.eval_metrics(sums)
        return self.reward_stats
