"""S3FT (Gupta et al., 2024, "Selective Self-to-Supervised Fine-Tuning for Generalization in Large Language
Models"): where the model already answers a training item correctly, train on its own answer instead of the
gold one, so SFT moves the model less on what it knows (the paper halves the drop in general capability).

Correctness is the verifiable-answer check (:mod:`posttrain.rewards.answers`) against the record's
``answer`` field, or the number the gold completion ends with. The paper also has the model paraphrase gold
answers it gets wrong and uses a judge for open-ended answers; those steps are not done here. Answers come
from the model before training (greedy), once, cached in the run directory for resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from posttrain.data.formats import Message, Segment, SFTExample
from posttrain.rewards.answers import extract_answer, is_correct
from posttrain.rollout.generate import generate
from posttrain.train.reference import weights_fingerprint


def split_prompt(example: SFTExample) -> tuple[list | str, str] | None:
    """(prompt for generation, gold answer text), or None for examples without a final assistant answer."""
    if example.messages is not None:
        if example.messages[-1].role != "assistant":
            return None
        prompt = [{"role": m.role, "content": m.content} for m in example.messages[:-1]]
        return prompt, example.messages[-1].content
    return example.prompt, "".join(s.text for s in example.completion)


def with_answer(example: SFTExample, answer: str) -> SFTExample:
    """The example with its final completion replaced by ``answer`` (weights of the gold completion kept)."""
    if example.messages is not None:
        last = example.messages[-1]
        return replace(example, messages=[*example.messages[:-1], Message("assistant", [Segment(answer)], last.weight)])
    weight = example.completion[-1].weight if example.completion else 1.0
    return replace(example, completion=[Segment(answer, weight)])


def self_sampled_answers(model, tokenizer, examples: list[SFTExample], references: list[str | None],
                         max_new_tokens: int, batch_size: int, cache: Path) -> list[str | None]:
    """For each example, the model's own greedy answer where it is correct, else None."""
    prompts = [split_prompt(e) for e in examples]
    digest = hashlib.sha256(f"{weights_fingerprint(model)}|{max_new_tokens}|{json.dumps(prompts)}".encode()).hexdigest()
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == digest:
            return stored["answers"]
    usable = [i for i, p in enumerate(prompts) if p is not None]
    chat = all(examples[i].messages is not None for i in usable)
    completions = generate(model, tokenizer, [prompts[i][0] for i in usable], max_new_tokens, batch_size=batch_size,
                           chat=chat, progress=True)
    answers: list[str | None] = [None] * len(examples)
    for i, completion in zip(usable, completions):
        gold = references[i] if references[i] is not None else extract_answer(prompts[i][1])
        if gold is not None and is_correct(completion, gold):
            answers[i] = completion.strip()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": digest, "answers": answers}))
    return answers
