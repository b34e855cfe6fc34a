"""Encoders: how the records of one data kind become tokenized examples, and their micro-batches (SFT, pairs,
unpaired, ranked, rated, PRM steps).

An encoder is a picklable function of (file, place, record) used by the data store (``data/store.py``), which caches
what it returns; the dataclasses beside it are what the examples and micro-batches of that kind hold. Training
commands, evaluation and the data tools share them, so a held-out score is computed on the examples training sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from posttrain.core.errors import DataError
from posttrain.data.batching import Batch, Layout
from posttrain.data.formats import StepsExample, parse_preference, parse_sft, parse_steps
from posttrain.data.store import Encoded, Encoder
from posttrain.data.tokenize import ExampleTokenizer, TokenizedExample
from posttrain.data.formats import parse_ranked, parse_rated, parse_unpaired


class SFTEncoder(Encoder):
    """A record -> one tokenized example (with the record itself, for S3FT's answers)."""

    def __init__(self, tokenize: ExampleTokenizer, keep_record: bool):
        self.tokenize, self.keep_record = tokenize, keep_record

    def encode(self, path: str, where: str, record: dict) -> tuple[list[Encoded], int]:
        tokenized = self.tokenize(parse_sft(path, where, record))
        if tokenized is None:
            return [], 1
        return [Encoded([tokenized], {"path": path, "where": where, "record": record} if self.keep_record else None)], 0



def sft_example(sequences: list[TokenizedExample], extra: dict | None, index: int) -> TokenizedExample:
    example = sequences[0]
    example.index = index
    return example



@dataclass
class PairExample:
    chosen: TokenizedExample
    rejected: TokenizedExample
    index: int
    split: str
    gold: TokenizedExample | None = None  # TPO

    def token_ids(self):
        return tuple(s.input_ids for s in (self.chosen, self.rejected, self.gold) if s is not None)



@dataclass
class PairBatch:
    batch: Batch  # chosen completions first, then rejected (then gold, for TPO): 2B or 3B sequences
    pair_index: torch.Tensor  # [B] positions of the pairs in their dataset
    split: str

    @property
    def num_pairs(self) -> int:
        return len(self.pair_index)

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def to(self, device) -> "PairBatch":
        return PairBatch(self.batch.to(device), self.pair_index, self.split)



class PairEncoder(Encoder):
    """A preference record -> chosen and rejected sequences (and the gold answer, for TPO)."""

    def __init__(self, tokenize: ExampleTokenizer, needs_gold: bool, names: list[str]):
        self.tokenize, self.needs_gold, self.names = tokenize, needs_gold, names

    def encode(self, path: str, where: str, record: dict) -> tuple[list[Encoded], int]:
        example = parse_preference(path, where, record)
        if self.needs_gold and example.gold is None:
            raise DataError(path, where, "gold",
                            f"missing: loss {self.names} trains on a gold answer (TRL's 'reference')")
        sides = [self.tokenize(side) for side in (example.chosen,
                                                  example.rejected) + ((example.gold,) if self.needs_gold else ())]
        return ([], 1) if None in sides else ([Encoded(sides)], 0)



def collate_pairs(pairs: list[PairExample], layout: Layout, max_length: int) -> PairBatch:
    """Chosen completions, then rejected ones (then gold answers, when encoded): a pair's sequences share its prompt."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if pairs[0].gold is not None:
        sequences += [p.gold for p in pairs]
    n = len(pairs)
    shared = [list(range(i, len(sequences), n)) for i in range(n)]
    return PairBatch(layout.collate(sequences, shared, max_length), torch.tensor([p.index for p in pairs]),
                     pairs[0].split)


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



@dataclass
class LabeledSteps:
    tokens: TokenizedExample  # weight 1 at each labeled separator: collate's target t + 1 is where the head reads
    labels: np.ndarray  # [labeled steps] 0 / 1



def labeled_steps(sequences: list[TokenizedExample], extra: dict, index: int) -> LabeledSteps:
    sequences[0].index = index
    return LabeledSteps(sequences[0], np.asarray(extra["labels"], np.int64))



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
class LabelledExample:
    example: TokenizedExample
    label: bool
    index: int
    split: str

    def token_ids(self):
        return (self.example.input_ids,)

    @property
    def prompt_length(self) -> int:
        return int(np.argmax(self.example.weights > 0))


@dataclass
class UnpairedBatch:
    batch: Batch
    mismatched: Batch | None  # prompt i + completion i+1, for KTO's KL estimate
    labels: torch.Tensor
    index: torch.Tensor
    split: str

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def to(self, device) -> "UnpairedBatch":
        moved = self.mismatched.to(device) if self.mismatched is not None else None
        return UnpairedBatch(self.batch.to(device), moved, self.labels.to(device), self.index, self.split)


class UnpairedEncoder(Encoder):
    """An unpaired record (or a pair, split in two) -> labelled examples."""

    tallies = ("desirable",)

    def __init__(self, tokenize: ExampleTokenizer):
        self.tokenize = tokenize

    def encode(self, path: str, where: str, record: dict) -> tuple[list[Encoded], int]:
        made, dropped = [], 0
        for example, label in parse_unpaired(path, where, record):
            tokenized = self.tokenize(example)
            if tokenized is None:
                dropped += 1
            else:
                made.append(Encoded([tokenized], {"label": bool(label)}, {"desirable": float(label)}))
        return made, dropped


@dataclass
class RankedItem:
    responses: list[TokenizedExample]
    scores: list[float]
    index: int
    split: str

    def token_ids(self):
        return tuple(r.input_ids for r in self.responses)


@dataclass
class RankedBatch:
    batch: Batch  # every response of every prompt, prompt by prompt
    slots: torch.Tensor  # [N] flat position in the [B, K] grid of each sequence
    scores: torch.Tensor  # [B, K]
    mask: torch.Tensor  # [B, K]
    index: torch.Tensor
    split: str

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def to(self, device) -> "RankedBatch":
        return RankedBatch(self.batch.to(device), self.slots.to(device), self.scores.to(device), self.mask.to(device),
                           self.index, self.split)

    def grid(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence values [N] laid out as [B, K] (zeros where a prompt has fewer responses)."""
        out = torch.zeros(self.mask.numel(), dtype=values.dtype, device=values.device)
        return out.index_copy(0, self.slots, values).view_as(self.mask)


class RankedEncoder(Encoder):
    """A ranked record -> one sequence per response, with their scores."""

    tallies = ("max_width",)

    def __init__(self, tokenize: ExampleTokenizer):
        self.tokenize = tokenize

    def encode(self, path: str, where: str, record: dict) -> tuple[list[Encoded], int]:
        ranked = parse_ranked(path, where, record)
        responses = [self.tokenize(response) for response in ranked.responses]
        if None in responses:
            return [], 1
        return [Encoded(responses, {"scores": list(ranked.scores)}, {"max_width": len(responses)})], 0


@dataclass
class RewardExample:
    sequences: list[TokenizedExample]  # chosen, rejected (a pair) or one rated completion
    ratings: np.ndarray  # [len(sequences), K]; NaN where an attribute is unrated
    margin: float
    index: int

    @property
    def is_pair(self) -> bool:
        return len(self.sequences) == 2


@dataclass
class RewardBatch:
    batch: Batch  # every record's sequences, record by record
    last_index: torch.Tensor  # [S] flat position of each sequence's last token
    pairs: torch.Tensor  # [P, 2] sequence positions of (chosen, rejected)
    pair_record: torch.Tensor  # [P] the record each pair belongs to
    margins: torch.Tensor  # [P]
    ratings: torch.Tensor  # [S, K]
    sequence_record: torch.Tensor  # [S]
    num_records: int

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def to(self, device) -> "RewardBatch":
        moved = {k: (v.to(device) if isinstance(v, (torch.Tensor, Batch)) else v) for k, v in vars(self).items()}
        return RewardBatch(**moved)


def last_token_only(example: TokenizedExample) -> TokenizedExample:
    """The same tokens with a single target: the last one, where the score is read (``target_index + 1``)."""
    weights = np.zeros_like(example.weights)
    weights[-1] = 1.0
    return TokenizedExample(example.input_ids, weights, example.truncated, example.index)


class RatedEncoder(Encoder):
    """A pair or a rated completion -> its sequences (scored at the last token) with ratings and margin."""

    tallies = ("pairs", "rated")

    def __init__(self, tokenize: ExampleTokenizer, objectives: list[str]):
        self.tokenize, self.objectives = tokenize, objectives

    def encode(self, path: str, where: str, record: dict) -> tuple[list[Encoded], int]:
        rated = parse_rated(path, where, record, self.objectives)
        sequences = [self.tokenize(c) for c in rated.completions]
        if None in sequences:
            return [], 1
        ratings = [[r.get(name) for name in self.objectives] or [None] for r in rated.ratings]
        tally = {"pairs": float(len(sequences) == 2),
                 "rated": float(any(v is not None and math.isfinite(v) for row in ratings for v in row))}
        return [Encoded([last_token_only(s) for s in sequences], {"ratings": ratings, "margin": rated.margin},
                        tally)], 0
