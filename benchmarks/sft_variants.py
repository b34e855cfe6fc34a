"""The SFT variants against plain SFT on the quickstart setting: same data, budget and seed.

    python benchmarks/sft_variants.py                       # every variant (about an hour on 2 CPU cores)
    python benchmarks/sft_variants.py --configs sft dynamic_ft

Each run is the quickstart recipe (LoRA r=16 on the embedded SmolLM2-135M-Instruct, 30 steps x 8
examples, lr 5e-4, seed 0) on the first 240 GSM8K training records (exactly the 30 x 8 examples
trained on, so S3FT's self-sampling pass stays short), with one variant switched on. Reported:
held-out loss on 32 GSM8K test solutions (before -> after) and greedy GSM8K accuracy on 48
held-out questions with a 95% Wilson interval. The distillation teacher and the token-selection
reference are the plain SFT run (``sft``, run first); PoFT's aligned reference is the untrained
instruct model itself. One JSON line per run; a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path("runs/sft_variants")
QUESTIONS = 48
VARIANTS = {
    "sft": {},
    "dynamic_ft": {"sft.loss": "dynamic_ft"},
    "masked_thought": {"sft.mask_ratio": 0.2},
    "poft": {"sft.loss": "poft", "sft.references": "[default]"},
    "s3ft": {"sft.self_sample": True},
    "distill": {"sft.loss": "distill", "teacher": str(ROOT / "sft")},
    "token_selection": {"sft.token_selection": json.dumps({"ratio": 0.6, "reference": str(ROOT / "sft")})},
}


def run_one(name: str) -> dict:
    from posttrain.apps.recipes import load_recipe
    from posttrain.evaluate.accuracy import answer_accuracy, load_answer_records
    from posttrain.evaluate.stats import wilson_interval
    from posttrain.model.load import load_model, load_tokenizer
    from posttrain.apps.quickstart import HELD_OUT, MAX_NEW_TOKENS
    from posttrain.train.run import run

    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)  # a finished run would resume as "done" and report no step-0 evaluation
    overrides = {"output_dir": str(out), "data.limit": 240, "train.report_to": "[]", **VARIANTS[name]}
    summary = run("sft", load_recipe("sft", "quickstart", [f"{k}={v}" for k, v in overrides.items()]))
    records = load_answer_records(HELD_OUT, QUESTIONS)
    scored = answer_accuracy(load_model(str(out / "final")), load_tokenizer(str(out / "final")), records,
                             MAX_NEW_TOKENS,
                             batch_size=len(records))
    low, high = wilson_interval(scored["correct"], scored["total"])
    evals = summary["eval"]
    return {"variant": name, "eval_loss_before": round(evals[0]["eval/loss"], 4),
            "eval_loss_after": round(evals[-1]["eval/loss"], 4),
            "correct": scored["correct"], "n": scored["total"], "accuracy": round(scored["accuracy"], 4),
            "ci95": [round(low, 4), round(high, 4)], "train_s": round(summary["elapsed_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one)), flush=True)
        return
    results = []
    for name in args.configs:
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1][len("RESULT "):]) if lines and not done.returncode else \
            {"variant": name, "error": done.stderr.strip().splitlines()[-3:]}
        results.append(result)
        print(json.dumps(result), flush=True)
    print("\n| variant | held-out loss | GSM8K accuracy (n, 95% CI) |\n|---|---|---|")
    for r in results:
        if "error" not in r:
            print(f"| {r['variant']} | {r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f} | "
                  f"{r['accuracy']:.1%} ({r['correct']}/{r['n']}, {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}) |")


if __name__ == "__main__":
    main()
