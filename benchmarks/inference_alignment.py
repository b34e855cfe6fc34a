"""Inference-time alignment curves: best-of-N by a reward model, and majority vote (self-consistency).

    python benchmarks/inference_alignment.py best-of-n --reward runs/rm-hh [--prompts 50 --n 16]
    python benchmarks/inference_alignment.py vote [--questions 200 --n 11]

``best-of-n`` samples N replies to held-out HH-RLHF prompts and keeps the best of the first 1, 4, 16 by the reward
model: the mean reward of the kept reply (with a 95% normal interval over prompts) against greedy decoding. The same
reward model selects and scores, so the curve shows how hard the selection optimizes that reward, not that a person
would prefer the replies. ``vote`` samples N answers to the held-out arithmetic problems of the RL recipes and
answers by majority vote over the first 1, 5, 11 (accuracy with a Wilson interval), next to greedy decoding and to
pass@N (some sample is right: the ceiling of any selection), each with its paired gain over a single sample (a 95%
interval of the per-question differences). Each prints a Markdown table and writes JSON lines.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "posttrain" / "assets"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    half = 1.959963984540054 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, mean - half, mean + half


def load(path: Path, limit: int) -> list[dict]:
    from posttrain.data.adapters import adapt

    lines = path.read_text().splitlines()[:limit]
    return [adapt("auto", json.loads(line), str(path), f"line {i + 1}") for i, line in enumerate(lines)]


def best_of_n_curve(args) -> list[dict]:
    from posttrain.apps.infer import load_for_inference
    from posttrain.infer import best_of_n, sample_n
    from posttrain.rewards.model import RewardModel
    from posttrain.rollout.generate import generate

    records = load(ASSETS / "hh_harmless_eval_200.jsonl", args.prompts)
    prompts = [r["prompt"] for r in records]
    model, tokenizer = load_for_inference(args.policy)
    reward = RewardModel(args.reward)
    started = time.perf_counter()
    greedy = generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=args.batch_size, progress=True)
    candidates = sample_n(model, tokenizer, prompts, args.n, args.max_new_tokens, args.temperature,
                          batch_size=args.batch_size, progress=True)
    flat = reward([p for p in prompts for _ in range(args.n)], [c for group in candidates for c in group])
    scores = [flat[i * args.n : (i + 1) * args.n] for i in range(len(prompts))]
    rows = [{"method": "greedy", "n": 1, "completions": greedy, "scores": reward(prompts, greedy)}]
    for n in sorted({1, *[k for k in (4, 16) if k <= args.n], args.n}):
        kept = best_of_n(candidates, scores, n)
        rows.append({"method": "best_of_n", "n": n, "completions": [t for _, t, _ in kept],
                     "scores": [s for _, _, s in kept]})
    out = []
    one = next(row["scores"] for row in rows if row["method"] == "best_of_n" and row["n"] == 1)
    for row in rows:
        mean, low, high = mean_interval(row["scores"])
        gain, gain_low, gain_high = mean_interval([a - b for a, b in zip(row["scores"], one)])
        out.append({"workload": "best_of_n", "method": row["method"], "n": row["n"], "prompts": len(prompts),
                    "reward_mean": mean, "ci95": [low, high], "gain_over_one_sample": gain,
                    "gain_ci95": [gain_low, gain_high],
                    "chars_mean": statistics.fmean(len(c) for c in row["completions"])})
    print(f"\nbest-of-N on {len(prompts)} held-out HH-RLHF harmless prompts; policy {args.policy}, reward model "
          f"{args.reward}; samples at T={args.temperature}, {args.max_new_tokens} new tokens; "
          f"{time.perf_counter() - started:.0f} s on {cpu_name()}\n")
    print("| selection | N | mean reward (95% CI) | paired gain over one sample (95% CI) | mean length (chars) |\n"
          "|---|---|---|---|---|")
    for r in out:
        print(f"| {r['method']} | {r['n']} | {r['reward_mean']:.3f} ({r['ci95'][0]:.3f} to {r['ci95'][1]:.3f}) | "
              f"{r['gain_over_one_sample']:+.3f} ({r['gain_ci95'][0]:+.3f} to {r['gain_ci95'][1]:+.3f}) | "
              f"{r['chars_mean']:.0f} |")
    return out


def vote_curve(args) -> list[dict]:
    from posttrain.apps.infer import load_for_inference
    from posttrain.evaluate.stats import wilson_interval
    from posttrain.rewards.answers import is_correct
    from posttrain.infer import majority_vote, sample_n
    from posttrain.rollout.generate import generate

    records = load(ASSETS / "arithmetic_eval_200.jsonl", args.questions)
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    model, tokenizer = load_for_inference(args.policy)
    started = time.perf_counter()
    greedy = generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=args.batch_size, progress=True)
    samples = sample_n(model, tokenizer, prompts, args.n, args.max_new_tokens, args.temperature,
                       batch_size=args.batch_size, progress=True)
    rows = [("greedy", 1, [is_correct(g, a) for g, a in zip(greedy, answers)])]
    for n in sorted({1, *[k for k in (5, 11) if k <= args.n], args.n}):
        voted = []
        for group, answer in zip(samples, answers):
            winner, index = majority_vote(group[:n])
            voted.append(index is not None and is_correct(group[index], answer))
        rows.append(("majority_vote", n, voted))
        rows.append(("pass_at_n", n, [any(is_correct(c, a) for c in group[:n]) for group, a in zip(samples, answers)]))
    out = []
    first = next(right for method, n, right in rows if method == "majority_vote" and n == 1)
    for method, n, right in rows:
        low, high = wilson_interval(sum(right), len(right))
        gain, gain_low, gain_high = mean_interval([float(a) - float(b) for a, b in zip(right, first)])
        out.append({"workload": "vote", "method": method, "n": n, "questions": len(right), "correct": sum(right),
                    "accuracy": sum(right) / len(right), "ci95": [low, high],
                    "gain_over_one_sample": gain, "gain_ci95": [gain_low, gain_high], "per_question": right})
    print(f"\nmajority vote on {len(prompts)} held-out arithmetic problems; policy {args.policy}; samples at "
          f"T={args.temperature}, {args.max_new_tokens} new tokens; {time.perf_counter() - started:.0f} s on "
          f"{cpu_name()}\n")
    print("| method | N | accuracy (95% CI) | correct / n | paired gain over one sample (95% CI) "
          "|\n|---|---|---|---|---|")
    for r in out:
        print(f"| {r['method']} | {r['n']} | {r['accuracy']:.1%} ({r['ci95'][0]:.1%} to {r['ci95'][1]:.1%}) | "
              f"{r['correct']}/{r['questions']} | {r['gain_over_one_sample']:+.1%} ({r['gain_ci95'][0]:+.1%} to "
              f"{r['gain_ci95'][1]:+.1%}) |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="workload", required=True)
    best = sub.add_parser("best-of-n")
    best.add_argument("--reward", required=True, help="a reward model directory or run (posttrain rm)")
    best.add_argument("--prompts", type=int, default=50)
    best.add_argument("--n", type=int, default=16)
    best.add_argument("--max-new-tokens", type=int, default=96)
    best.add_argument("--temperature", type=float, default=0.8)
    vote = sub.add_parser("vote")
    vote.add_argument("--questions", type=int, default=200)
    vote.add_argument("--n", type=int, default=11)
    vote.add_argument("--max-new-tokens", type=int, default=32)
    vote.add_argument("--temperature", type=float, default=0.7)
    for p in (best, vote):
        p.add_argument("--policy", default="default")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
        p.add_argument("--out", help="write the rows as JSON lines")
    args = parser.parse_args()
    import torch

    torch.manual_seed(args.seed)
    rows = best_of_n_curve(args) if args.workload == "best-of-n" else vote_curve(args)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
