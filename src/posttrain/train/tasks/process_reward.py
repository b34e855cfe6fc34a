"""Process reward models: a correctness label per solution step, read at the step's separator token.

The layout is TRL's ``PRMTrainer`` (raw text, no chat template): ``[bos] prompt step_1 sep step_2 sep ...``, each
step's label on the last token of ``step + separator``; a 2-class token head (``AutoModelForTokenClassification``)
is trained by cross-entropy averaged over every labeled token of the optimizer step. A step's score is the
probability of class 1 (a correct step) at its separator; a solution's score aggregates them (the minimum, by
default: one wrong step spoils a solution, as in Lightman et al., 2023 and Wang et al., 2024, Math-Shepherd).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.data.batching import Batch
from posttrain.data.formats import StepsExample, parse_steps
from posttrain.data.store import Encoded, Encoder, load_examples
from posttrain.data.tokenize import TokenizedExample
from posttrain.errors import UserError
from posttrain.train.forward import HeadOutputs
from posttrain.train.tasks.reward_model import ClassifierTask


@dataclass
class StepsBatch:
    batch: Batch  # one target per labeled separator: the head reads position target_index + 1
    labels: torch.Tensor  # [N] 0 / 1, in target order

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def to(self, device) -> "StepsBatch":
        return StepsBatch(self.batch.to(device), self.labels.to(device))


@dataclass
class LabeledSteps:
    tokens: TokenizedExample  # weight 1 at each labeled separator: collate's target t + 1 is where the head reads
    labels: np.ndarray  # [labeled steps] 0 / 1


def tokenize_steps(example: StepsExample, tokenizer, separator: str, max_prompt_length: int | None = None,
                   last_step_only: bool = False) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, positions of the labeled separators, their labels) in TRL's ``PRMTrainer.tokenize_row`` layout;
    the prompt keeps its last ``max_prompt_length`` tokens (the caller cuts the row to its first max_length)."""
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"] if example.prompt else []
    if tokenizer.bos_token_id is not None:
        prompt = [tokenizer.bos_token_id] + prompt
    if max_prompt_length is not None:
        prompt = prompt[-max_prompt_length:]
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    ids, positions, labels = list(prompt), [], []
    for i, (step, label) in enumerate(zip(example.steps, example.labels)):
        ids += tokenizer(step, add_special_tokens=False)["input_ids"] + separator_ids
        if not last_step_only or i == len(example.steps) - 1:
            positions.append(len(ids) - 1)
            labels.append(int(label))
    return ids, positions, labels


class StepsEncoder(Encoder):
    """A step-labelled solution -> its tokens with a target at each labeled separator, and the labels."""

    tallies = ("steps", "correct")

    def __init__(self, tokenizer, separator: str, max_prompt_length: int | None, last_only: bool, max_length: int):
        self.tokenizer, self.separator, self.max_prompt_length = tokenizer, separator, max_prompt_length
        self.last_only, self.max_length = last_only, max_length

    def encode(self, path: str, where: str, record: dict) -> tuple[list[Encoded], int]:
        ids, positions, labels = tokenize_steps(parse_steps(path, where, record), self.tokenizer, self.separator,
                                                self.max_prompt_length, self.last_only)
        truncated = len(ids) > self.max_length
        if truncated:
            ids = ids[: self.max_length]
            kept = [k for k, p in enumerate(positions) if p < self.max_length]
            positions, labels = [positions[k] for k in kept], [labels[k] for k in kept]
        if not positions or positions[0] == 0:
            return [], 1
        weights = np.zeros(len(ids), np.float32)
        weights[positions] = 1.0  # collate's target t + 1 is the separator: the head reads it
        tokens = TokenizedExample(np.asarray(ids, np.int64), weights, truncated)
        return [Encoded([tokens], {"labels": labels}, {"steps": len(labels), "correct": sum(labels)})], 0


def labeled_steps(sequences: list[TokenizedExample], extra: dict, index: int) -> LabeledSteps:
    sequences[0].index = index
    return LabeledSteps(sequences[0], np.asarray(extra["labels"], np.int64))


class ProcessRewardTask(ClassifierTask):
    name = "prm"
    peft_task_type = "TOKEN_CLS"
    per_token = True
    num_labels = 2
    progress = {"acc": "accuracy"}

    def __init__(self, recipe, tokenizer):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.cfg = recipe.prm

    # -- data ---------------------------------------------------------------------------------
    def build_dataset(self, which: str, quiet: bool = False):
        last_only = self.cfg.train_on_last_step_only and which == "train"  # held-out data keeps every step's label
        encoder = StepsEncoder(self.tokenizer, self.cfg.step_separator, self.cfg.max_prompt_length, last_only,
                               self.recipe.data.max_length)
        out = load_examples(self.recipe, which, encoder, labeled_steps, quiet)
        if not out and self.recipe.data.sources(which):
            raise UserError(f"data.{which}: no record has a labeled step within data.max_length={self.recipe.data.max_length}")
        if not out:
            return out
        self.track_sources(which, out)
        if not quiet:
            r = out.summary
            print(f"data.{which}: {r['records']} records -> {len(out)} solutions, {r['steps']:.0f} labeled steps "
                  f"({r['correct'] / r['steps']:.0%} correct); truncated {r['truncated']:.0f}, dropped {r['dropped']}", flush=True)
        return out

    def adapter_init_examples(self, examples: Sequence[LabeledSteps]) -> Iterable[TokenizedExample]:
        return (e.tokens for e in examples)

    def collate(self, examples: list[LabeledSteps]) -> StepsBatch:
        batch = self.pack([e.tokens for e in examples], max_length=self.recipe.data.max_length)
        flat = np.concatenate([e.labels for e in examples])
        offsets = np.cumsum([0] + [len(e.labels) for e in examples])[:-1]
        labels = torch.from_numpy(flat)[torch.from_numpy(offsets)[batch.target_example] + batch.target_rank]
        return StepsBatch(batch, labels)

    def module(self, model) -> HeadOutputs:
        return HeadOutputs(model)

    # -- loss -----------------------------------------------------------------------------------
    def normalizer(self, sb: StepsBatch) -> float:
        """The loss is a mean over the labeled steps of the whole optimizer step (TRL: over a batch's labeled tokens)."""
        return float(len(sb.labels))

    def logits(self, module, sb: StepsBatch) -> torch.Tensor:
        b = sb.batch
        return module(b.input_ids, b.position_ids, b.attention_mask, b.target_index + 1, segments=b.segments)

    def loss(self, module, sb: StepsBatch, normalizer: float):
        logits = self.logits(module, sb)
        loss = F.cross_entropy(logits, sb.labels, reduction="sum") / normalizer
        right = float((logits.detach().argmax(-1) == sb.labels).sum())
        return loss, {"accuracy": (right, float(len(sb.labels)))}

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def eval_sums(self, module, sb: StepsBatch) -> dict[str, float]:
        logits = self.logits(module, sb)
        predicted, labels = logits.argmax(-1), sb.labels
        return {"steps": float(len(labels)), "loss": float(F.cross_entropy(logits, labels, reduction="sum")),
                **{f"{p}{y}": float(((predicted == p) & (labels == y)).sum()) for p in (0, 1) for y in (0, 1)}}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Token accuracy and step-level F1 of each class: ``f1_correct`` for steps labeled correct, ``f1_error`` for
        the wrong ones (finding errors is what a PRM is for), and their mean."""
        steps = max(sums["steps"], 1.0)
        f1 = {}
        for cls, name in ((1, "correct"), (0, "error")):
            true_pos, predicted, actual = sums[f"{cls}{cls}"], sums[f"{cls}0"] + sums[f"{cls}1"], sums[f"0{cls}"] + sums[f"1{cls}"]
            f1[name] = 2 * true_pos / (predicted + actual) if predicted + actual else 0.0
        return {"eval/loss": sums["loss"] / steps, "eval/accuracy": (sums["00"] + sums["11"]) / steps,
                "eval/f1_correct": f1["correct"], "eval/f1_error": f1["error"], "eval/f1": (f1["correct"] + f1["error"]) / 2}

    def annotate(self, model) -> None:
        config = model.config
        config.id2label, config.label2id = {0: "error", 1: "correct"}, {"error": 0, "correct": 1}
        config.step_separator = self.cfg.step_separator
