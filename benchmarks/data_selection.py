"""Does choosing the training data beat choosing it at random? SFT of the embedded model on a 1,000-record
selection of GSM8K by each ``posttrain data select`` method, against 1,000 random records, same budget.

    python benchmarks/data_selection.py --out runs/selection

- Pool: the first ``--pool`` records of GSM8K train (scoring every record with the model costs about 0.27 s per
  record and pass on 2 CPU cores, so the full 7,473 would take hours per model-scored method).
- Selection: ``posttrain data select POOL --budget 1000 --method M`` (exact duplicates removed first; zip_fit
  aligns with ``--target``, dev records the evaluation does not use; GRAPE picks, per question, between the two
  forms GSM8K solutions come in: with the ``<<48/2=24>>`` calculator annotations and without them).
- Training: the same LoRA SFT recipe (the quickstart's: r 16, lr 5e-4, batch 8, ``--steps`` steps, seed 0) on each
  selection.
- Evaluation on GSM8K dev records the target set does not hold: held-out loss (token-mean NLL of the gold
  solutions) and greedy accuracy, each with its 95% interval and the paired difference from the random
  selection's model (paired bootstrap for the loss; for accuracy the paired bootstrap of 0/1 outcomes).

Each stage is skipped when its output exists, so an interrupted run continues. One JSON line per method, then a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from posttrain.data.adapters import gsm8k

TRAIN = "../shared/data/gsm8k/train.jsonl"
DEV = "../shared/data/gsm8k/test_dev.jsonl"
METHODS = ("random", "length", "zip_fit", "kcenter", "loss", "ifd", "grape", "deita")
RECIPE = """model: default
output_dir: {out}
data:
  train:
    - path: {train}
  max_length: 384
peft:
  method: lora
  r: 16
  alpha: 32
train:
  max_steps: {steps}
  batch_size: 8
  lr: 5.0e-4
  warmup_steps: 4
  save_every: {steps}
  report_to: []
"""


def posttrain(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"posttrain {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def prepare(out: Path, pool: int, dev: int) -> None:
    """pool.jsonl, grape_pool.jsonl (two candidate solutions per question), dev.jsonl, target.jsonl."""
    if (out / "target.jsonl").exists():
        return
    train = [json.loads(line) for line in Path(TRAIN).read_text().splitlines()[:pool]]
    write_jsonl(out / "pool.jsonl", train)
    write_jsonl(out / "grape_pool.jsonl", [grape_record(r) for r in train])
    held = [json.loads(line) for line in Path(DEV).read_text().splitlines()]
    write_jsonl(out / "dev.jsonl", held[:dev])
    write_jsonl(out / "target.jsonl", held[dev:])


def grape_record(record: dict) -> dict:
    """GRAPE's candidates for a GSM8K question, as conversations (so training and scoring use the chat template,
    as the other selections' GSM8K records do): the solution with and without its calculator annotations."""
    adapted = gsm8k(record)
    return {"prompt": adapted["prompt"], "answer": adapted["answer"],
            "responses": [[{"role": "assistant", "content": text}] for text in (record["answer"],
                                                                                adapted["completion"][0]["content"])]}


def run_method(method: str, out: Path, budget: int, steps: int) -> dict:
    where = out / method
    where.mkdir(parents=True, exist_ok=True)
    info_path = where / "selection.json"
    if not info_path.exists():
        pool = out / ("grape_pool.jsonl" if method == "grape" else "pool.jsonl")
        extra = ["--target", str(out / "target.jsonl")] if method == "zip_fit" else []
        started = time.perf_counter()
        printed = posttrain("data", "select", str(pool), "--budget", str(budget), "--method", method,
                            "--out", str(where / "train.jsonl"), "--report", str(where / "report.jsonl"), *extra)
        info_path.write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1),
                                         "summary": printed.strip().splitlines()}))
    run = where / "run"
    if not (run / "final").exists():
        (where / "recipe.yaml").write_text(RECIPE.format(out=run, train=where / "train.jsonl", steps=steps))
        started = time.perf_counter()
        posttrain("sft", str(where / "recipe.yaml"))
        (where / "train_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}")
    return json.loads(info_path.read_text())


def evaluate(model: str, out: Path, path: Path, questions: int) -> dict:
    """Per-example loss and accuracy of one model, kept on disk (``path``) for pairing."""
    if path.exists():
        return json.loads(path.read_text())
    from posttrain.evaluate.config import EvalOptions
    from posttrain.evaluate.model import EvalModel
    from posttrain.evaluate.tasks import EVAL_TASKS, EvalContext

    spec = EvalModel(model)
    loss = EVAL_TASKS.resolve("perplexity").fn(spec, str(out / "dev.jsonl"), EvalContext(EvalOptions(limit=None)))
    acc = EVAL_TASKS.resolve("answer_accuracy").fn(spec, str(out / "dev.jsonl"),
                                                   EvalContext(EvalOptions(limit=questions, max_new_tokens=256)))
    nll, tokens = loss.per_example["loss"]
    result = {"nll": nll.tolist(), "tokens": tokens.tolist(),
              **{name: acc.per_example[name][0].tolist() for name in ("accuracy", "format", "truncated")}}
    path.write_text(json.dumps(result))
    return result


def summarize(method: str, result: dict, random: dict | None, selection: dict) -> dict:
    from posttrain.evaluate import stats

    row = {"method": method, "loss": stats.ratio(result["nll"], result["tokens"]).as_dict(),
           **{name: stats.proportion(result[name]).as_dict() for name in ("accuracy", "format", "truncated")},
           "selection_seconds": selection.get("seconds"), "selection": selection.get("summary")}
    if random is not None:
        row["loss_diff"] = stats.paired_difference(result["nll"], random["nll"], result["tokens"]).as_dict()
        for name in ("accuracy", "format", "truncated"):
            row[f"{name}_diff"] = stats.paired_difference(result[name], random[name]).as_dict()
    return row


def cell(estimate: dict, scale: float = 1.0, digits: int = 3) -> str:
    value, low, high = (estimate[k] * scale for k in ("value", "low", "high"))
    return f"{value:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"


def table(rows: list[dict]) -> str:
    """Each metric with its 95% interval; beside it the paired difference from the random selection's model."""
    lines = ["| method | dev loss | vs random | accuracy % | vs random (pp) | `#### N` format % | vs random (pp) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        diffs = [cell(r[k], *scale) if k in r else "-" for k, scale in
                 (("loss_diff", (1.0, 3)), ("accuracy_diff", (100, 1)), ("format_diff", (100, 1)))]
        lines.append(f"| {r['method']} | {cell(r['loss'])} | {diffs[0]} | {cell(r['accuracy'], 100, 1)} | {diffs[1]} | "
                     f"{cell(r['format'], 100, 1)} | {diffs[2]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/selection")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--pool", type=int, default=2000, help="the first N GSM8K train records")
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dev", type=int, default=300, help="dev records evaluated (the rest are zip_fit's target)")
    parser.add_argument("--questions", type=int, default=48, help="dev questions answered greedily")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prepare(out, args.pool, args.dev)
    methods = ["random"] + [m for m in args.methods if m != "random"]
    rows, random = [], None
    for method in methods:
        selection = run_method(method, out, args.budget, args.steps)
        result = evaluate(str(out / method / "run" / "final"), out, out / method / "eval.json", args.questions)
        random = random or result
        rows.append(summarize(method, result, None if method == "random" else random, selection))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
