"""``posttrain data inspect FILE``: what a data file holds, before a run spends hours on it.

Records are read the way training reads them (known layouts such as GSM8K and HH-RLHF adapted, then validated by
the format's parser) and tokenized with the model's tokenizer and chat template, exactly as a training command
would: per-field token lengths, how many examples a ``max_length`` would truncate, exact duplicates (whole records
and prompts), and every malformed record with its line and field, without stopping at the first.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np

from posttrain.core.errors import DataError
from posttrain.data.adapters import adapt
from posttrain.data.config import DataConfig
from posttrain.data.formats import parse_preference, parse_ranked, parse_sft, parse_unpaired
from posttrain.data.load import jsonl_entries, read_records, resolve_path
from posttrain.data.tokenize import ExampleTokenizer

FORMATS = ("sft", "preference", "unpaired", "ranked")


def detect_format(record: dict) -> str:
    """The format a record is in (after layout adapters): preference pairs, ranked responses, labelled
    completions, else SFT."""
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "responses" in record:
        return "ranked"
    if "label" in record:
        return "unpaired"
    return "sft"


def tolerant_records(path: str, limit: int | None):
    """(where, record or None, error or None) for every line of a JSON-lines file, past broken lines; other
    formats through the normal reader."""
    file = resolve_path(path)
    if file.suffix.lower() != ".jsonl":
        for where, record in read_records(path, limit):
            yield where, record, None
        return
    for count, (where, value) in enumerate(jsonl_entries(file, path)):
        if limit is not None and count >= limit:
            return
        if isinstance(value, DataError):
            yield where, None, value.detail
        else:
            yield (where, value, None) if isinstance(value, dict) else (where, None, "a record must be a JSON object")


def examples_of(fmt: str, path: str, where: str, record: dict) -> dict[str, list]:
    """The parsed examples of a record, by the field their completion tokens are counted under."""
    if fmt == "sft":
        return {"completion": [parse_sft(path, where, record)]}
    if fmt == "preference":
        pair = parse_preference(path, where, record)
        return {"chosen": [pair.chosen], "rejected": [pair.rejected]}
    if fmt == "unpaired":
        return {"completion": [example for example, _ in parse_unpaired(path, where, record)]}
    return {"responses": parse_ranked(path, where, record).responses}


def length_summary(values: list[int], bins: int = 10) -> dict:
    array = np.asarray(values, dtype=np.int64)
    if len(array) == 0:
        return {"n": 0}
    counts, edges = np.histogram(array, bins=bins)
    return {"n": int(len(array)), "mean": float(array.mean()), "min": int(array.min()),
            "p50": float(np.percentile(array, 50)), "p90": float(np.percentile(array, 90)),
            "p99": float(np.percentile(array, 99)), "max": int(array.max()),
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}}


def inspect_file(path: str, tokenizer, max_length: int = 1024, fmt: str = "auto", limit: int | None = None,
                 chat_template: str | None = None) -> dict:
    """Counts, token lengths per field, truncation at ``max_length``, duplicates and format errors of ``path``."""
    tokenize = ExampleTokenizer(tokenizer, DataConfig(train=path, max_length=10**9, chat_template=chat_template))
    lengths: dict[str, list[int]] = {"prompt": [], "total": []}
    errors, formats, records, truncated, prompt_too_long = [], Counter(), 0, 0, 0
    record_hashes, prompt_hashes = Counter(), Counter()
    for where, record, error in tolerant_records(path, limit):
        records += 1
        if error is not None:
            errors.append({"where": where, "field": None, "message": error})
            continue
        record_hashes[hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()] += 1
        try:
            adapted = adapt("auto", record, path, where)
            kind = detect_format(adapted) if fmt == "auto" else fmt
            by_field = examples_of(kind, path, where, adapted)
        except DataError as exc:
            errors.append({"where": where, "field": exc.field, "message": str(exc)})
            continue
        formats[kind] += 1
        if "prompt" in adapted:
            prompt_hashes[hashlib.sha256(json.dumps(adapted["prompt"], sort_keys=True).encode()).hexdigest()] += 1
        longest, prompt = 0, None
        for name, examples in by_field.items():
            for example in examples:
                tokens = tokenize(example)
                if tokens is None:
                    continue
                targets = int((tokens.weights > 0).sum())
                lengths.setdefault(name, []).append(targets)
                longest = max(longest, len(tokens.input_ids))
                prompt = len(tokens.input_ids) - targets if prompt is None else prompt
        if prompt is not None:
            lengths["prompt"].append(prompt)
            lengths["total"].append(longest)
            truncated += longest > max_length
            prompt_too_long += prompt >= max_length
    return {
        "file": path, "records": records, "valid": records - len(errors), "formats": dict(formats),
        "errors": errors, "max_length": max_length, "truncated": truncated, "prompt_too_long": prompt_too_long,
        "lengths": {name: length_summary(values) for name, values in lengths.items() if values},
        "duplicate_records": sum(c - 1 for c in record_hashes.values() if c > 1),
        "duplicate_prompts": sum(c - 1 for c in prompt_hashes.values() if c > 1),
    }


def format_inspection(report: dict, shown_errors: int = 10) -> str:
    lines = [f"{report['file']}: {report['records']} records, {report['valid']} valid "
             f"({', '.join(f'{n} {k}' for k, n in report['formats'].items()) or 'none'})"]
    lines.append("tokens per example (chat template applied; total: the longest side of a pair or ranking):")
    for name, s in report["lengths"].items():
        lines.append(f"  {name:10s} mean {s['mean']:7.1f}  min {s['min']:5d}  p50 {s['p50']:7.0f}  p90 "
                     f"{s['p90']:7.0f}  "
                     f"p99 {s['p99']:7.0f}  max {s['max']:6d}")
    total = report["lengths"].get("total")
    if total:
        lines.append("  total tokens histogram:")
        counts, edges = total["histogram"]["counts"], total["histogram"]["edges"]
        width = max(counts) or 1
        for count, low, high in zip(counts, edges, edges[1:]):
            lines.append(f"    {low:7.0f} - {high:7.0f} | {'#' * round(40 * count / width):40s} {count}")
    valid = max(report["valid"], 1)
    lines.append(f"longer than max_length={report['max_length']}: {report['truncated']} "
                 f"({report['truncated'] / valid:.1%} of valid records); of these, {report['prompt_too_long']} have a "
                 "prompt that alone fills max_length (right truncation leaves them nothing to train on: dropped)")
    lines.append(f"exact duplicates: {report['duplicate_records']} records, {report['duplicate_prompts']} repeated "
                 f"prompts")
    lines.append(f"format errors: {len(report['errors'])}")
    for error in report["errors"][:shown_errors]:
        lines.append(f"  {error['where']}: {error['message']}")
    if len(report["errors"]) > shown_errors:
        lines.append(f"  ... and {len(report['errors']) - shown_errors} more (--out writes them all)")
    return "\n".join(lines)
