"""Read records from jsonl / json / parquet / csv files and saved HF datasets.

Every record comes with its location (``line 12`` or ``row 12``) so that validation errors
can name the file, the line and the field.
"""

from __future__ import annotations

import codecs
import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from posttrain.core.errors import DataError, UserError
from posttrain.data.adapters import adapt

Located = tuple[str, dict]  # ("line 12", record)


def resolve_path(path: str) -> Path:
    """``pkg:assets/x.jsonl`` names a file shipped inside posttrain; anything else is a normal path."""
    if path.startswith("pkg:"):
        import importlib.resources

        return Path(str(importlib.resources.files("posttrain") / path[4:]))
    return Path(path).expanduser()


def read_records(path: str, limit: int | None = None) -> Iterator[Located]:
    file = resolve_path(path)
    if not file.exists():
        raise UserError(f"{path}: no such file or directory")
    reader = _READERS.get(file.suffix.lower()) if file.is_file() else _read_saved_dataset
    if reader is None:
        raise UserError(f"{path}: unsupported data format {file.suffix!r} (use .jsonl, .json, .parquet, .csv or a "
                        f"saved dataset)")
    for count, (where, record) in enumerate(reader(file, path)):
        if limit is not None and count >= limit:
            return
        if not isinstance(record, dict):
            raise DataError(path, where, None, f"a record must be a JSON object, got {type(record).__name__}")
        yield where, record


def _read_jsonl(file: Path, name: str) -> Iterator[Located]:
    for where, value in jsonl_entries(file, name):
        if isinstance(value, DataError):
            raise value
        yield where, value


def jsonl_entries(file: Path, name: str) -> Iterator[tuple[str, object]]:
    """(location, the line's JSON value or its DataError) for every non-empty line, so that a caller may go on past
    a broken line. UTF-8 with or without a byte-order mark, CRLF endings, UTF-16 with its byte-order mark; a file
    holding a JSON array is read as a .json file would be."""
    with open(file, "rb") as handle:
        head = handle.read(64)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            lines = file.read_bytes().decode("utf-16").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(name, None, None, f"not valid UTF-16 (byte offset {exc.start})") from None
        texts = ((f"line {n}", line) for n, line in enumerate(lines, start=1))
    elif head.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"[":
        yield from _read_json(file, name)
        return
    else:
        texts = _utf8_lines(file, name)
    for where, text in texts:
        if isinstance(text, DataError):
            yield where, text
        elif text.strip():
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as exc:
                yield where, DataError(name, where, None, f"invalid JSON: {exc.msg} at column {exc.colno}")


def _utf8_lines(file: Path, name: str) -> Iterator[tuple[str, str | DataError]]:
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"line {number}"
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if b"\x00" in raw:
                yield where, DataError(name, where, None, f"a NUL byte at column {raw.index(0) + 1}: binary data, or "
                                       "text in another encoding (UTF-16 without a byte-order mark?)")
                continue
            try:
                yield where, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, DataError(name, where, None, f"not valid UTF-8 (byte {raw[exc.start]:#04x} at column "
                                       f"{exc.start + 1})")


def _read_json(file: Path, name: str) -> Iterator[Located]:
    try:
        data = json.loads(file.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(name, None, None, f"not valid UTF-8 (byte offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(name, f"line {exc.lineno}", None, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(name, None, None, "a .json data file must hold a list of records (or {\"data\": [...]})")
    for number, record in enumerate(data, start=1):
        yield f"record {number}", record


def _read_parquet(file: Path, name: str) -> Iterator[Located]:
    import pyarrow.parquet as pq

    table = pq.read_table(file)
    for number, record in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", record


def _read_csv(file: Path, name: str) -> Iterator[Located]:
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            for record in reader:
                yield f"line {reader.line_num}", {k: _maybe_json(v) for k, v in record.items()}
    except UnicodeDecodeError as exc:
        raise DataError(name, None, None, f"not valid UTF-8 (byte offset {exc.start})") from None


def _maybe_json(value: str):
    """CSV cells holding JSON lists or objects (e.g. a messages column) are decoded."""
    stripped = value.strip() if isinstance(value, str) else value
    if isinstance(stripped, str) and stripped[:1] in "[{":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return value
    return value


def _read_saved_dataset(file: Path, name: str) -> Iterator[Located]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(file))
    except FileNotFoundError:
        raise UserError(f"{name}: a directory must be a dataset saved with save_to_disk") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise UserError(f"{name}: saved DatasetDict has splits {list(dataset)}; point at one split's directory")
        dataset = dataset["train"]
    for number, record in enumerate(dataset, start=1):
        yield f"row {number}", record


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}


def load_sources(sources, seed: int = 0, limit: int | None = None,
                 label: str | None = None) -> list[tuple[str, str, dict]]:
    """All records of a data mixture as ``(path, location, record)``, adapters applied (see :func:`mixture`)."""
    records = [[(source.path, where, adapt(source.adapter, record, source.path, where))
                for where, record in read_records(source.path, source.limit)] for source in sources]
    parts = mixture(sources, [len(r) for r in records], seed, limit, label or "data")
    return [records[k][i] for k, part in enumerate(parts) for i in part.tolist()]


def mixture(sources, sizes: list[int], seed: int, limit: int | None, label: str | None = None) -> list[np.ndarray]:
    """Which records of each source a data mixture uses, in order: a source's ``weight`` repeats it (2.0) or keeps a
    seeded random fraction of it (0.5). A ``limit`` over several sources keeps their proportions (each source's first
    records, sized by largest remainder), instead of cutting the later sources off. With several sources the
    realised mixture is printed (under ``label``)."""
    rng = random.Random(seed)
    parts = []
    for source, size in zip(sources, sizes):
        whole, fraction = divmod(source.weight, 1.0)
        part = np.tile(np.arange(size, dtype=np.int64), int(whole))
        if fraction:
            part = np.concatenate([part, np.asarray(rng.sample(range(size), round(fraction * size)), np.int64)])
        parts.append(part)
    total = sum(len(p) for p in parts)
    if not total:
        raise UserError(f"no records in {', '.join(s.path for s in sources)}")
    if limit and limit < total:
        parts = [part[:k] for part, k in zip(parts, _proportional(limit, [len(p) for p in parts]))]
        total = limit
    if len(sources) > 1 and label is not None:
        shares = "; ".join(f"{s.path} x{s.weight:g} -> {len(p)} ({len(p) / total:.1%})" for s, p in zip(sources, parts))
        print(f"{label} mixture: {shares}", flush=True)
    return parts


def _proportional(limit: int, sizes: list[int]) -> list[int]:
    """``limit`` split in proportion to ``sizes`` (largest remainder, ties to the earlier source)."""
    total = sum(sizes)
    exact = [limit * size / total for size in sizes]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: limit - sum(counts)]:
        counts[i] += 1
    return counts
