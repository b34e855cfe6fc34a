"""The quickstart: SFT of the embedded model on a GSM8K slice, then what changed, measured honestly.

The trained model and the untrained one answer the same held-out questions and are compared question by question
(``posttrain eval`` with a baseline): held-out loss of the gold solutions, answers in GSM8K's ``#### N`` format, and
accuracy, each with a paired 95% interval. A change whose interval holds 0 is printed as no change shown: on a 135M
model 30 LoRA steps teach the solution format, and accuracy gains on this many questions are usually noise.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from posttrain.apps.recipes import load_recipe
from posttrain.evaluate.config import EvalOptions
from posttrain.evaluate.harness import run_eval, write_results
from posttrain.evaluate.model import EvalModel
from posttrain.train.run import run

HELD_OUT = "pkg:assets/gsm8k_test_200.jsonl"
MAX_NEW_TOKENS = 256
SHOWN = [("perplexity", "loss", "held-out loss of gold solutions (nats/token)", False),
         ("answer_accuracy", "format", "answers ending in GSM8K's '#### N'", True),
         ("answer_accuracy", "accuracy", "accuracy (greedy)", True),
         ("answer_accuracy", "truncated", "replies cut off at the token limit", True)]


def quickstart(out: str, questions: int, overrides: list[str]) -> dict:
    recipe = load_recipe("sft", "quickstart", [f"output_dir={out}", *overrides])
    run("sft", recipe)
    print(f"\ncomparing the trained model with the untrained one on {questions} held-out GSM8K questions", flush=True)
    options = EvalOptions(limit=questions, max_new_tokens=MAX_NEW_TOKENS, max_length=recipe.data.max_length,
                          batch_size=questions)
    results = run_eval(EvalModel(out, name="trained", batch_size=options.batch_size), ["perplexity", "answer_accuracy"],
                       {"perplexity": HELD_OUT, "answer_accuracy": HELD_OUT}, options,
                       EvalModel(recipe.model, name="untrained", batch_size=options.batch_size))
    write_results(results, str(Path(out) / "results.json"))
    print("\n" + "\n".join(summary_lines(results, questions, out)))
    return results


def _value(value: float, percent: bool) -> str:
    return f"{value:.1%}" if percent else f"{value:.3f}"


def summary_lines(results: dict, questions: int, out: str) -> list[str]:
    """Before, after and the paired change of each shown metric, worded by whether its interval excludes 0."""
    lines = ["=" * 100, f"What post-training changed, question by question ({questions} held-out GSM8K questions; "
             "95% intervals, paired bootstrap):", ""]
    for task, metric, label, percent in SHOWN:
        entry = results["tasks"][task]
        before, after, diff = entry["baseline"][metric], entry["metrics"][metric], entry["difference"][metric]
        unit = (lambda v: f"{100 * v:+.1f} pp") if percent else (lambda v: f"{v:+.3f}")
        verdict = (
            diff["verdict"] if diff["verdict"] != "no difference shown" else "no change shown (the interval holds 0)"
        )
        lines.append(f"  {label:48s} {_value(before['value'], percent):>7s} -> "
                     f"{_value(after['value'], percent):>7s}   {unit(diff['value'])} "
                     f"[{unit(diff['low'])}, {unit(diff['high'])}]  {verdict}")
    accuracy = results["tasks"]["answer_accuracy"]["difference"]["accuracy"]
    if not accuracy["low"] > 0:
        lines += ["",
                  "  Accuracy: no gain shown. A 135M model rarely solves GSM8K problems; what these steps change is "
                  "the solution format", "  and the likelihood of correct solutions. (More questions narrow the "
                  "interval: posttrain quickstart --questions 200.)"]
    examples = results["tasks"]["answer_accuracy"]
    for ours, theirs in list(zip(examples["examples"], examples["baseline_examples"]))[:2]:
        lines += ["-" * 100, f"Q: {ours['prompt']}\n(reference answer: {ours['answer']})"]
        for name, example in (("before", theirs), ("after", ours)):
            mark = "correct" if example["correct"] else "wrong"
            lines.append(f"[{name}, {mark}]\n{textwrap.indent(example['completion'].strip(), '  ')}")
    lines += ["=" * 100, f"results: {out}/results.json   plots: posttrain report {out}"]
    return lines
