"""``posttrain <command> RECIPE.yaml [key=value ...]`` and the model-trying commands.

User errors (recipe, data, environment) print one clear message and exit with code 2, no
traceback; a training run stopped by SIGTERM / SIGINT checkpoints and exits with code 75.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from posttrain.errors import Stopped, UserError

def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calling a deprecated alias
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        if os.environ.get("RANK", "0") == "0":  # every process stops; one says how to resume
            print(f"posttrain: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact; run the same command again to resume", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    from posttrain import __version__

    parser = argparse.ArgumentParser(prog="posttrain", description="Post-training for language models.")
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from posttrain.commands import COMMANDS

    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.summary, description=command.summary, epilog=recipe_help(name),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("recipe", help="a recipe YAML file, or the name of a shipped recipe (see `posttrain recipes`)")
        sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=5e-5 peft.method=dora")
        sub.set_defaults(handler=lambda a, name=name: cmd_train(name, a))

    gen = commands.add_parser("generate", help="generate replies, optionally with inference-time alignment",
                              description="Generate replies. Inference-time alignment: --best-of N with --reward, "
                              "--vote N (self-consistency, weighted by --reward if given), --urial (a base model aligned "
                              "in context), --nudge MODEL (an aligned model writes where the base is unsure), "
                              "--guided-chunks M (reward-guided decoding over chunks of M tokens).")
    gen.add_argument("model", help="'default', a HF directory, a run directory, a .gguf file or a hub id")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--data", help="prompts from a data file ({prompt, ...}; other fields reach reward functions)")
    gen.add_argument("--limit", type=int, default=None, help="use the first N records of --data")
    gen.add_argument("--out", help="write one JSON line per prompt (completion, candidates, scores, ...)")
    add_sampling_args(gen)
    gen.add_argument("--best-of", type=int, default=None, metavar="N", help="sample N replies, keep the best by --reward")
    gen.add_argument("--vote", type=int, default=None, metavar="N", help="sample N replies, answer by majority vote over "
                     "their final answers (weighted by --reward when given: scores in [0, 1] as they are, others through a sigmoid)")
    gen.add_argument("--reward", help="a reward model or PRM directory / run, or a reward function name (math_answer, "
                   "format, length, ... or module:function)")
    gen.add_argument("--aggregate", default=None, choices=["min", "last", "mean", "prod"],
                     help="how a process reward model combines step scores (default min)")
    gen.add_argument("--urial", nargs="?", const="", default=None, metavar="FILE",
                     help="URIAL: prompt a base model with the shipped (or FILE's) system text and examples")
    gen.add_argument("--nudge", metavar="MODEL", help="nudging: this aligned model writes the next word wherever the "
                     "base model's top-1 probability is below --nudge-threshold")
    gen.add_argument("--nudge-threshold", type=float, default=0.4)
    gen.add_argument("--guided-chunks", type=int, default=None, metavar="M",
                     help="reward-guided decoding: sample --candidates continuations of M tokens, keep the best by --reward")
    gen.add_argument("--candidates", type=int, default=4, metavar="K")
    gen.set_defaults(handler=cmd_generate)

    score = commands.add_parser("score", help="score a data file with a reward model or process reward model")
    score.add_argument("model", help="a reward model (posttrain rm) or process reward model (posttrain prm) directory / run")
    score.add_argument("data", help="pairs, {prompt, responses}, {prompt, completion} or {prompt, completions: [steps]}")
    score.add_argument("--out", required=True, help="scores.jsonl: each record with its scores")
    score.add_argument("--limit", type=int, default=None, help="score the first N records")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--aggregate", default=None, choices=["min", "last", "mean", "prod"],
                       help="how a process reward model combines step scores into a solution score (default min)")
    score.set_defaults(handler=cmd_score)

    chat = commands.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("model", help="'default', a HF directory, a run directory, a .gguf file or a hub id")
    chat.add_argument("--system", default=None, help="a system prompt")
    add_sampling_args(chat)
    chat.set_defaults(handler=cmd_chat)

    merge = commands.add_parser("merge", help="merge models in weight space (soups, slerp, task arithmetic, TIES, "
                                "DARE, model stock, LiNeS, WiSE-FT, fine-tuning transfer)",
                                epilog=merge_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("recipe", help="a merge recipe YAML file")
    merge.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=ties density=0.3")
    merge.set_defaults(handler=cmd_merge)

    export = commands.add_parser("export", help="write a standalone HF model (adapters merged) or one GGUF file")
    export.add_argument("run_dir", help="a run directory (uses final/, or --checkpoint), a model directory or 'default'")
    export.add_argument("--out", required=True, help="output directory (hf) or file (gguf, e.g. model.gguf)")
    export.add_argument("--checkpoint", default=None, help="export checkpoints/step-N instead of final/")
    export.add_argument("--format", choices=("hf", "gguf"), default="hf",
                        help="hf: a transformers directory; gguf: one file for llama.cpp / Ollama / LM Studio "
                             "(llama architecture)")
    export.add_argument("--quant", choices=("q8_0", "f16", "f32"), default="q8_0",
                        help="gguf: weight type of the matrices (norms stay f32)")
    export.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                        help="gguf: llama.cpp's pre-tokenizer name, for a tokenizer it does not know by fingerprint")
    export.set_defaults(handler=cmd_export)

    from posttrain.evaluate.tasks import EVAL_TASKS

    tasks_help = "\n".join(f"  {name:20s}{task.about}" for name, task in sorted(EVAL_TASKS.items()))
    ev = commands.add_parser("eval", help="evaluate a model on registered tasks, with 95%% intervals and a paired "
                             "comparison to a baseline", formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=f"tasks (or module:function):\n{tasks_help}")
    ev.add_argument("model", help="'default', a HF directory, a run directory or a .gguf file")
    ev.add_argument("tasks", nargs="+", metavar="TASK", help="one or more tasks (see below)")
    ev.add_argument("--data", action="append", default=[], metavar="[TASK=]FILE",
                    help="the data of every task, or of one task as TASK=FILE (repeat)")
    ev.add_argument("--baseline", help="a model to compare with, example by example (win_rate and forgetting need it)")
    ev.add_argument("--out", help="write the results as JSON (e.g. results.json)")
    ev.add_argument("--no-cache", action="store_true", help="generate again instead of reusing cached generations")
    add_eval_options(ev)
    ev.set_defaults(handler=cmd_eval)

    evaluate = commands.add_parser("evaluate", help="answer accuracy on {prompt, answer} records (e.g. GSM8K); "
                                   "`posttrain eval MODEL answer_accuracy` with more")
    evaluate.add_argument("model")
    evaluate.add_argument("--data", required=True, help="records with a prompt and a reference answer")
    evaluate.add_argument("--limit", type=int, default=100, help="evaluate the first N records")
    evaluate.add_argument("--max-new-tokens", type=int, default=256)
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.set_defaults(handler=cmd_evaluate)

    report = commands.add_parser("report", help="one HTML page with plots of one or more runs (overlaid), eval "
                                 "metrics with intervals, a summary table and sample generations")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", default=None, help="the HTML file (default: RUN_DIR/report.html for one run, "
                        "report.html for several)")
    report.add_argument("--smooth", type=float, default=0.6, help="exponential smoothing weight of training curves "
                        "in [0, 1) (0: raw)")
    report.add_argument("--watch", action="store_true", help="rewrite the page as the runs log (refresh to see it)")
    report.add_argument("--interval", type=float, default=10.0, help="--watch: seconds between checks")
    report.set_defaults(handler=cmd_report)

    data = commands.add_parser("data", help="data tools: inspect, convert, select and synthesize training data")
    tools = data.add_subparsers(dest="tool", required=True, metavar="TOOL")
    inspect = tools.add_parser("inspect", help="counts, token lengths per field (the model's tokenizer and chat "
                               "template), truncation at --max-length, duplicates and every format error")
    inspect.add_argument("file", help="a data file (.jsonl, .json, .parquet, .csv, a saved dataset or pkg:assets/...)")
    inspect.add_argument("--model", default="default", help="whose tokenizer and chat template count the tokens")
    inspect.add_argument("--max-length", type=int, default=1024, help="count the examples this length would truncate")
    inspect.add_argument("--format", choices=("auto", "sft", "preference", "unpaired", "ranked"), default="auto")
    inspect.add_argument("--chat-template", default=None, help="'chatml' or a Jinja string (default: the tokenizer's)")
    inspect.add_argument("--limit", type=int, default=None, help="inspect the first N records")
    inspect.add_argument("--out", default=None, help="write the full report (every error) as JSON")
    inspect.set_defaults(handler=cmd_data_inspect)
    convert = tools.add_parser("convert", help="convert between sft, preference and unpaired records (GSM8K and "
                               "HH-RLHF layouts read too)")
    convert.add_argument("file")
    convert.add_argument("--to", required=True, choices=("sft", "preference", "unpaired"))
    convert.add_argument("--out", required=True, help="the converted records (JSON lines)")
    convert.add_argument("--limit", type=int, default=None, help="convert the first N records")
    convert.set_defaults(handler=cmd_data_convert)
    from posttrain.data.select import SELECTORS

    pick = tools.add_parser("select", help="filter (duplicates, length), score and pick a budget of SFT records",
                            description=(__import__("posttrain.data.select", fromlist=["x"]).__doc__ or ""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    pick.add_argument("file")
    pick.add_argument("--budget", type=int, required=True, help="records to keep")
    pick.add_argument("--method", choices=SELECTORS, default="random")
    pick.add_argument("--out", required=True, help="the kept records, as read, in file order")
    pick.add_argument("--report", default=None, help="every record's scores and fate (JSON lines)")
    pick.add_argument("--model", default="default", help="the model that scores (loss, ifd) and tokenizes")
    pick.add_argument("--target", default=None, help="zip_fit: records of the data to align with")
    pick.add_argument("--dedup", choices=("none", "exact", "minhash"), default="exact",
                      help="remove exact duplicates, and with minhash near duplicates too")
    pick.add_argument("--near-threshold", type=float, default=0.8, help="minhash: estimated Jaccard similarity")
    pick.add_argument("--min-tokens", type=int, default=0)
    pick.add_argument("--max-tokens", type=int, default=None)
    pick.add_argument("--prefer", choices=("high", "low"), default="high", help="loss: keep the highest or lowest")
    pick.add_argument("--similarity", type=float, default=0.9, help="deita: the cosine similarity to an already "
                      "taken record at which a record is skipped")
    pick.add_argument("--max-length", type=int, default=1024, help="tokens per record when the model scores it")
    pick.add_argument("--seed", type=int, default=0)
    pick.add_argument("--limit", type=int, default=None, help="read the first N records")
    pick.set_defaults(handler=cmd_data_select)
    synth = tools.add_parser("synth", help="make training data with a model: magpie instructions, on-policy pairs, "
                             "rejection-sampled SFT", description=__import__("posttrain.data.synth", fromlist=["x"]).__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("mode", choices=("magpie", "pairs", "rejection"))
    synth.add_argument("model", help="'default', a HF directory, a run directory or a .gguf file")
    synth.add_argument("--out", required=True, help="the records (JSON lines)")
    synth.add_argument("--count", type=int, default=None, help="magpie: instructions to sample (default 100)")
    synth.add_argument("--system", default=None, help="magpie: a system prompt in the template")
    synth.add_argument("--data", default=None, help="pairs / rejection: the prompts ({prompt, ...}, GSM8K layout too)")
    synth.add_argument("--reward", default=None, help="pairs / rejection: a reward function (math_answer, ...), "
                       "module:function, or a reward model / PRM directory")
    synth.add_argument("--samples", type=int, default=4, help="pairs / rejection: completions per prompt")
    synth.add_argument("--threshold", type=float, default=None, help="rejection: the reward to reach (default 1.0)")
    synth.add_argument("--keep", type=int, default=None, help="rejection: distinct accepted completions per prompt (default 1)")
    synth.add_argument("--limit", type=int, default=None, help="pairs / rejection: the first N prompts")
    synth.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    synth.add_argument("--top-p", type=float, default=1.0)
    synth.add_argument("--response-temperature", type=float, default=0.0, help="magpie: responses (0: greedy)")
    synth.add_argument("--max-new-tokens", type=int, default=256)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--batch-size", type=int, default=16)
    synth.set_defaults(handler=cmd_data_synth)

    recipes = commands.add_parser("recipes", help="list the shipped example recipes")
    recipes.set_defaults(handler=cmd_recipes)

    quick = commands.add_parser("quickstart", help="fine-tune the embedded model on GSM8K and compare before / after")
    quick.add_argument("--out", default="runs/quickstart", help="run directory")
    quick.add_argument("--questions", type=int, default=48, help="held-out questions to score")
    quick.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart recipe")
    quick.set_defaults(handler=cmd_quickstart)
    return parser


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy (the default, except 0.8 where "
                        "several samples are drawn)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--no-chat", action="store_true", help="raw text prompt, no chat template")


def recipe_help(command: str) -> str:
    from posttrain.commands import COMMANDS
    from posttrain.config import describe_schema, section_type

    schema = COMMANDS[command].schema
    lines = ["recipe keys (default, meaning):", *describe_schema(schema)]
    loss = section_type(schema.model_fields["loss"]) if "loss" in schema.model_fields else None
    if loss is not None:
        from posttrain.objectives import REGISTRIES

        lines += ["", "losses (loss.name) with their settings and the papers' defaults, used for every loss.* key "
                  "the recipe leaves unset:", *REGISTRIES[loss.family].describe()]
    if "rl" in schema.model_fields:
        from posttrain.objectives.advantages import ADVANTAGES
        from posttrain.objectives.policy import POLICY_LOSSES
        from posttrain.rewards import REWARDS

        lines += ["", "advantage estimators (rl.advantage) with their settings and defaults:", *ADVANTAGES.describe(),
                  "", "policy losses (rl.policy_loss) with their settings and defaults:", *POLICY_LOSSES.describe(),
                  "", "rewards (rewards: [{name, weight, options}]), or module:function:",
                  *[f"  {name:14s} {(fn.__doc__ or '').split(chr(10))[0]}" for name, fn in sorted(REWARDS.items())],
                  "", "variants as recipe keys: Dr. GRPO = rl.advantage dr_grpo + rl.aggregation seq_mean_token_sum_norm; "
                  "DAPO = rl.epsilon_high 0.28 + rl.dynamic_sampling resample + rl.overlong_buffer + token_mean; "
                  "GSPO = rl.policy_loss gspo + seq_mean_token_mean; RLOO = rl.advantage rloo + rl.policy_loss reinforce"]
    return "\n".join(lines)


def merge_help() -> str:
    from posttrain.config import describe_schema
    from posttrain.merge.run import MergeRecipe

    return "\n".join(["recipe keys (default, meaning):", *describe_schema(MergeRecipe)])


def cmd_merge(args) -> int:
    import yaml
    from pydantic import ValidationError

    from posttrain.config import apply_override, format_validation_error, parse_override
    from posttrain.merge.run import MergeRecipe, run_merge

    try:
        tree = yaml.safe_load(Path(args.recipe).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"merge: cannot read {args.recipe}: {exc}") from None
    for override in args.overrides:
        apply_override(tree, *parse_override(override))
    try:
        recipe = MergeRecipe.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"{args.recipe}: invalid merge recipe\n" + format_validation_error(exc, MergeRecipe)) from None
    print(f"merged model: {run_merge(recipe)}")
    return 0


def cmd_train(command: str, args) -> int:
    from posttrain.config import load_recipe
    from posttrain.train.run import run

    recipe = load_recipe(command, args.recipe, args.overrides)
    run(command, recipe)
    return 0


def load_for_inference(spec: str):
    from posttrain.models import load_model, load_tokenizer, resolve_model

    path = resolve_model(spec)  # a run directory stands for its final/ model
    return load_model(path), load_tokenizer(path)


def cmd_generate(args) -> int:
    from posttrain.infer.cli import generate_command

    return generate_command(args)


def cmd_score(args) -> int:
    import json

    from posttrain.data.load import read_records
    from posttrain.infer.score import score_records, summarize
    from posttrain.rewards.model import load_scorer

    options = {"aggregate": args.aggregate} if args.aggregate else {}
    scorer = load_scorer(args.model, batch_size=args.batch_size, **options)
    from posttrain.data.adapters import adapt

    records = [(args.data, where, adapt("auto", record, args.data, where)) for where, record in read_records(args.data, args.limit)]
    scored = score_records(scorer, records, args.batch_size, progress=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in scored))
    print("\n".join(summarize(scored)) + f"\nwrote {args.out}")
    return 0


def cmd_chat(args) -> int:
    from posttrain.rollout.generate import generate

    model, tokenizer = load_for_inference(args.model)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message, an empty line or Ctrl-D to quit, /reset to start over")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, [history], args.max_new_tokens, args.temperature or 0.0, args.top_p)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")
    return 0


def cmd_export(args) -> int:
    from posttrain.export import export_checkpoint, export_gguf, export_merged

    if args.run_dir != "default" and not Path(args.run_dir).exists():
        raise UserError(f"export: {args.run_dir} does not exist")
    if args.format == "gguf":
        summary = export_gguf(args.run_dir, Path(args.out), args.quant, args.checkpoint, args.tokenizer_pre)
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(summary["tensors"].items()))
        print(f"exported {args.out} ({summary['bytes'] / 2**20:.1f} MiB; tensors: {kinds})")
        return 0
    if args.checkpoint:
        export_checkpoint(Path(args.run_dir), args.checkpoint, Path(args.out))
    else:
        export_merged(args.run_dir, Path(args.out))
    print(f"exported a standalone model to {args.out}")
    return 0


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`EvalOptions` field, with its default and description."""
    from posttrain.config import EvalOptions

    for name, spec in EvalOptions.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = spec.get_default(call_default_factory=True)
        if isinstance(default, list):
            parser.add_argument(flag, type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                                metavar="A,B", help=spec.description)
        else:
            kind = float if isinstance(default, float) else int if isinstance(default, int) else str
            shown = f" (default {default})" if default is not None else ""
            parser.add_argument(flag, type=kind, default=None, help=spec.description + shown)


def eval_options(args):
    from pydantic import ValidationError

    from posttrain.config import format_validation_error
    from posttrain.config import EvalOptions

    given = {name: getattr(args, name) for name in EvalOptions.model_fields if getattr(args, name, None) is not None}
    try:
        return EvalOptions.model_validate(given)
    except ValidationError as exc:
        raise UserError("eval: invalid options\n" + format_validation_error(exc, EvalOptions)) from None


def cmd_eval(args) -> int:
    from posttrain.evaluate.harness import data_for_tasks, format_results, run_eval, write_results
    from posttrain.evaluate.model import EvalModel

    options = eval_options(args)
    data = data_for_tasks(args.tasks, args.data)
    model = EvalModel(args.model, batch_size=options.batch_size, cache=not args.no_cache)
    baseline = EvalModel(args.baseline, batch_size=options.batch_size, cache=not args.no_cache) if args.baseline else None
    results = run_eval(model, args.tasks, data, options, baseline)
    print("\n" + format_results(results))
    if args.out:
        write_results(results, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from posttrain.evaluate.harness import run_eval
    from posttrain.evaluate.model import EvalModel
    from posttrain.config import EvalOptions

    options = EvalOptions(limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    results = run_eval(EvalModel(args.model, batch_size=args.batch_size), ["answer_accuracy"], {"answer_accuracy": args.data}, options)
    accuracy = results["tasks"]["answer_accuracy"]["metrics"]["accuracy"]
    correct = round(accuracy["value"] * accuracy["n"])
    print(f"accuracy: {accuracy['value']:.3f} ({correct}/{accuracy['n']}), 95% interval [{accuracy['low']:.3f}, {accuracy['high']:.3f}]")
    return 0


def cmd_report(args) -> int:
    import time

    from posttrain.report import watch, write_report

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


def cmd_data_inspect(args) -> int:
    import json

    from posttrain.data.inspect import format_inspection, inspect_file
    from posttrain.models import load_tokenizer, resolve_model

    report = inspect_file(args.file, load_tokenizer(resolve_model(args.model)), args.max_length, args.format,
                          args.limit, args.chat_template)
    print(format_inspection(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_data_convert(args) -> int:
    from posttrain.data.convert import convert_file

    summary = convert_file(args.file, args.to, args.out, args.limit)
    formats = ", ".join(f"{n} {kind}" for kind, n in summary["formats"].items())
    print(f"read {summary['read']} records ({formats}); wrote {summary['written']} {args.to} records to {args.out}")
    for why, n in summary["skipped"].items():
        print(f"  skipped {n}: {why}")
    return 0


def cmd_data_select(args) -> int:
    from posttrain.data.select import select_file

    summary = select_file(args.file, args.budget, args.method, args.out, model_spec=args.model, target=args.target,
                          dedup=args.dedup, near_threshold=args.near_threshold, min_tokens=args.min_tokens,
                          max_tokens=args.max_tokens, prefer=args.prefer, seed=args.seed, limit=args.limit,
                          report=args.report, similarity=args.similarity, max_length=args.max_length)
    print("; ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()))
    print(f"wrote {summary['kept']} records to {args.out}" + (f", scores to {args.report}" if args.report else ""))
    return 0


def cmd_data_synth(args) -> int:
    from posttrain.data import synth
    from posttrain.rollout.backend import SamplingSettings

    reads = {"magpie": {"count", "system", "response_temperature"}, "pairs": {"data", "reward", "limit", "samples"},
             "rejection": {"data", "reward", "limit", "samples", "threshold", "keep"}}
    defaults = {"count": None, "system": None, "response_temperature": 0.0, "data": None, "reward": None,
                "limit": None, "threshold": None, "keep": None, "samples": 4}
    unread = [k for k, v in defaults.items() if getattr(args, k) != v and k not in reads[args.mode]]
    if unread:
        raise UserError(f"data synth {args.mode}: {', '.join('--' + k.replace('_', '-') for k in unread)} not read here")
    sampling = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p)
    if args.mode == "magpie":
        from posttrain.evaluate.model import EvalModel

        model = EvalModel(args.model)
        records, dropped = synth.magpie(model.model, model.tokenizer, args.count or 100, sampling,
                                        SamplingSettings(args.max_new_tokens, args.response_temperature, args.top_p),
                                        args.seed, args.system, args.batch_size)
    else:
        if not args.data or not args.reward:
            raise UserError(f"data synth {args.mode}: give --data PROMPTS and --reward")
        scored = synth.scored_samples(args.model, args.data, args.reward, args.samples, sampling, args.limit,
                                      args.seed, args.batch_size)
        records, dropped = (synth.best_vs_worst(*scored) if args.mode == "pairs" else
                            synth.accepted(*scored, 1.0 if args.threshold is None else args.threshold, args.keep or 1))
    synth.write(records, args.out)
    print(f"wrote {len(records)} records to {args.out}")
    for why, n in dropped.items():
        print(f"  dropped {n}: {why}")
    return 0


def cmd_recipes(args) -> int:
    from posttrain.config import recipes_dir

    for path in sorted(recipes_dir().glob("*.yaml")):
        lines = path.read_text().splitlines()
        about = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else ""
        print(f"{path.stem:24s} {about}")
    print(f"\n(in {recipes_dir()}; run one with `posttrain <command> <name>`)")
    return 0


def cmd_quickstart(args) -> int:
    from posttrain.quickstart import quickstart

    quickstart(args.out, args.questions, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
