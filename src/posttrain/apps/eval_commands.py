"""Commands that measure: ``eval`` (registered tasks with intervals), ``evaluate`` (answer accuracy) and ``report``."""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import ValidationError

from posttrain.apps.report import watch, write_report
from posttrain.apps.spec import Arg, CliCommand, arg
from posttrain.core.config import format_validation_error
from posttrain.core.errors import UserError
from posttrain.evaluate.config import EvalOptions
from posttrain.evaluate.harness import data_for_tasks, format_results, run_eval, write_results
from posttrain.evaluate.model import EvalModel
from posttrain.evaluate.tasks import EVAL_TASKS


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def eval_option_args() -> tuple[Arg, ...]:
    """One flag per :class:`EvalOptions` field, with its default and description."""
    out = []
    for name, spec in EvalOptions.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = spec.get_default(call_default_factory=True)
        if isinstance(default, list):
            out.append(arg(flag, type=_list, default=None, metavar="A,B", help=spec.description))
        else:
            kind = float if isinstance(default, float) else int if isinstance(default, int) else str
            shown = f" (default {default})" if default is not None else ""
            out.append(arg(flag, type=kind, default=None, help=spec.description + shown))
    return tuple(out)


def eval_options(args) -> EvalOptions:
    given = {name: getattr(args, name) for name in EvalOptions.model_fields if getattr(args, name, None) is not None}
    try:
        return EvalOptions.model_validate(given)
    except ValidationError as exc:
        raise UserError("eval: invalid options\n" + format_validation_error(exc, EvalOptions)) from None


def cmd_eval(args) -> int:
    options = eval_options(args)
    data = data_for_tasks(args.tasks, args.data)
    model = EvalModel(args.model, batch_size=options.batch_size, cache=not args.no_cache)
    baseline = (EvalModel(args.baseline, batch_size=options.batch_size, cache=not args.no_cache) if args.baseline
                else None)
    results = run_eval(model, args.tasks, data, options, baseline)
    print("\n" + format_results(results))
    if args.out:
        write_results(results, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    options = EvalOptions(limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    results = run_eval(EvalModel(args.model, batch_size=args.batch_size), ["answer_accuracy"],
                       {"answer_accuracy": args.data}, options)
    accuracy = results["tasks"]["answer_accuracy"]["metrics"]["accuracy"]
    correct = round(accuracy["value"] * accuracy["n"])
    print(f"accuracy: {accuracy['value']:.3f} ({correct}/{accuracy['n']}), 95% interval [{accuracy['low']:.3f}, "
          f"{accuracy['high']:.3f}]")
    return 0


def cmd_report(args) -> int:
    if not 0 <= args.smooth < 1:
        raise UserError("report: --smooth must be in [0, 1)")
    out = args.out or (str(Path(args.run_dirs[0]) / "report.html") if len(args.run_dirs) == 1 else "report.html")
    if args.watch:
        try:
            watch(args.run_dirs, out, args.smooth, args.interval)
        except KeyboardInterrupt:
            print(f"stopped watching; {out} is the last page written")
        return 0
    started = time.perf_counter()
    write_report(args.run_dirs, out, args.smooth)
    print(f"wrote {out} ({time.perf_counter() - started:.1f}s)")
    return 0


def tasks_help() -> str:
    listed = "\n".join(f"  {name:20s}{task.about}" for name, task in sorted(EVAL_TASKS.items()))
    return f"tasks (or module:function):\n{listed}"


COMMANDS = (
    CliCommand("eval", "evaluate a model on registered tasks, with 95%% intervals and a paired comparison to a "
               "baseline", cmd_eval, epilog=tasks_help, raw=True, args=(
                   arg("model", help="'default', a HF directory, a run directory or a .gguf file"),
                   arg("tasks", nargs="+", metavar="TASK", help="one or more tasks (see below)"),
                   arg("--data", action="append", default=[], metavar="[TASK=]FILE",
                       help="the data of every task, or of one task as TASK=FILE (repeat)"),
                   arg("--baseline",
                       help="a model to compare with, example by example (win_rate and forgetting need it)"),
                   arg("--out", help="write the results as JSON (e.g. results.json)"),
                   arg("--no-cache", action="store_true",
                       help="generate again instead of reusing cached generations"),
                   *eval_option_args())),
    CliCommand("evaluate", "answer accuracy on {prompt, answer} records (e.g. GSM8K); `posttrain eval MODEL "
               "answer_accuracy` with more", cmd_evaluate, args=(
                   arg("model"),
                   arg("--data", required=True, help="records with a prompt and a reference answer"),
                   arg("--limit", type=int, default=100, help="evaluate the first N records"),
                   arg("--max-new-tokens", type=int, default=256),
                   arg("--batch-size", type=int, default=16))),
    CliCommand("report", "one HTML page with plots of one or more runs (overlaid), eval metrics with intervals, a "
               "summary table and sample generations", cmd_report, args=(
                   arg("run_dirs", nargs="+", metavar="RUN_DIR"),
                   arg("--out", default=None,
                       help="the HTML file (default: RUN_DIR/report.html for one run, report.html for several)"),
                   arg("--smooth", type=float, default=0.6,
                       help="exponential smoothing weight of training curves in [0, 1) (0: raw)"),
                   arg("--watch", action="store_true", help="rewrite the page as the runs log (refresh to see it)"),
                   arg("--interval", type=float, default=10.0, help="--watch: seconds between checks"))),
)
