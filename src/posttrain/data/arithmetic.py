"""A verifiable task the embedded 135M model solves sometimes: one-step arithmetic with small numbers.

Problems are ``a + b`` and ``a - b`` (a two-digit, b one-digit) and ``a * b`` (a, b in 2..12),
asked as "What is a op b? Answer with the number only."; the record's ``answer`` is the exact result,
scored by the ``math_answer`` reward. The problem space is enumerated and split once, by a fixed seed,
into a held-out set and a training set that never share a problem; ``python -m posttrain.data.arithmetic``
rewrites the shipped files (``assets/arithmetic_{train,eval_200}.jsonl``) identically, and the files of the
tool-use recipe with large numbers (``assets/arithmetic_large_{train,eval_200}.jsonl``, :func:`large_split`) and the
step-labeled chains of the process-reward recipe (``assets/arithmetic_steps_{train,eval_200}.jsonl``,
:func:`step_chains`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPERATIONS = {
    "+": (range(10, 100), range(2, 10), lambda a, b: a + b),
    "-": (range(10, 100), range(2, 10), lambda a, b: a - b),
    "*": (range(2, 13), range(2, 13), lambda a, b: a * b),
}


def problems(op: str) -> list[dict]:
    left, right, fn = OPERATIONS[op]
    return [{"prompt": f"What is {a} {op} {b}? Answer with the number only.", "answer": str(fn(a, b))}
            for a in left for b in right]


def split(held_out: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval): each operation's problems shuffled by ``seed``, the first ``held_out / 3`` of each kept
    apart (the operations weigh equally in the held-out accuracy), the rest shuffled together for training."""
    rng = random.Random(seed)
    train, evaluation = [], []
    for i, op in enumerate(OPERATIONS):
        every = problems(op)
        rng.shuffle(every)
        count = held_out // len(OPERATIONS) + (i < held_out % len(OPERATIONS))
        evaluation += every[:count]
        train += every[count:]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


LARGE = {
    "+": (range(10_000, 100_000), range(10_000, 100_000), lambda a, b: a + b),
    "-": (range(10_000, 100_000), range(1_000, 10_000), lambda a, b: a - b),
    "*": (range(100, 1_000), range(100, 1_000), lambda a, b: a * b),
}


def large_split(train_size: int = 1200, held_out: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) of problems with large numbers (five-digit sums and differences, three-digit products) that the
    135M model cannot do in its head but a Python tool can: drawn by ``seed``, an equal share per operation, no
    problem in both."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: dict[str, list[dict]] = {op: [] for op in LARGE}
    per_op = (train_size + held_out) // len(LARGE) + 1
    for op, (left, right, fn) in LARGE.items():
        while len(records[op]) < per_op:
            a, b = rng.choice(left), rng.choice(right)
            prompt = f"What is {a} {op} {b}?"
            if prompt not in seen:
                seen.add(prompt)
                records[op].append({"prompt": prompt, "answer": str(fn(a, b))})
    evaluation = [
        r for i, op in enumerate(LARGE) for r in records[op][: held_out // len(LARGE) + (i < held_out % len(LARGE))]
    ]
    train = [
        r for i, op in enumerate(LARGE) for r in records[op][held_out // len(LARGE) + (i < held_out % len(LARGE)) :]
    ]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train[:train_size], evaluation


def step_chains(count: int, seed: int = 0, error_rate: float = 0.25) -> list[dict]:
    """Process-supervision data: three-step sums and differences of small numbers, solved step by step, where each
    step is wrong (off by 1 to 3) with probability ``error_rate``. A step is labeled correct only if it and every
    step before it are right (the solution is still on track, as in Math-Shepherd's labels)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        start, moves = rng.randint(10, 60), [(rng.choice("+-"), rng.randint(2, 19)) for _ in range(3)]
        question = f"Start from {start}, then " + ", then ".join(
            f"{'add' if op == '+' else 'subtract'} {n}" for op, n in moves) + ". What is the result?"
        value, steps, labels, on_track = start, [], [], True
        for op, n in moves:
            right = value + n if op == "+" else value - n
            shown = right + rng.choice([-3, -2, -1, 1, 2, 3]) if rng.random() < error_rate else right
            on_track = on_track and shown == right
            steps.append(f"{value} {op} {n} = {shown}")
            labels.append(on_track)
            value = shown
        records.append({"prompt": question, "completions": steps, "labels": labels})
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets")
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, evaluation = split(args.held_out, args.seed)
    large_train, large_eval = large_split(held_out=args.held_out, seed=args.seed)
    for name, records in (("arithmetic_train.jsonl", train), (f"arithmetic_eval_{args.held_out}.jsonl", evaluation),
                          ("arithmetic_large_train.jsonl", large_train),
                          (f"arithmetic_large_eval_{args.held_out}.jsonl", large_eval),
                          ("arithmetic_steps_train.jsonl", step_chains(2000, args.seed)),
                          (f"arithmetic_steps_eval_{args.held_out}.jsonl", step_chains(args.held_out, args.seed + 1))):
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{args.out / name}: {len(records)} problems")


if __name__ == "__main__":
    main()
