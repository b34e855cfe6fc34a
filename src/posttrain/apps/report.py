"""``posttrain report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page (plots inlined as PNG) of what runs did.

It reads what every run directory holds: ``recipe.yaml`` (its first line names the command), ``metrics.jsonl``
(loss, learning rate, gradient norm, tokens/s, peak memory and the method's own metrics), ``eval.jsonl`` (held-out
metrics, with ``_low`` / ``_high`` intervals from recipe ``evals``), ``samples.jsonl`` (generations at each
evaluation) and, when present, ``results.json`` from ``posttrain eval --out RUN_DIR/results.json``. Several runs
share axes, one colour each. ``--watch`` rewrites the page as the runs write their logs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.core.errors import UserError
from posttrain.evaluate.harness import format_results

TRAINING = [("loss", "training loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"),
            ("tokens_per_s", "tokens / s"), ("memory_gb", "peak memory (GB)")]
NOT_PLOTTED = {"step", "epoch", "tokens", "elapsed_s"}
NOT_SMOOTHED = {"lr", "memory_gb"}  # schedules and running maxima: smoothing would only distort them
INTERVAL_SUFFIXES = ("_low", "_high")


@dataclass
class Run:
    name: str
    path: Path
    command: str = "?"
    recipe: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    results: dict | None = None


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line a running job is writing right now
    return out


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / "metrics.jsonl").exists() and not (path / "results.json").exists():
        raise UserError(f"report: {path} is not a run directory (no metrics.jsonl or results.json)")
    run = Run(path.name or str(path), path)
    recipe = path / "recipe.yaml"
    if recipe.exists():
        text = recipe.read_text()
        first = text.splitlines()[0] if text else ""
        run.command = first.split()[-1] if first.startswith("# posttrain") else "?"
        run.recipe = yaml.safe_load(text) or {}
    run.metrics, run.evals, run.samples = (_jsonl(path / f) for f in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"))
    if (path / "results.json").exists():
        run.results = json.loads((path / "results.json").read_text())
    return run


def smoothed(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average (weight 0: the raw values)."""
    out, last, norm = [], 0.0, 0.0
    for value in values:
        last, norm = last * weight + (1 - weight) * value, norm * weight + (1 - weight)
        out.append(last / norm if norm else value)
    return out


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return [p[0] for p in points], [p[1] for p in points]


def plot(title: str, runs: list[Run], key: str, source: str, smooth: float) -> str | None:
    """One PNG (base64) of ``key`` against the step for every run that logged it; None if none did."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.0), dpi=100)
    drawn = False
    for i, run in enumerate(runs):
        records = run.metrics if source == "metrics" else run.evals
        steps, values = _series(records, key)
        if not steps:
            continue
        colour, drawn = f"C{i % 10}", True
        if source == "eval":
            low, high = _series(records, f"{key}_low")[1], _series(records, f"{key}_high")[1]
            if len(low) == len(high) == len(values):
                ax.fill_between(steps, low, high, color=colour, alpha=0.15, linewidth=0)
            ax.plot(steps, values, "o-", color=colour, label=run.name, markersize=4)
        elif smooth > 0 and len(values) > 2 and key not in NOT_SMOOTHED:
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
            ax.plot(steps, smoothed(values, smooth), color=colour, label=run.name, linewidth=1.6)
        else:
            ax.plot(steps, values, color=colour, label=run.name, linewidth=1.6)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def method_keys(runs: list[Run]) -> list[str]:
    """The method's own per-step metrics: everything numeric besides the common curves and timings."""
    common = {key for key, _ in TRAINING} | NOT_PLOTTED
    keys = {k for run in runs for r in run.metrics for k, v in r.items() if isinstance(v, (int, float))}
    return sorted(k for k in keys if k not in common and not k.startswith("time/"))


def eval_keys(runs: list[Run]) -> list[str]:
    keys = {k for run in runs for r in run.evals for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}
    return sorted(k for k in keys if not k.endswith(INTERVAL_SUFFIXES))


def summary_rows(runs: list[Run]) -> list[list[str]]:
    """One row per run: what it was (command, model, method, adapters, lr, batch) and what it did."""
    rows = [["run", "command", "model", "method", "peft", "lr", "batch", "steps", "wall time", "tokens/s",
             "peak memory", "first -> last loss", "last eval"]]
    for run in runs:
        r, last = run.recipe, run.metrics[-1] if run.metrics else {}
        method = next((f"{section}: {r[section][key]}" for section, key in (("loss", "name"), ("sft", "loss"),
                       ("rl", "advantage"), ("rm", "loss")) if isinstance(r.get(section), dict) and key in r[section]),
                      "")
        peft = (r.get("peft") or {}).get("method", "")
        train = r.get("train") or {}
        losses = [m["loss"] for m in run.metrics if isinstance(m.get("loss"), (int, float))]
        final_eval = run.evals[-1] if run.evals else {}
        shown = [f"{k} {v:.4g}" + (f" [{final_eval[k + '_low']:.3g}, {final_eval[k + '_high']:.3g}]"
                                   if k + "_low" in final_eval else "")
                 for k, v in final_eval.items() if k != "step" and not k.endswith(INTERVAL_SUFFIXES)][:4]
        rows.append(
            [
                run.name,
                run.command,
                str(r.get("model", "")),
                method,
                str(peft),
                str(train.get("lr", "")),
                str(train.get("batch_size", "")),
                str(last.get("step", "")),
                _duration(last.get("elapsed_s")),
                f"{last['tokens'] / last['elapsed_s']:.0f}" if last.get("elapsed_s") else "",
                f"{max(m.get('memory_gb', 0) for m in run.metrics):.2f} GB"
                if any("memory_gb" in m for m in run.metrics)
                else "",
                f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "",
                "; ".join(shown),
            ]
        )
    return rows


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m {s:02d}s"


def _table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _results_tables(runs: list[Run]) -> str:
    """``posttrain eval`` results saved in a run directory: estimates, baseline and paired differences."""
    parts = []
    for run in runs:
        if run.results:
            against = f" against {run.results['baseline']}" if run.results.get("baseline") else ""
            parts.append(f"<h3>{html.escape(run.name)}: posttrain eval of {html.escape(str(run.results['model']))}"
                         f"{html.escape(against)}</h3><pre>{html.escape(format_results(run.results))}</pre>")
    return "".join(parts)


def _samples(runs: list[Run]) -> str:
    """Generations before and after: the first and last evaluation's samples, and eval results' examples with
    the baseline's replies to the same prompts."""
    parts = []
    for run in runs:
        if run.samples:
            first, last = min(s["step"] for s in run.samples), max(s["step"] for s in run.samples)
            before = [s for s in run.samples if s["step"] == first]
            after = {(s["task"], s["prompt"]): s for s in run.samples if s["step"] == last}
            for s in before:
                later = after.get((s["task"], s["prompt"]))
                parts.append(_sample_card(run.name, s["prompt"], [(f"step {first}", s), (f"step {last}", later)]))
        for task, entry in (run.results or {}).get("tasks", {}).items():
            base = entry.get("baseline_examples") or [None] * len(entry.get("examples", []))
            for ours, theirs in zip(entry.get("examples", []), base):
                parts.append(_sample_card(f"{run.name} ({task})", ours["prompt"],
                                          [("baseline", theirs), ("model", ours)] if theirs else [("model", ours)]))
    return "".join(parts)


def _sample_card(title: str, prompt: str, sides: list[tuple[str, dict | None]]) -> str:
    columns = "".join(
        f"<div class='side'><b>{html.escape(label)}</b>"
        + (f" <span class='tag'>{'correct' if s.get('correct') else 'wrong'}</span>" if s and "correct" in s else "")
        + f"<pre>{html.escape(s['completion'] if s else '(none)')}</pre></div>" for label, s in sides)
    return (f"<div class='card'><div class='title'>{html.escape(title)}</div><pre class='prompt'>"
            f"{html.escape(prompt)}</pre><div class='sides'>{columns}</div></div>")


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px} h3{font-size:14px}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f4} .grid{display:flex;flex-wrap:wrap;gap:8px} .grid img{border:1px solid #eee}
pre{white-space:pre-wrap;font-size:12px;background:#fafafa;padding:6px;margin:4px 0}
.card{border:1px solid #ddd;margin:10px 0;padding:8px} .title{font-weight:600;font-size:13px}
.sides{display:flex;gap:10px} .side{flex:1;min-width:0} .tag{font-size:11px;color:#666} .note{color:#666;font-size:12px}
"""


def render(runs: list[Run], smooth: float = 0.6, refresh: int | None = None) -> str:
    def grid(items: list[tuple[str, str, str]]) -> str:
        images = [(title, plot(title, runs, key, source, smooth)) for title, key, source in items]
        return "<div class='grid'>" + "".join(f"<img alt='{html.escape(t)}' src='data:image/png;base64,{png}'>"
                                              for t, png in images if png) + "</div>"

    names = ", ".join(html.escape(r.name) for r in runs)
    meta = f"<meta http-equiv='refresh' content='{refresh}'>" if refresh else ""
    sections = [f"<h1>posttrain report: {names}</h1><p class='note'>written {time.strftime('%Y-%m-%d %H:%M:%S')}; "
                f"curves smoothed with weight {smooth} (faint: raw); eval bands: 95% intervals</p>",
                "<h2>Summary</h2>" + _table(summary_rows(runs))]
    if any(r.metrics for r in runs):
        sections.append("<h2>Training</h2>" + grid([(title, key, "metrics") for key, title in TRAINING]))
        method = method_keys(runs)
        if method:
            sections.append("<h2>Method metrics</h2>" + grid([(key, key, "metrics") for key in method]))
    if eval_keys(runs):
        sections.append("<h2>Evaluation</h2>" + grid([(key, key, "eval") for key in eval_keys(runs)]))
    results = _results_tables(runs)
    if results:
        sections.append("<h2>posttrain eval results</h2>" + results)
    samples = _samples(runs)
    if samples:
        sections.append("<h2>Generations before / after</h2>" + samples)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{meta}<title>posttrain report: {names}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")


def write_report(run_dirs: list[str], out: str, smooth: float = 0.6, refresh: int | None = None) -> Path:
    runs = [load_run(d) for d in run_dirs]
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + ".tmp")
    staging.write_text(render(runs, smooth, refresh))
    staging.replace(target)  # a browser refreshing mid-write never sees half a page
    return target


def watch(run_dirs: list[str], out: str, smooth: float = 0.6, interval: float = 10.0) -> None:
    """Rewrite the page whenever a run's logs change, until interrupted."""
    logs = [Path(d) / f for d in run_dirs for f in ("metrics.jsonl", "eval.jsonl", "samples.jsonl", "results.json")]
    seen = None
    print(f"watching {', '.join(run_dirs)}: {out} is rewritten as they change (refresh the page; Ctrl-C stops)")
    while True:
        state = [(p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None for p in logs]
        if state != seen:
            write_report(run_dirs, out, smooth, refresh=int(interval))
            seen = state
        time.sleep(interval)
