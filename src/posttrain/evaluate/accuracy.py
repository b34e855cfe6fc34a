"""Answer accuracy: greedy completions for {prompt, answer} records, scored by :mod:`answers`."""

from __future__ import annotations

from posttrain.core.errors import DataError
from posttrain.data.config import DataSource
from posttrain.data.load import load_sources
from posttrain.rewards.answers import is_correct
from posttrain.rollout.generate import generate


def load_answer_records(path: str, limit: int | None = None) -> list[dict]:
    """Records with ``prompt`` (text or messages) and ``answer``; GSM8K layout is adapted automatically."""
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
