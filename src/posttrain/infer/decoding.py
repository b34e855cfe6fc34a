"""Inference-time alignment: change what a model says without changing its weights.

- ``best_of_n``: sample N answers, keep the one a reward model (or reward function) scores highest.
- ``majority_vote``: self-consistency (Wang et al., 2023): the most common final answer among N samples, each vote
  optionally weighted by a reward (weighted majority voting).
- ``urial_prompt``: URIAL (Lin et al., 2024, "The Unlocking Spell on Base LLMs"): a base model aligned in context by
  a fixed system text and three stylistic examples (shipped in ``assets/urial.txt``; pass your own).
- ``nudge``: Nudging (Fei et al., 2024, "Nudging: Inference-time Alignment via Model Collaboration"): the base model
  writes, and wherever its top-1 next-token probability falls below a threshold a small aligned model writes the
  next word instead; the fraction of nudged tokens is reported.
- ``reward_guided``: reward-guided chunk decoding, a simple controlled decoding (cf. Mudgal et al., 2024): sample K
  continuations of M tokens, keep the one the reward model scores best, continue from it.

Everything works on text, so the models involved may have different tokenizers.
"""

from __future__ import annotations

import importlib.resources
import re
from collections import Counter
from fractions import Fraction
from typing import Callable

import torch

from posttrain.core.errors import UserError
from posttrain.model.load import looks_like_path
from posttrain.rewards import resolve_reward
from posttrain.rewards.answers import extract_answer
from posttrain.rewards.model import load_scorer
from posttrain.rollout.generate import generate, render_prompt

Scorer = Callable[..., list[float]]  # (prompts, completions, columns=None) -> one score per completion


# -- best-of-N and voting --------------------------------------------------------------------------------------
def sample_n(model, tokenizer, prompts: list, n: int, max_new_tokens: int = 256, temperature: float = 0.8,
             top_p: float = 1.0, batch_size: int = 16, chat: bool = True, progress: bool = False) -> list[list[str]]:
    """``n`` sampled completions per prompt."""
    flat = generate(model, tokenizer, [p for p in prompts for _ in range(n)], max_new_tokens, temperature, top_p,
                    batch_size, chat, progress)
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def best_of_n(candidates: list[list[str]], scores: list[list[float]],
              n: int | None = None) -> list[tuple[int, str, float]]:
    """Per prompt, (index, completion, score) of the best of its first ``n`` candidates (all when ``n`` is None);
    the first wins a tie. Taking the first n of one larger sample gives the whole best-of-N curve from one run."""
    out = []
    for texts, values in zip(candidates, scores):
        k = len(texts) if n is None else n
        best = max(range(k), key=lambda i: (values[i], -i))
        out.append((best, texts[best], values[best]))
    return out


def majority_vote(completions: list[str], weights: list[float] | None = None) -> tuple[Fraction | None, int | None]:
    """(the winning final answer, the index of the first completion that gives it): each completion with an answer
    votes ``weights[i]`` (1 without weights); ties go to the answer reached first; (None, None) if none answers."""
    answers = [extract_answer(text) for text in completions]
    votes: Counter = Counter()
    first: dict[Fraction, int] = {}
    for i, answer in enumerate(answers):
        if answer is not None:
            votes[answer] += 1.0 if weights is None else float(weights[i])
            first.setdefault(answer, i)
    if not votes:
        return None, None
    top = max(votes.values())
    winner = min((a for a, v in votes.items() if v == top), key=lambda a: first[a])
    return winner, first[winner]


def vote_weights(scores: list[float]) -> list[float]:
    """Votes from rewards: scores already in [0, 1] (a PRM's or a verifier's) as they are, others (a reward model's
    logits) through a sigmoid, so that every vote counts positively; unscored (-inf) votes count 0."""
    if all(0.0 <= s <= 1.0 for s in scores):
        return list(scores)
    return [float(torch.sigmoid(torch.tensor(s, dtype=torch.float64))) for s in scores]


def load_reward(spec: str, device="cpu", batch_size: int = 16, **options) -> Scorer:
    """A reward as ``score(prompts, completions, columns=None) -> scores``: a reward model or process reward model
    (a directory or run), or a registered reward function / ``module:function`` (``options`` are its keyword
    arguments; ``columns`` the records' fields, one value per completion, e.g. ``answer`` for math_answer).
    A function's None (could not score) ranks below every score."""
    from pathlib import Path

    if Path(spec).expanduser().exists() or looks_like_path(spec):
        model = load_scorer(spec, device, batch_size=batch_size, **options)
        return lambda prompts, completions, columns=None: model(prompts, completions)
    try:
        function = resolve_reward(spec)
    except ValueError as exc:
        raise UserError(f"--reward: {exc}; or a reward model directory") from None

    def score(prompts: list, completions: list[str], columns: dict | None = None) -> list[float]:
        values = function(prompts, completions, **(columns or {}), **options)
        return [float("-inf") if v is None or v != v else float(v) for v in values]

    return score


# -- URIAL ---------------------------------------------------------------------------------------------------
URIAL_QUERY, URIAL_ANSWER, URIAL_FENCE = "# Query:", "# Answer:", "```"


def urial_examples() -> str:
    """The shipped URIAL preamble: a system text and three stylistic examples (``posttrain/assets/urial.txt``)."""
    return (importlib.resources.files("posttrain") / "assets" / "urial.txt").read_text()


def urial_prompt(query: str, preamble: str | None = None) -> str:
    """The raw-text prompt that aligns a base model in context: preamble, then the query in the same layout as the
    examples, ending where the answer starts (cut the completion with ``urial_answer``)."""
    preamble = urial_examples() if preamble is None else preamble
    return (f"{preamble.rstrip()}\n\n{URIAL_QUERY}\n{URIAL_FENCE}\n{query}\n{URIAL_FENCE}\n\n"
            f"{URIAL_ANSWER}\n{URIAL_FENCE}\n")


def urial_answer(completion: str) -> str:
    """The answer inside its fence: a base model goes on to invent the next query, which is cut off."""
    for stop in (URIAL_FENCE, URIAL_QUERY):
        completion = completion.split(stop, 1)[0]
    return completion.strip()


# -- nudging -------------------------------------------------------------------------------------------------
_WORD = re.compile(r"\s*\S+")


@torch.no_grad()
def nudge(base, base_tokenizer, nudger, nudger_tokenizer, prompt, threshold: float = 0.4, max_new_tokens: int = 256,
          base_chat: bool = False, nudge_tokens: int = 8, base_prompt: str | None = None,
          stop: tuple[str, ...] = ()) -> dict:
    """Greedy decoding by ``base`` where it is confident; where its top-1 probability is below ``threshold``, the
    aligned ``nudger`` writes the next word (greedy, up to ``nudge_tokens`` tokens, cut at the word's end). The base
    reads the prompt as raw text (``base_chat`` for its chat template, or ``base_prompt`` as given, e.g. a URIAL
    prompt), the nudger through its chat template; the answer ends at EOS or before the first ``stop`` string.
    Returns ``{"completion", "nudged_tokens", "tokens", "nudged_fraction", "nudges"}``, tokens counted in the base
    tokenizer."""
    base_prefix = base_prompt if base_prompt is not None else render_prompt(base_tokenizer, prompt, base_chat)
    nudger_prefix = render_prompt(nudger_tokenizer, prompt, chat=True)
    device = next(base.parameters()).device
    text, tokens, nudged, nudges = "", 0, 0, 0
    while tokens < max_new_tokens:
        ids = base_tokenizer(base_prefix + text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        probs = base(input_ids=ids).logits[0, -1].float().softmax(-1)
        top_p, top = probs.max(-1)
        if float(top_p) >= threshold:
            if int(top) == base_tokenizer.eos_token_id:
                break
            text += base_tokenizer.decode([int(top)])
            tokens += 1
            if any(marker in text for marker in stop):
                break
            continue
        continuation = generate(nudger, nudger_tokenizer, [nudger_prefix + text], nudge_tokens, chat=False)[0]
        if not continuation:  # the aligned model ends the answer here
            break
        word = _WORD.match(continuation)
        piece = word.group(0) if word else continuation  # one word, with the whitespace before it
        count = len(base_tokenizer(piece, add_special_tokens=False)["input_ids"])
        text, tokens, nudged, nudges = text + piece, tokens + count, nudged + count, nudges + 1
        if any(marker in text for marker in stop):
            break
    for marker in stop:
        text = text.split(marker, 1)[0]
    return {"completion": text, "tokens": tokens, "nudged_tokens": nudged, "nudges": nudges,
            "nudged_fraction": nudged / tokens if tokens else 0.0}


# -- reward-guided chunk decoding ----------------------------------------------------------------------------
@torch.no_grad()
def _continue(model, tokenizer, prefix: str, k: int, chunk_tokens: int, temperature: float,
              top_p: float) -> list[tuple[str, bool]]:
    """``k`` sampled continuations of ``prefix`` of at most ``chunk_tokens`` tokens: (text, ended with EOS)."""
    device = next(model.parameters()).device
    enc = tokenizer([prefix] * k, return_tensors="pt", add_special_tokens=False).to(device)
    out = model.generate(**enc, max_new_tokens=chunk_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                         top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    rows = out[:, enc["input_ids"].shape[1] :]
    return [(tokenizer.decode(row, skip_special_tokens=True),
             bool((row == tokenizer.eos_token_id).any())) for row in rows]


def reward_guided(model, tokenizer, prompt, scorer: Scorer, candidates: int = 4, chunk_tokens: int = 16,
                  max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 1.0, chat: bool = True,
                  columns: dict | None = None) -> dict:
    """Sample ``candidates`` continuations of ``chunk_tokens`` tokens, keep the one whose answer-so-far the scorer
    rates best, repeat until it ends or ``max_new_tokens``. ``columns``: the prompt's record fields for a reward
    function. Returns ``{"completion", "score", "chunks"}``."""
    was_training = model.training
    model.eval()
    prefix = render_prompt(tokenizer, prompt, chat)
    text, score, chunks = "", float("nan"), 0
    try:
        while chunks * chunk_tokens < max_new_tokens:
            options = _continue(model, tokenizer, prefix + text, candidates, chunk_tokens, temperature, top_p)
            repeated = {key: [value] * len(options) for key, value in (columns or {}).items()}
            scores = scorer([prompt] * len(options), [text + piece for piece, _ in options], repeated)
            best = max(range(len(options)), key=lambda i: (scores[i], -i))
            text, score, chunks = text + options[best][0], scores[best], chunks + 1
            if options[best][1]:
                break
    finally:
        model.train(was_training)
    return {"completion": text, "score": score, "chunks": chunks}
