"""``posttrain data``: inspect, convert, select and synthesize training data."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.apps import select, synth
from posttrain.apps.select import SELECTORS, select_file
from posttrain.apps.spec import CliCommand, arg
from posttrain.core.errors import UserError
from posttrain.data.convert import convert_file
from posttrain.data.inspect import format_inspection, inspect_file
from posttrain.evaluate.model import EvalModel
from posttrain.model.load import load_tokenizer, resolve_model
from posttrain.rollout.backend import SamplingSettings

# data synth: the flags each mode reads, and their defaults (a flag set where its mode does not read it is refused)
SYNTH_READS = {"magpie": {"count", "system", "response_temperature"}, "pairs": {"data", "reward", "limit", "samples"},
               "rejection": {"data", "reward", "limit", "samples", "threshold", "keep"}}
SYNTH_DEFAULTS = {"count": None, "system": None, "response_temperature": 0.0, "data": None, "reward": None,
                  "limit": None, "threshold": None, "keep": None, "samples": 4}


def cmd_inspect(args) -> int:
    report = inspect_file(args.file, load_tokenizer(resolve_model(args.model)), args.max_length, args.format,
                          args.limit, args.chat_template)
    print(format_inspection(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_convert(args) -> int:
    summary = convert_file(args.file, args.to, args.out, args.limit)
    formats = ", ".join(f"{n} {kind}" for kind, n in summary["formats"].items())
    print(f"read {summary['read']} records ({formats}); wrote {summary['written']} {args.to} records to {args.out}")
    for why, n in summary["skipped"].items():
        print(f"  skipped {n}: {why}")
    return 0


def cmd_select(args) -> int:
    summary = select_file(args.file, args.budget, args.method, args.out, model_spec=args.model, target=args.target,
                          dedup=args.dedup, near_threshold=args.near_threshold, min_tokens=args.min_tokens,
                          max_tokens=args.max_tokens, prefer=args.prefer, seed=args.seed, limit=args.limit,
                          report=args.report, similarity=args.similarity, max_length=args.max_length)
    print("; ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()))
    print(f"wrote {summary['kept']} records to {args.out}" + (f", scores to {args.report}" if args.report else ""))
    return 0


def cmd_synth(args) -> int:
    unread = [k for k, v in SYNTH_DEFAULTS.items() if getattr(args, k) != v and k not in SYNTH_READS[args.mode]]
    if unread:
        raise UserError(f"data synth {args.mode}: {', '.join('--' + k.replace('_', '-') for k in unread)} not read "
                        "here")
    sampling = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p)
    if args.mode == "magpie":
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


INSPECT = CliCommand(
    "inspect", "counts, token lengths per field (the model's tokenizer and chat template), truncation at "
    "--max-length, duplicates and every format error", cmd_inspect, args=(
        arg("file", help="a data file (.jsonl, .json, .parquet, .csv, a saved dataset or pkg:assets/...)"),
        arg("--model", default="default", help="whose tokenizer and chat template count the tokens"),
        arg("--max-length", type=int, default=1024, help="count the examples this length would truncate"),
        arg("--format", choices=("auto", "sft", "preference", "unpaired", "ranked"), default="auto"),
        arg("--chat-template", default=None, help="'chatml' or a Jinja string (default: the tokenizer's)"),
        arg("--limit", type=int, default=None, help="inspect the first N records"),
        arg("--out", default=None, help="write the full report (every error) as JSON")))

CONVERT = CliCommand(
    "convert", "convert between sft, preference and unpaired records (GSM8K and HH-RLHF layouts read too)",
    cmd_convert, args=(
        arg("file"),
        arg("--to", required=True, choices=("sft", "preference", "unpaired")),
        arg("--out", required=True, help="the converted records (JSON lines)"),
        arg("--limit", type=int, default=None, help="convert the first N records")))

SELECT = CliCommand(
    "select", "filter (duplicates, length), score and pick a budget of SFT records", cmd_select,
    description=select.__doc__ or "", raw=True, args=(
        arg("file"),
        arg("--budget", type=int, required=True, help="records to keep"),
        arg("--method", choices=SELECTORS, default="random"),
        arg("--out", required=True, help="the kept records, as read, in file order"),
        arg("--report", default=None, help="every record's scores and fate (JSON lines)"),
        arg("--model", default="default", help="the model that scores (loss, ifd) and tokenizes"),
        arg("--target", default=None, help="zip_fit: records of the data to align with"),
        arg("--dedup", choices=("none", "exact", "minhash"), default="exact",
            help="remove exact duplicates, and with minhash near duplicates too"),
        arg("--near-threshold", type=float, default=0.8, help="minhash: estimated Jaccard similarity"),
        arg("--min-tokens", type=int, default=0),
        arg("--max-tokens", type=int, default=None),
        arg("--prefer", choices=("high", "low"), default="high", help="loss: keep the highest or lowest"),
        arg("--similarity", type=float, default=0.9,
            help="deita: the cosine similarity to an already taken record at which a record is skipped"),
        arg("--max-length", type=int, default=1024, help="tokens per record when the model scores it"),
        arg("--seed", type=int, default=0),
        arg("--limit", type=int, default=None, help="read the first N records")))

SYNTH = CliCommand(
    "synth", "make training data with a model: magpie instructions, on-policy pairs, rejection-sampled SFT",
    cmd_synth, description=synth.__doc__, raw=True, args=(
        arg("mode", choices=("magpie", "pairs", "rejection")),
        arg("model", help="'default', a HF directory, a run directory or a .gguf file"),
        arg("--out", required=True, help="the records (JSON lines)"),
        arg("--count", type=int, default=None, help="magpie: instructions to sample (default 100)"),
        arg("--system", default=None, help="magpie: a system prompt in the template"),
        arg("--data", default=None, help="pairs / rejection: the prompts ({prompt, ...}, GSM8K layout too)"),
        arg("--reward", default=None, help="pairs / rejection: a reward function (math_answer, ...), "
            "module:function, or a reward model / PRM directory"),
        arg("--samples", type=int, default=4, help="pairs / rejection: completions per prompt"),
        arg("--threshold", type=float, default=None, help="rejection: the reward to reach (default 1.0)"),
        arg("--keep", type=int, default=None, help="rejection: distinct accepted completions per prompt (default 1)"),
        arg("--limit", type=int, default=None, help="pairs / rejection: the first N prompts"),
        arg("--temperature", type=float, default=1.0, help="sampling temperature"),
        arg("--top-p", type=float, default=1.0),
        arg("--response-temperature", type=float, default=0.0, help="magpie: responses (0: greedy)"),
        arg("--max-new-tokens", type=int, default=256),
        arg("--seed", type=int, default=0),
        arg("--batch-size", type=int, default=16)))

COMMANDS = (CliCommand("data", "data tools: inspect, convert, select and synthesize training data",
                       subcommands=(INSPECT, CONVERT, SELECT, SYNTH)),)
