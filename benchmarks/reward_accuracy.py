"""Held-out preference accuracy of a trained reward model next to the baselines it should beat, pair by pair.

    python benchmarks/reward_accuracy.py --rm runs/rm-hh --dpo runs/dpo-hh

On the held-out pairs of the rm recipe (``rm_hh``: 200 HH-RLHF harmless pairs, read as in training: 320 tokens, left
truncation) it scores each pair four ways: the trained reward model; the same model before training (the score head
as the run initialized it from its seed, which reproduces the run's step-0 evaluation); the base model's mean
log-prob per completion token; and a DPO policy's implicit reward, ``log pi/pi_ref(chosen) - log pi/pi_ref(rejected)``
(reference: the base model). A pair is right when the chosen side scores strictly higher. Prints each accuracy with
a Wilson interval and paired differences with 95% intervals (the same pairs, so the differences are paired).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch


def reward_model_right(task, examples, model) -> list[bool]:
    from posttrain.model.forward import HeadOutputs

    task.setup(model, None, [], [])
    module = HeadOutputs(model, task.weighting).eval()
    right = []
    for start in range(0, len(examples), 8):
        rb = task.collate(examples[start : start + 8])
        _, reward = module(rb.batch.input_ids, rb.batch.position_ids, rb.batch.attention_mask, rb.last_index)
        right += (reward[rb.pairs[:, 0]] > reward[rb.pairs[:, 1]]).tolist()
    return right


def sequence_logps(task, pairs, spec: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(summed log-probs, completion lengths) of (chosen, rejected) per pair."""
    from posttrain.model.load import load_model
    from posttrain.model.forward import TargetLogprobs
    from posttrain.model.forward import sequence_stats

    module = TargetLogprobs(load_model(spec).eval())
    logps, lengths = [], []
    for start in range(0, len(pairs), 8):
        chunk = pairs[start : start + 8]
        stats = sequence_stats(module, task.collate(chunk))
        n = len(chunk)
        logps += list(zip(stats["logps"][:n].tolist(), stats["logps"][n : 2 * n].tolist()))
        lengths += list(zip(stats["lengths"][:n].tolist(), stats["lengths"][n : 2 * n].tolist()))
    return logps, lengths


@torch.no_grad()
def main() -> None:
    from accelerate.utils import set_seed

    from posttrain.apps.recipes import load_recipe, validate_recipe
    from posttrain.evaluate.stats import wilson_interval
    from posttrain.model.load import load_classifier, load_tokenizer, resolve_model
    from posttrain.train.tasks.preference import PreferenceTask
    from posttrain.train.tasks.reward_model import RewardModelTask

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rm", required=True, help="the reward model run (posttrain rm rm_hh)")
    parser.add_argument("--dpo", help="a DPO run on the same data (posttrain dpo dpo_hh), for its implicit reward")
    parser.add_argument("--recipe", default="rm_hh", help="the reward model's recipe (its model, eval data and seed)")
    parser.add_argument("--out", help="write per-pair results as JSON")
    args = parser.parse_args()

    recipe = load_recipe("rm", args.recipe, [f"output_dir={args.rm}"])
    path = resolve_model(recipe.model)
    tokenizer = load_tokenizer(path)
    task = RewardModelTask(recipe, tokenizer)
    examples = task.build_dataset("eval", quiet=True)
    right = {"reward model": reward_model_right(task, examples, load_classifier(resolve_model(args.rm), 1))}
    set_seed(recipe.train.seed)  # as the run did before loading its model: the same initial score head
    task.build_dataset("train", quiet=True)
    right["untrained head"] = reward_model_right(task, examples, task.load_model(path))

    pairs_recipe = validate_recipe("dpo", {"model": recipe.model, "output_dir": "unused",
                                           "data": recipe.data.model_dump(mode="json", exclude={"limit"})})
    preference = PreferenceTask(pairs_recipe, tokenizer)
    pairs = preference.build_dataset("eval", quiet=True)
    base, lengths = sequence_logps(preference, pairs, path)
    right["base mean log-prob"] = [c / lc > r / lr for (c, r), (lc, lr) in zip(base, lengths)]
    if args.dpo:
        policy, _ = sequence_logps(preference, pairs, args.dpo)
        right["DPO implicit reward"] = [(pc - bc) - (pr - br) > 0 for (pc, pr), (bc, br) in zip(policy, base)]

    print(f"\nheld-out preference accuracy on {len(examples)} pairs ({args.recipe}'s eval data)\n")
    print("| scorer | accuracy (95% CI) | right / n |\n|---|---|---|")
    for name, values in right.items():
        low, high = wilson_interval(sum(values), len(values))
        print(f"| {name} | {sum(values) / len(values):.1%} ({low:.1%} to {high:.1%}) | {sum(values)}/{len(values)} |")
    print("\n| paired difference | accuracy points (95% CI) |\n|---|---|")
    for other in [name for name in right if name != "reward model"]:
        diffs = [float(a) - float(b) for a, b in zip(right["reward model"], right[other])]
        mean, half = statistics.fmean(diffs), 1.959963984540054 * statistics.stdev(diffs) / math.sqrt(len(diffs))
        print(f"| reward model - {other} | {mean:+.1%} ({mean - half:+.1%} to {mean + half:+.1%}) |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(right, f)


if __name__ == "__main__":
    main()
