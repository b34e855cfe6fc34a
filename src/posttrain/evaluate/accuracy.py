"""Answer accuracy: greedy completions for {prompt, answer} records, scored by :mod:`answers`."""

from __future__ import annotations

import math

from posttrain.data.load import load_sources
from posttrain.errors import DataError
from posttrain.evaluate.answers import is_correct
from posttrain.rollout.generate import generate


def load_answer_records(path: str, limit: int | None = None) -> list[dict]:
    """Records with ``prompt`` (text or messages) and ``answer``; GSM8K layout is adapted automatically."""
    from posttrain.config import DataSource

    records = []
    for file, where, record in load_sources([DataSource(path=path, limit=limit)]):
        for field in ("prompt", "answer"):
            if field not in record:
                raise DataError(file, where, field, "missing (answer accuracy needs a prompt and a reference answer)")
        records.append(record)
    return records


def answer_accuracy(model, tokenizer, records: list[dict], max_new_tokens: int = 256, batch_size: int = 16) -> dict:
    completions = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens,
                           batch_size=batch_size, progress=True)
    correct = [is_correct(c, r["answer"]) for c, r in zip(completions, records)]
    return {"accuracy": sum(correct) / len(records), "correct": sum(correct), "total": len(records),
            "completions": completions, "is_correct": correct}


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (Wilson, 1927): well behaved at 0 / n and n / n, unlike the
    normal approximation."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exactly 0 (1) where rounding would leave a crumb
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high
