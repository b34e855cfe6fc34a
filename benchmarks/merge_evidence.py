"""Which merge keeps the most of two differently tuned runs? The quickstart SFT run (GSM8K) and a DPO run (HH-RLHF
harmless) of the embedded model, merged by each method, each model scored three ways:

- GSM8K held-out loss: token-mean NLL of the gold solutions of the first ``--limit`` test questions (``eval/loss``);
- GSM8K accuracy: greedy answers to the same questions (256 new tokens), with a 95% Wilson interval;
- HH preference accuracy: DPO's implicit reward against the base model on ``--limit`` held-out pairs (ties half).

    python benchmarks/merge_evidence.py --sft runs/quickstart --dpo runs/dpo-hh --out runs/merges

Merges (all through ``posttrain merge``'s recipe path, streamed from the runs' merged weights): linear 0.5 / 0.5,
slerp t = 0.5, task arithmetic (both task vectors, scale 1), TIES and DARE-TIES and DARE (density 0.5), model stock,
LiNeS on the task-arithmetic sum (update scaled from 0 at the first layer to 1 at the last), greedy soup by GSM8K
held-out loss, and fine-tuning transfer (the SFT run's difference from the base added to the DPO model; with one
shared base this equals task arithmetic, which the table shows). One JSON line per model, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

GSM8K = "pkg:assets/gsm8k_test_200.jsonl"
HH = "pkg:assets/hh_harmless_eval_200.jsonl"


def merges(sft: str, dpo: str, out: Path, limit: int) -> dict[str, dict]:
    both = [{"model": sft}, {"model": dpo}]
    return {
        "linear 0.5/0.5": {"method": "linear", "models": both},
        "slerp t=0.5": {"method": "slerp", "models": both},
        "task arithmetic": {"method": "task_arithmetic", "base": "default", "models": both},
        "ties d=0.5": {"method": "ties", "base": "default", "models": both},
        "dare d=0.5": {"method": "dare", "base": "default", "models": both},
        "dare_ties d=0.5": {"method": "dare_ties", "base": "default", "models": both},
        "model stock": {"method": "model_stock", "base": "default", "models": both},
        "lines on task arithmetic": {"method": "lines", "base": "default",
                                     "models": [{"model": str(out / "task-arithmetic")}]},
        "greedy soup (GSM8K loss)": {"method": "greedy_soup", "models": both, "eval_data": GSM8K,
                                     "eval_limit": limit},
        "transfer sft->dpo": {"method": "transfer", "base": dpo, "models": [{"model": "default"}, {"model": sft}]},
    }


def slug(name: str) -> str:
    return name.split(" d=")[0].split(" t=")[0].split(" (")[0].split(" 0")[0].replace(" ", "-").replace(">", "")


def score(model: str, limit: int, reference, batch_size: int) -> dict:
    from posttrain.evaluate.accuracy import answer_accuracy, load_answer_records
    from posttrain.evaluate.stats import wilson_interval
    from posttrain.evaluate.heldout import heldout_loss, pair_logprobs, preference_accuracy
    from posttrain.model.load import load_model, load_tokenizer, resolve_model

    started = time.time()
    loss = heldout_loss(model, GSM8K, limit)
    path = resolve_model(model)
    loaded = load_model(path)
    import torch

    loaded = loaded.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    result = answer_accuracy(loaded, load_tokenizer(path), load_answer_records(GSM8K, limit), batch_size=batch_size)
    low, high = wilson_interval(result["correct"], result["total"])
    preference = preference_accuracy(pair_logprobs(model, HH, limit), reference) if reference is not None else None
    return {"gsm8k_loss": loss, "gsm8k_correct": result["correct"], "gsm8k_n": result["total"],
            "gsm8k_low": low, "gsm8k_high": high, "hh": preference, "seconds": time.time() - started}


def row(name: str, s: dict) -> str:
    accuracy = (f"{100 * s['gsm8k_correct'] / s['gsm8k_n']:.1f}% ({100 * s['gsm8k_low']:.1f}-"
                f"{100 * s['gsm8k_high']:.1f})")
    hh = s["hh"]
    preference = "- (is the reference)" if hh is None else (f"{100 * hh['accuracy']:.1f}% ({100 * hh['low']:.1f}-"
                                                          f"{100 * hh['high']:.1f})")
    return f"| {name} | {s['gsm8k_loss']:.4f} | {accuracy} | {preference} |"


def main() -> None:
    from posttrain.evaluate.heldout import pair_logprobs
    from posttrain.apps.merge.run import MergeRecipe, run_merge

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="the SFT run (quickstart)")
    parser.add_argument("--dpo", required=True, help="the DPO run (dpo_hh)")
    parser.add_argument("--out", required=True, help="directory for the merged models")
    parser.add_argument("--limit", type=int, default=200, help="GSM8K questions and HH pairs scored")
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch")
    parser.add_argument("--jsonl", default=None, help="also append each model's line to this file")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = pair_logprobs("default", HH, args.limit)
    lines = []

    def report(name: str, model: str, ref) -> None:
        s = {"model": name, **score(model, args.limit, ref, args.batch_size)}
        print(json.dumps(s), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as handle:
                handle.write(json.dumps(s) + "\n")
        lines.append(row(name, s))

    report("base (SmolLM2-135M-Instruct)", "default", None)
    report("SFT run (quickstart)", args.sft, reference)
    report("DPO run (dpo_hh)", args.dpo, reference)
    for name, spec in merges(args.sft, args.dpo, out, args.limit).items():
        target = out / slug(name)
        run_merge(MergeRecipe.model_validate({**spec, "output": str(target)}))
        report(name, str(target), reference)
    print(f"\n| model | GSM8K loss (n={args.limit}) | GSM8K greedy accuracy (95% CI) | HH preference accuracy vs base "
          "(95% CI) |\n|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
