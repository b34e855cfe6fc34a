"""``posttrain generate``: plain generation, or one of the inference-time alignment methods of ``decoding``."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.core.errors import UserError
from posttrain.data.adapters import adapt
from posttrain.data.load import read_records
from posttrain.infer import decoding
from posttrain.model.load import load_model, load_tokenizer, resolve_model
from posttrain.rewards.model import plain_text
from posttrain.rollout.generate import generate


def load_for_inference(spec: str):
    """(model, tokenizer) of a model spec: a run directory stands for its final/ model."""
    path = resolve_model(spec)
    return load_model(path), load_tokenizer(path)


def read_prompts(args) -> tuple[list, list[dict]]:
    """(prompts, the other fields of each record) from --prompt or --data."""
    if bool(args.prompt) == bool(args.data):
        raise UserError("generate: give --prompt (one or more) or --data FILE")
    if args.prompt:
        return list(args.prompt), [{} for _ in args.prompt]
    prompts, fields = [], []
    for where, record in read_records(args.data, args.limit):
        record = adapt("auto", record, args.data, where)
        if "prompt" not in record:
            raise UserError(f"{args.data}, {where}: field 'prompt': missing")
        prompts.append(record["prompt"])
        fields.append({k: v for k, v in record.items() if k != "prompt"})
    return prompts, fields


def check_modes(args) -> None:
    chosen = [name for name, on in (("--best-of", args.best_of), ("--vote", args.vote), ("--nudge", args.nudge),
                                    ("--guided-chunks", args.guided_chunks)) if on]
    if len(chosen) > 1:
        raise UserError(f"generate: {' and '.join(chosen)} are different decoding methods; choose one")
    if (args.best_of or args.guided_chunks) and not args.reward:
        raise UserError(f"generate: {chosen[0]} picks by a reward: give --reward (a reward model or a reward function)")
    if args.reward and not (args.best_of or args.vote or args.guided_chunks):
        raise UserError("generate: --reward is read by --best-of, --vote and --guided-chunks only")
    for name in ("best_of", "vote", "guided_chunks", "candidates"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"generate: --{name.replace('_', '-')} must be at least 1")


def generate_command(args) -> int:
    check_modes(args)
    prompts, fields = read_prompts(args)
    several = args.best_of or args.vote or args.guided_chunks
    temperature = args.temperature if args.temperature is not None else (0.8 if several else 0.0)
    preamble = (
        None if args.urial is None else (Path(args.urial).read_text() if args.urial else decoding.urial_examples())
    )
    urial = preamble is not None
    shown = [decoding.urial_prompt(plain_text(p), preamble) for p in prompts] if urial else prompts
    chat = not (args.no_chat or urial)
    finish = decoding.urial_answer if urial else (lambda text: text)
    model, tokenizer = load_for_inference(args.model)
    options = {"aggregate": args.aggregate} if args.aggregate else {}
    reward = decoding.load_reward(args.reward, **options) if args.reward else None
    results: list[dict] = []
    if args.best_of or args.vote:
        n = args.best_of or args.vote
        candidates = decoding.sample_n(model, tokenizer, shown, n, args.max_new_tokens, temperature, args.top_p,
                                       chat=chat, progress=True)
        candidates = [[finish(c) for c in group] for group in candidates]
        scores = None
        if reward is not None:
            flat_prompts = [p for p in prompts for _ in range(n)]
            columns = {key: [f.get(key) for f in fields for _ in range(n)] for key in set().union(*fields)}
            columns["group"] = [i for i in range(len(prompts)) for _ in range(n)]
            flat = reward(flat_prompts, [c for group in candidates for c in group], columns)
            scores = [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
        if args.best_of:
            for group, values, (index, text, score) in zip(candidates, scores, decoding.best_of_n(candidates, scores)):
                results.append({"completion": text, "score": score, "chosen": index, "candidates": group,
                                "scores": values})
        else:
            for i, group in enumerate(candidates):
                answer, index = decoding.majority_vote(group, decoding.vote_weights(scores[i]) if scores else None)
                results.append({"completion": group[index if index is not None else 0], "answer": None if answer is None
                                else str(answer), "candidates": group, **({"scores": scores[i]} if scores else {})})
    elif args.nudge:
        nudger, nudger_tokenizer = load_for_inference(args.nudge)
        for prompt, base_prompt in zip(prompts, shown):
            results.append(decoding.nudge(model, tokenizer, nudger, nudger_tokenizer, prompt, args.nudge_threshold,
                                          args.max_new_tokens, base_chat=chat,
                                          base_prompt=base_prompt if urial else None,
                                          stop=(decoding.URIAL_FENCE,) if urial else ()))
    elif args.guided_chunks:
        for prompt, record in zip(prompts, fields):
            results.append(decoding.reward_guided(model, tokenizer, prompt, reward, args.candidates, args.guided_chunks,
                                                  args.max_new_tokens, temperature, args.top_p, chat, record))
    else:
        replies = generate(model, tokenizer, shown, args.max_new_tokens, temperature, args.top_p, chat=chat,
                           progress=len(shown) > 16)
        results = [{"completion": finish(reply)} for reply in replies]
    report(prompts, results, args)
    return 0


def report(prompts: list, results: list[dict], args) -> None:
    for prompt, result in zip(prompts, results):
        if len(prompts) > 1:
            print(f"### {prompt if isinstance(prompt, str) else prompt[-1]['content']}")
        notes = []
        if "score" in result and args.best_of:
            notes.append(f"score {result['score']:.3f}, best of {args.best_of}")
        if "answer" in result:
            notes.append(f"majority answer {result['answer']} of {args.vote}")
        if "nudged_fraction" in result:
            notes.append(f"{result['nudged_fraction']:.0%} of {result['tokens']} tokens nudged")
        print(result["completion"] + (f"\n[{'; '.join(notes)}]" if notes else ""))
    if "nudged_fraction" in results[0] and len(results) > 1:
        total = sum(r["tokens"] for r in results)
        print(f"nudged tokens: {sum(r['nudged_tokens'] for r in results) / max(total, 1):.1%} of {total}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps({"prompt": p, **r}) + "\n" for p, r in zip(prompts, results)))
        print(f"wrote {args.out}")
