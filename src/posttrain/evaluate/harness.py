"""``posttrain eval``: run registered tasks on a model (and a baseline), compare them example by example, print a
table of estimates with intervals and write them as JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.core.errors import UserError
from posttrain.evaluate import stats
from posttrain.evaluate.model import EvalModel
from posttrain.evaluate.tasks import EVAL_TASKS, EvalContext, EvalOptions, TaskResult


def data_for_tasks(tasks: list[str], data: list[str]) -> dict[str, str | None]:
    """``--data FILE`` serves every task; ``--data TASK=FILE`` one task (and wins over a plain FILE)."""
    shared = [d for d in data if d.partition("=")[0] not in tasks]
    if len(shared) > 1:
        raise UserError(f"eval: several --data files ({', '.join(shared)}) without TASK=; name the task of each")
    out = {}
    for task in tasks:
        named = [d.partition("=")[2] for d in data if d.partition("=")[0] == task]
        out[task] = named[-1] if named else (shared[0] if shared else None)
        if out[task] is None and EVAL_TASKS.resolve(task).needs_data:
            raise UserError(f"eval: task {task} needs --data FILE (or --data {task}=FILE)")
    return out


def verdict(difference: stats.Estimate, better: int) -> str:
    if not difference.excludes_zero():
        return "no difference shown"
    up = difference.value > 0
    if better == 0:
        return "higher" if up else "lower"
    return "better" if up == (better > 0) else "worse"


def compare(result: TaskResult, base: TaskResult) -> tuple[dict[str, stats.Estimate], dict[str, str]]:
    """(paired differences model - baseline of the metrics both measured example by example, why the others were
    not paired)."""
    out, unpaired = {}, {}
    for name, (values, denominators) in result.per_example.items():
        if name not in base.per_example:
            continue
        base_values, base_denominators = base.per_example[name]
        if len(values) != len(base_values):
            unpaired[name] = f"different numbers of examples ({len(values)} vs {len(base_values)})"
        elif denominators is not None and not (base_denominators is not None
                                               and (denominators == base_denominators).all()):
            unpaired[name] = "the two models tokenize the examples differently: per-token values do not pair"
        else:
            out[name] = stats.paired_difference(values, base_values, denominators)
    return out, unpaired


def run_eval(model: EvalModel, tasks: list[str], data: dict[str, str | None], options: EvalOptions,
             baseline: EvalModel | None = None, say=print) -> dict:
    """Every task on ``model`` (and ``baseline``), as a JSON-ready dict."""
    unread = EVAL_TASKS.unread_options(options, tasks)
    if unread:
        raise UserError(f"eval: {', '.join('--' + n.replace('_', '-') for n in unread)} not read by "
                        f"{', '.join(tasks)}")
    ctx = EvalContext(options, baseline)
    out: dict = {"model": model.name, "baseline": baseline.name if baseline else None,
                 "options": options.model_dump(), "tasks": {}}
    for name in tasks:
        task = EVAL_TASKS.resolve(name)
        if task.needs_baseline and baseline is None:
            raise UserError(f"eval: task {name} compares with a baseline: give --baseline MODEL")
        started = time.perf_counter()
        say(f"eval: {name} on {model.name}" + (f" ({data[name]})" if data.get(name) else ""))
        result = task.fn(model, data.get(name), ctx)
        entry = {"data": data.get(name), "metrics": {k: v.as_dict() for k, v in result.metrics.items()},
                 "better": result.better, "examples": result.examples, "info": result.info}
        if baseline is not None and not task.needs_baseline:
            say(f"eval: {name} on the baseline {baseline.name}")
            base = task.fn(baseline, data.get(name), ctx)
            entry["baseline"] = {k: v.as_dict() for k, v in base.metrics.items()}
            differences, unpaired = compare(result, base)
            entry["difference"] = {k: {**v.as_dict(), "verdict": verdict(v, result.better.get(k, 0))}
                                   for k, v in differences.items()}
            if unpaired:
                entry["not_paired"] = unpaired
            entry["baseline_examples"] = base.examples
        entry["seconds"] = round(time.perf_counter() - started, 1)
        out["tasks"][name] = entry
    return out


def recipe_evals(specs: list, model, tokenizer, baselines: dict) -> tuple[dict[str, float], list[dict]]:
    """A recipe's ``evals`` on the model being trained: metrics flattened for eval.jsonl (``eval/TASK/METRIC`` with
    ``_low`` / ``_high``, and ``_diff`` with its interval against a baseline), and example generations for
    samples.jsonl. Nothing is cached: the weights move."""
    flat: dict[str, float] = {}
    samples: list[dict] = []
    for spec in specs:
        options = EvalOptions(**spec.model_dump(exclude={"task", "data", "baseline"}))
        baseline = baselines.setdefault(spec.baseline, EvalModel(spec.baseline, batch_size=options.batch_size)) \
            if spec.baseline else None
        current = EvalModel(model=model, tokenizer=tokenizer, name="the model in training",
                            batch_size=options.batch_size)
        entry = run_eval(current, [spec.task], {spec.task: spec.data}, options, baseline,
                         say=lambda _: None)["tasks"][spec.task]
        for suffix, estimates in (("", entry["metrics"]), ("_diff", entry.get("difference", {}))):
            for metric, e in estimates.items():
                key = f"eval/{spec.task}/{metric}{suffix}"
                flat.update({key: e["value"], f"{key}_low": e["low"], f"{key}_high": e["high"]})
        samples += [{"task": spec.task, **example} for example in entry["examples"]]
    return flat, samples


def _cell(estimate: dict | None) -> str:
    if estimate is None:
        return ""
    return f"{estimate['value']:.4g} [{estimate['low']:.4g}, {estimate['high']:.4g}]"


def format_results(results: dict) -> str:
    """The results as an aligned table: value [95% interval], n, and the paired difference with a baseline."""
    header = ["task", "metric", "n", "model"] + (["baseline", "difference (paired)", ""] if results["baseline"] else [])
    rows = [header]
    for task, entry in results["tasks"].items():
        for metric, estimate in entry["metrics"].items():
            row = [task, metric, str(estimate["n"]), _cell(estimate)]
            if results["baseline"]:
                diff = entry.get("difference", {}).get(metric)
                row += [_cell(entry.get("baseline", {}).get(metric)),
                        (f"{diff['value']:+.4g} [{diff['low']:+.4g}, {diff['high']:+.4g}]" if diff else ""),
                        diff["verdict"] if diff else ""]
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{task} {metric}: not paired: {why}" for task, entry in results["tasks"].items()
              for metric, why in entry.get("not_paired", {}).items()]
    lines.append("(95% intervals: Wilson for proportions, bootstrap otherwise; differences by the paired bootstrap)")
    return "\n".join(lines)


def write_results(results: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
