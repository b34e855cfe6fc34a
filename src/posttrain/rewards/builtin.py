"""Rewards that need no sandbox: verifiable math answers, formats, length, self-consistency."""

from __future__ import annotations

import re
from collections import Counter

from posttrain.rewards.answers import extract_answer, is_correct, reference_answer


def math_answer(prompts, completions, answer, **_) -> list[float | None]:
    """1 if the completion's final number (``#### N``, ``\\boxed{...}``, "answer is N", after the last ``=``, or
    the last number) equals the record's ``answer`` exactly (as fractions), else 0; None where no answer is given.
    An ``answer`` that is not a number but marks one (a raw GSM8K solution ending in ``#### 72``, a ``\\boxed{}``)
    is read the same way as the completion; one that does not is None too (counted as failed, never a silent 0)."""
    golds = [None if gold is None else reference_answer(gold) for gold in answer]
    return [None if gold is None else float(is_correct(text, gold)) for text, gold in zip(completions, golds)]


def format_reward(prompts, completions, pattern: str = r"(?s).*#### *-?[\d,.]+\s*$", **_) -> list[float]:
    """1 if the completion matches ``pattern`` (a Python regex, ``re.fullmatch``), else 0; the default asks for a
    final ``#### N`` line, GSM8K's answer format."""
    compiled = re.compile(pattern)
    return [float(compiled.fullmatch(text) is not None) for text in completions]


def length(prompts, completions, per: int = 1000, **_) -> list[float]:
    """Characters / ``per``: give it a negative weight to prefer shorter answers (or a positive one, longer)."""
    return [len(text) / per for text in completions]


def majority_vote(prompts, completions, group, **_) -> list[float]:
    """Label-free self-consistency (TTRL, Zuo et al., 2025): 1 if the completion's final answer is the most common
    answer among its prompt's completions (ties: the answer first reached), else 0; no answer scores 0."""
    answers = [extract_answer(text) for text in completions]
    votes: dict[int, Counter] = {}
    for g, a in zip(group, answers):
        if a is not None:
            votes.setdefault(g, Counter())[a] += 1
    majority = {g: counter.most_common(1)[0][0] for g, counter in votes.items()}
    return [float(a is not None and majority.get(g) == a) for g, a in zip(group, answers)]
