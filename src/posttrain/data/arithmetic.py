"""A verifiable task the embedded 135M model solves sometimes: one-step arithmetic with small numbers.

Problems are ``a + b`` and ``a - b`` (a two-digit, b one-digit) and ``a * b`` (a, b in 2..12),
asked as "What is a op b? Answer with the number only."; the record's ``answer`` is the exact result,
scored by the ``math_answer`` reward. The problem space is enumerated and split once, by a fixed seed,
into a held-out set and a training set that never share a problem; ``python -m posttrain.data.arithmetic``
rewrites the shipped files (``assets/arithmetic_{train,eval_200}.jsonl``) identically.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets")
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, evaluation = split(args.held_out, args.seed)
    for name, records in (("arithmetic_train.jsonl", train), (f"arithmetic_eval_{args.held_out}.jsonl", evaluation)):
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{args.out / name}: {len(records)} problems")


if __name__ == "__main__":
    main()
