"""Encoders: how the records of one data kind become tokenized examples, and their micro-batches.

An encoder is a picklable function of (file, place, record) used by the data store (``data/store.py``), which caches
what it returns; the dataclasses beside it are what the examples and micro-batches of that kind hold. Training
commands, evaluation and the data tools share them, so a held-out score is computed on the examples training sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from posttrain.core.errors import DataError
from posttrain.data.batching import Batch, Layout
from posttrain.data.formats import StepsExample, parse_preference, parse_sft, parse_steps
from posttrain.data.store import Encoded, Encoder
from posttrain.data.tokenize import ExampleTokenizer, TokenizedExample


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
