"""Tokenized training data on disk: each file encoded once, in worker processes, then memory-mapped.

A task says how one record becomes examples (an ``Encoder``: picklable, and every setting it reads is a public
attribute) and how a stored row becomes its example object again. Encoded files live in
``cache_root()/examples/KEY`` where KEY hashes the file's bytes, the adapter and record limit, the encoder's
attributes, the tokenizer and posttrain's encoding code: a second run or a resume opens them at once, and a changed
file, setting, tokenizer or posttrain version encodes again. Token ids and weights are Arrow lists read zero-copy
from the memory-mapped file, so a million examples cost disk, not memory. A mixture of files is an index over their
rows, drawn with the same seeded choices as :func:`posttrain.data.load.mixture`, so the training order stays a
function of (seed, step) alone.

Why not ``datasets.map``: its cache key is a hash of the pickled function, which for a tokenizer-holding closure is
often random (no reuse), and its JSON loader infers one schema per file, which mixed record formats break and whose
errors name no line; here the records are read and validated by posttrain's own readers.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from posttrain.core.cache import cache_root, digest_files
from posttrain.data import adapters, formats, load, tokenize
from posttrain.data.adapters import adapt
from posttrain.data.load import mixture, read_records, resolve_path
from posttrain.data.tokenize import TokenizedExample

FORMAT = 1  # bump when the stored layout changes
CHUNK = 1000  # records per unit of work sent to a worker
PARALLEL_BYTES = 32 << 20  # files at least this large are encoded in worker processes (unless data.num_proc says)


@dataclass
class Encoded:
    """One example made from a record: its token sequences, small values its task needs back (JSON), and numbers the
    data summary adds up (names starting with ``max_`` are maxima instead)."""

    sequences: list[TokenizedExample]
    extra: dict | None = None
    tally: dict[str, float] = field(default_factory=dict)


class Encoder:
    """Turns a record into examples. Subclasses implement ``encode`` and list their ``tallies``; attributes whose
    names start with ``_`` are caches, every other attribute is a setting and part of the cache key."""

    tallies: tuple[str, ...] = ()

    def encode(self, path: str, where: str, record: dict) -> tuple[list[Encoded], int]:
        """The record's examples and how many it dropped (too long, nothing to train on); raises DataError."""
        raise NotImplementedError


# -- the cache key ---------------------------------------------------------------------------------------------
def settings_of(value):
    """A JSON-able description of an encoder's settings: tokenizers by their fingerprint, caches left out."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(value, PreTrainedTokenizerBase):
        return tokenizer_fingerprint(value)
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, dict):
        return {str(k): settings_of(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [settings_of(v) for v in value]
    if inspect.isroutine(value) or isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if hasattr(value, "__dict__"):
        return {
            type(value).__qualname__: {
                k: settings_of(v) for k, v in sorted(vars(value).items()) if not k.startswith("_")
            }
        }
    return value if isinstance(value, str | int | float | bool | type(None)) else repr(value)


_TOKENIZER_FINGERPRINTS: dict[int, str] = {}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's output: its vocabulary and pipeline, special tokens and chat template."""
    key = id(tokenizer)
    if key not in _TOKENIZER_FINGERPRINTS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = [type(tokenizer).__name__,
                backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
                tokenizer.special_tokens_map, getattr(tokenizer, "chat_template", None),
                getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]
        _TOKENIZER_FINGERPRINTS[key] = hashlib.sha256(json.dumps(spec, default=str).encode()).hexdigest()
    return _TOKENIZER_FINGERPRINTS[key]


def _code_digest(encoder: Encoder) -> str:
    digest = hashlib.sha256(str(FORMAT).encode())
    for module in (adapters, formats, load, tokenize, inspect.getmodule(encode_file), inspect.getmodule(type(encoder))):
        digest.update(Path(inspect.getsourcefile(module)).read_bytes())
    return digest.hexdigest()


def cache_key(path: str, adapter: str, limit: int | None, encoder: Encoder) -> str:
    file = resolve_path(path)
    files = sorted(f for f in file.rglob("*") if f.is_file()) if file.is_dir() else [file]
    spec = [digest_files(files), adapter, limit, settings_of(encoder), _code_digest(encoder)]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:40]


# -- encoding --------------------------------------------------------------------------------------------------
_WORKER_ENCODER: Encoder | None = None


def _start_worker(encoder: Encoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def encode_chunk(path: str, adapter: str, chunk: list[tuple[str, dict]], encoder: Encoder | None = None):
    """A chunk of records as one Arrow record batch, with (examples, dropped) per record."""
    encoder = encoder or _WORKER_ENCODER
    rows: list[Encoded] = []
    per_record = np.zeros((len(chunk), 2), np.int64)
    for k, (where, record) in enumerate(chunk):
        made, dropped = encoder.encode(path, where, adapt(adapter, record, path, where))
        per_record[k] = len(made), dropped
        rows.extend(made)
    return record_batch(rows, encoder.tallies), per_record


def record_batch(rows: list[Encoded], tallies: tuple[str, ...]) -> pa.RecordBatch:
    sequences = [s for row in rows for s in row.sequences]
    per_row = np.zeros(len(rows) + 1, np.int32)
    per_row[1:] = np.cumsum([len(row.sequences) for row in rows])
    lengths = np.array([len(s.input_ids) for s in sequences], np.int64)
    per_sequence = np.zeros(len(sequences) + 1, np.int64)
    per_sequence[1:] = np.cumsum(lengths)
    ids = np.concatenate([s.input_ids for s in sequences]).astype(np.int32) if sequences else np.zeros(0, np.int32)
    weights = np.concatenate([s.weights for s in sequences]).astype(np.float32) if sequences else np.zeros(0,
                                                                                                           np.float32)
    nested = lambda flat: pa.ListArray.from_arrays(pa.array(per_row),
                                                   pa.LargeListArray.from_arrays(pa.array(per_sequence), flat))
    columns = {
        "input_ids": nested(pa.array(ids)),
        "weights": nested(pa.array(weights)),
        "truncated": pa.array([any(s.truncated for s in row.sequences) for row in rows], pa.bool_()),
        "tokens": pa.array([sum(len(s.input_ids) for s in row.sequences) for row in rows], pa.int64()),
        "targets": pa.array([sum(s.num_targets for s in row.sequences) for row in rows], pa.int64()),
        "extra": pa.array([json.dumps(row.extra) if row.extra is not None else "" for row in rows], pa.large_string()),
        **{f"tally/{name}": pa.array([float(row.tally.get(name, 0.0)) for row in rows],
                                     pa.float64()) for name in tallies},
    }
    return pa.RecordBatch.from_pydict(columns)


def _chunks(path: str, limit: int | None, size: int):
    chunk = []
    for located in read_records(path, limit):
        chunk.append(located)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_file(source, limit: int | None, encoder: Encoder, num_proc: int | None, quiet: bool) -> Path:
    """The cache directory of ``source`` encoded by ``encoder`` (made now if missing)."""
    from tqdm.auto import tqdm

    directory = cache_root() / "examples" / cache_key(source.path, source.adapter, limit, encoder)
    if (directory / "records.npy").exists():
        return directory
    if int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return _wait_for(directory, source.path)
    _remove_abandoned(directory)
    file = resolve_path(source.path)
    workers = num_proc if num_proc is not None else (
        len(os.sched_getaffinity(0)) if file.is_file() and file.stat().st_size >= PARALLEL_BYTES else 1)
    staging = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    staging.mkdir(parents=True, exist_ok=True)
    per_record = []
    bar = tqdm(desc=f"tokenizing {source.path}", unit=" records", disable=quiet, delay=2, mininterval=1)
    try:
        with pa.OSFile(str(staging / "rows.arrow"), "wb") as sink:
            writer = None
            for batch, counts in _encoded_chunks(source, limit, encoder, workers):
                writer = writer or pa.ipc.new_file(sink, batch.schema)
                writer.write_batch(batch)
                per_record.append(counts)
                bar.update(len(counts))
            if writer is None:  # an empty file: the mixture decides whether that is an error
                writer = pa.ipc.new_file(sink, record_batch([], encoder.tallies).schema)
            writer.close()
        np.save(staging / "records.npy", np.concatenate(per_record) if per_record else np.zeros((0, 2), np.int64))
        try:
            os.replace(staging, directory)
        except OSError:  # another process finished the same file first
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _wait_for(directory: Path, path: str) -> Path:
    """The other processes of a machine wait for its first one to encode (polling the file system rather than a
    collective, whose timeout a long first encoding would outlast; a failure there stops the launcher's group)."""
    import time

    waited = 0
    while not (directory / "records.npy").exists():
        time.sleep(0.2)
        waited += 1
        if waited % 300 == 0:
            print(f"waiting for local process 0 to tokenize {path}", flush=True)
    return directory


def _remove_abandoned(directory: Path) -> None:
    """Staging directories of processes that died while encoding (SIGKILL, out of memory) are removed."""
    for staging in directory.parent.glob(f".{directory.name}.*.tmp"):
        pid = int(staging.name.split(".")[-2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _encoded_chunks(source, limit: int | None, encoder: Encoder, workers: int):
    """Encoded chunks in file order; with workers, at most two chunks per worker are in flight (bounded memory)."""
    chunks = _chunks(source.path, limit, CHUNK)
    if workers <= 1:
        for chunk in chunks:
            yield encode_chunk(source.path, source.adapter, chunk, encoder)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(encoder,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(encode_chunk, source.path, source.adapter, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# -- reading ---------------------------------------------------------------------------------------------------
class EncodedFile:
    """One encoded file, memory-mapped: rows are decoded on access."""

    def __init__(self, directory: Path):
        reader = pa.ipc.open_file(pa.memory_map(str(directory / "rows.arrow")))
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])
        self.arrays = [self._arrays(b) for b in self.batches]
        per_record = np.load(directory / "records.npy")
        self.row_count, self.dropped = per_record[:, 0], per_record[:, 1]
        self.first_row = np.concatenate([[0], np.cumsum(self.row_count)[:-1]]).astype(np.int64)

    @staticmethod
    def _arrays(batch: pa.RecordBatch) -> tuple:
        ids, weights = batch.column("input_ids"), batch.column("weights")
        return (ids.offsets.to_numpy(), ids.values.offsets.to_numpy(), ids.values.values.to_numpy(),
                weights.values.values.to_numpy(), batch.column("extra"),
                batch.column("truncated").to_numpy(zero_copy_only=False))

    @property
    def num_records(self) -> int:
        return len(self.row_count)

    def column(self, name: str) -> np.ndarray:
        return (
            np.concatenate([b.column(name).to_numpy(zero_copy_only=False) for b in self.batches])
            if self.batches
            else np.zeros(0)
        )

    def row(self, row: int) -> tuple[list[TokenizedExample], dict | None]:
        b = int(np.searchsorted(self.starts, row, side="right")) - 1
        per_row, per_sequence, ids, weights, extra, truncated = self.arrays[b]
        j = row - self.starts[b]
        sequences = [TokenizedExample(ids[per_sequence[k] : per_sequence[k + 1]].astype(np.int64),
                                      weights[per_sequence[k] : per_sequence[k + 1]].copy(), bool(truncated[j]))
                     for k in range(per_row[j], per_row[j + 1])]
        text = extra[j].as_py()
        return sequences, json.loads(text) if text else None


class Examples(Sequence):
    """A split's examples in training order, rows of encoded files decoded on access by ``make(sequences, extra,
    index)``. Items may be replaced in memory (S3FT swaps in self-generated answers)."""

    def __init__(self, files: list[EncodedFile], paths: list[str], file_of: np.ndarray, rows: np.ndarray,
                 make: Callable, summary: dict[str, float]):
        self.files, self.paths, self.file_of, self.rows, self.make = files, paths, file_of, rows, make
        self.summary = summary
        self.replaced: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if i < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i in self.replaced:
            return self.replaced[i]
        sequences, extra = self.files[self.file_of[i]].row(int(self.rows[i]))
        return self.make(sequences, extra, i)

    def __setitem__(self, i: int, example) -> None:
        self.replaced[i] = example

    def extra(self, i: int) -> dict | None:
        """The values the encoder kept beside example ``i``'s tokens."""
        return self.files[self.file_of[i]].row(int(self.rows[i]))[1]

    def source(self, i: int) -> str:
        """The file example ``i`` came from."""
        return self.paths[self.file_of[i]]


def load_examples(data, seed: int, which: str, encoder: Encoder, make: Callable,
                  quiet: bool = False) -> Examples | list:
    """The examples of ``data.train`` or ``data.eval`` (``[]`` when the recipe has none; ``data`` is its
    ``DataConfig``, ``seed`` orders the mixture), encoded or read from the cache. ``summary`` counts records,
    examples, dropped and truncated ones, tokens, target tokens and the encoder's tallies over the mixture."""
    sources = data.sources(which)
    if not sources:
        return []
    limit = data.limit if which == "train" else data.eval_limit
    files = []
    for source in sources:
        read_limit = source.limit
        if len(sources) == 1 and source.weight == 1 and limit:  # the mixture would take only the first `limit`
            read_limit = min(limit, source.limit or limit)
        files.append(EncodedFile(encode_file(source, read_limit, encoder, data.num_proc, quiet)))
    parts = mixture(sources, [f.num_records for f in files], seed, limit, None if quiet else f"data.{which}")
    file_of, rows = [], []
    for k, (file, records) in enumerate(zip(files, parts)):
        counts, firsts = file.row_count[records], file.first_row[records]
        starts = np.cumsum(counts) - counts
        rows.append(np.repeat(firsts - starts, counts) + np.arange(counts.sum()))
        file_of.append(np.full(int(counts.sum()), k, np.int32))
    file_of, rows = np.concatenate(file_of), np.concatenate(rows)
    summary = {"records": int(sum(len(p) for p in parts)), "examples": len(rows),
               "dropped": int(sum(f.dropped[p].sum() for f, p in zip(files, parts)))}
    for name in ("truncated", "tokens", "targets", *(f"tally/{t}" for t in encoder.tallies)):
        values = [f.column(name)[rows[file_of == k]] for k, f in enumerate(files)]
        reduce = np.max if name.startswith("tally/max_") else np.sum
        summary[name.removeprefix("tally/")] = float(reduce(np.concatenate(values))) if len(rows) else 0.0
    return Examples(files, [s.path for s in sources], file_of, rows, make, summary)
