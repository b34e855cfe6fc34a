"""``posttrain data synth``: training data made by a model, through the same generation backend as online RL
(per-sample seeds, so a synthesis is reproducible and cached like evaluation generations).

- ``magpie`` (Xu et al., 2024, "Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs with
  Nothing"): the aligned model gets only its chat template up to where a user message starts and writes the
  instruction itself (sampled); then it answers that instruction in the full template. Empty, cut-off and
  duplicate instructions are dropped.
- ``pairs``: on-policy preference pairs: N sampled completions per prompt scored by a reward function, reward model
  or process reward model; the best and the worst make a pair (prompts whose samples all score the same give none).
- ``rejection``: rejection-sampled SFT data: N samples per verifiable prompt, kept when the reward reaches
  ``--threshold`` (distinct completions only, at most ``--keep`` per prompt).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from posttrain.core.errors import UserError
from posttrain.evaluate.model import EvalModel
from posttrain.evaluate.tasks import load_prompts
from posttrain.infer.decoding import load_reward
from posttrain.rollout.backend import SamplingSettings, TransformersBackend, sample_seed
from posttrain.rollout.generate import render_prompt

PLACEHOLDER = "\x00posttrain-user-message\x00"


def pre_query_template(tokenizer, system: str | None = None) -> str:
    """The chat template rendered up to the start of a user message's content (Magpie's pre-query template)."""
    if not tokenizer.chat_template:
        raise UserError("data synth magpie needs an aligned model with a chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": PLACEHOLDER}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text[: text.index(PLACEHOLDER)]


def magpie(model, tokenizer, count: int, settings: SamplingSettings, response: SamplingSettings, seed: int = 0,
           system: str | None = None, batch_size: int = 16) -> tuple[list[dict], Counter]:
    """``count`` attempts at (instruction, response) records; (records, why others were dropped)."""
    backend = TransformersBackend(model, tokenizer, batch_size, progress=True)
    prefix = tokenizer(pre_query_template(tokenizer, system), add_special_tokens=False)["input_ids"]
    queries = backend.generate([prefix] * count, [sample_seed(seed, 0, i, 0) for i in range(count)], settings)
    dropped, seen, instructions = Counter(), set(), []
    for query in queries:
        text = query.text.strip()
        if query.truncated:
            dropped["instruction cut at the token limit"] += 1
        elif not text:
            dropped["empty instruction"] += 1
        elif text.lower() in seen:
            dropped["duplicate instruction"] += 1
        else:
            seen.add(text.lower())
            instructions.append(text)
    conversations = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
                     for q in instructions]
    ids = [tokenizer(render_prompt(tokenizer, c), add_special_tokens=False)["input_ids"] for c in conversations]
    answers = backend.generate(ids, [sample_seed(seed, 1, i, 0) for i in range(len(ids))], response)
    records = []
    for conversation, answer in zip(conversations, answers):
        if answer.truncated or not answer.text.strip():
            dropped["response cut at the token limit or empty"] += 1
            continue
        records.append({"messages": conversation + [{"role": "assistant", "content": answer.text.strip()}]})
    return records, dropped


def scored_samples(model_spec: str, data: str, reward: str, samples: int, settings: SamplingSettings, limit: int | None,
                   seed: int, batch_size: int) -> tuple[list, list[dict], list[list[str]], list[list[float]]]:
    """(prompts, records, completions per prompt, rewards per completion)."""
    prompts, records = load_prompts(data, limit)
    generations = EvalModel(model_spec, batch_size=batch_size).generate(prompts, settings, samples, seed)
    texts = [[g.text for g in row] for row in generations]
    scorer = load_reward(reward, batch_size=batch_size)
    flat_prompts = [p for p, row in zip(prompts, texts) for _ in row]
    columns = {k: [r.get(k) for r, row in zip(records, texts) for _ in row] for k in ("answer",
                                                                                      ) if all(k in r for r in records)}
    flat = scorer(flat_prompts, [t for row in texts for t in row], columns)
    rewards, start = [], 0
    for row in texts:
        rewards.append([float(x) for x in flat[start:start + len(row)]])
        start += len(row)
    return prompts, records, texts, rewards


def _extra(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("prompt", "messages", "chosen", "rejected", "completion")}


def best_vs_worst(prompts, records, texts, rewards) -> tuple[list[dict], Counter]:
    out, dropped = [], Counter()
    for prompt, record, row, scores in zip(prompts, records, texts, rewards):
        best, worst = max(range(len(row)), key=lambda i: (scores[i], -i)), min(range(len(row)),
                                                                               key=lambda i: (scores[i], i))
        if scores[best] == scores[worst]:
            dropped["all samples scored the same"] += 1
            continue
        out.append({"prompt": prompt, "chosen": row[best], "rejected": row[worst], "chosen_reward": scores[best],
                    "rejected_reward": scores[worst], **_extra(record)})
    return out, dropped


def accepted(prompts, records, texts, rewards, threshold: float, keep: int) -> tuple[list[dict], Counter]:
    out, dropped = [], Counter()
    for prompt, record, row, scores in zip(prompts, records, texts, rewards):
        kept: list[str] = []
        for text, score in zip(row, scores):
            if score >= threshold and text.strip() and text not in kept and len(kept) < keep:
                kept.append(text)
        if not kept:
            dropped["no sample reached the threshold"] += 1
        out += [{"prompt": prompt, "completion": text, **_extra(record)} for text in kept]
    return out, dropped


def write(records: list[dict], out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
