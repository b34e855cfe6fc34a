"""Commands that use a model as it is: ``generate``, ``score``, ``chat``, ``merge``, ``export``."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from posttrain.apps.export import export_checkpoint, export_gguf, export_merged
from posttrain.apps.infer import generate_command, load_for_inference
from posttrain.apps.merge.run import MergeRecipe, run_merge
from posttrain.apps.spec import CliCommand, arg
from posttrain.core.config import apply_override, describe_schema, format_validation_error, parse_override
from posttrain.core.errors import UserError
from posttrain.data.adapters import adapt
from posttrain.data.load import read_records
from posttrain.evaluate.score import score_records, summarize
from posttrain.rewards.model import load_scorer
from posttrain.rollout.generate import generate

MODEL = "'default', a HF directory, a run directory, a .gguf file or a hub id"
AGGREGATE = dict(default=None, choices=["min", "last", "mean", "prod"])
SAMPLING = (
    arg("--max-new-tokens", type=int, default=256),
    arg("--temperature", type=float, default=None,
        help="0 is greedy (the default, except 0.8 where several samples are drawn)"),
    arg("--top-p", type=float, default=1.0),
    arg("--no-chat", action="store_true", help="raw text prompt, no chat template"),
)


def cmd_score(args) -> int:
    options = {"aggregate": args.aggregate} if args.aggregate else {}
    scorer = load_scorer(args.model, batch_size=args.batch_size, **options)
    records = [(args.data, where, adapt("auto", record, args.data, where))
               for where, record in read_records(args.data, args.limit)]
    scored = score_records(scorer, records, args.batch_size, progress=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in scored))
    print("\n".join(summarize(scored)) + f"\nwrote {args.out}")
    return 0


def cmd_chat(args) -> int:
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


def merge_help() -> str:
    return "\n".join(["recipe keys (default, meaning):", *describe_schema(MergeRecipe)])


def cmd_merge(args) -> int:
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


def cmd_export(args) -> int:
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


GENERATE = CliCommand(
    "generate", "generate replies, optionally with inference-time alignment", generate_command,
    description="Generate replies. Inference-time alignment: --best-of N with --reward, --vote N (self-consistency, "
    "weighted by --reward if given), --urial (a base model aligned in context), --nudge MODEL (an aligned model "
    "writes where the base is unsure), --guided-chunks M (reward-guided decoding over chunks of M tokens).",
    args=(
        arg("model", help=MODEL),
        arg("--prompt", action="append", help="a prompt (repeat for several)"),
        arg("--data", help="prompts from a data file ({prompt, ...}; other fields reach reward functions)"),
        arg("--limit", type=int, default=None, help="use the first N records of --data"),
        arg("--out", help="write one JSON line per prompt (completion, candidates, scores, ...)"),
        *SAMPLING,
        arg("--best-of", type=int, default=None, metavar="N", help="sample N replies, keep the best by --reward"),
        arg("--vote", type=int, default=None, metavar="N", help="sample N replies, answer by majority vote over their "
            "final answers (weighted by --reward when given: scores in [0, 1] as they are, others through a sigmoid)"),
        arg("--reward", help="a reward model or PRM directory / run, or a reward function name (math_answer, format, "
            "length, ... or module:function)"),
        arg("--aggregate", **AGGREGATE, help="how a process reward model combines step scores (default min)"),
        arg("--urial", nargs="?", const="", default=None, metavar="FILE",
            help="URIAL: prompt a base model with the shipped (or FILE's) system text and examples"),
        arg("--nudge", metavar="MODEL", help="nudging: this aligned model writes the next word wherever the base "
            "model's top-1 probability is below --nudge-threshold"),
        arg("--nudge-threshold", type=float, default=0.4),
        arg("--guided-chunks", type=int, default=None, metavar="M", help="reward-guided decoding: sample "
            "--candidates continuations of M tokens, keep the best by --reward"),
        arg("--candidates", type=int, default=4, metavar="K"),
    ))

COMMANDS = (
    GENERATE,
    CliCommand("score", "score a data file with a reward model or process reward model", cmd_score, args=(
        arg("model", help="a reward model (posttrain rm) or process reward model (posttrain prm) directory / run"),
        arg("data", help="pairs, {prompt, responses}, {prompt, completion} or {prompt, completions: [steps]}"),
        arg("--out", required=True, help="scores.jsonl: each record with its scores"),
        arg("--limit", type=int, default=None, help="score the first N records"),
        arg("--batch-size", type=int, default=16),
        arg("--aggregate", **AGGREGATE,
            help="how a process reward model combines step scores into a solution score (default min)"))),
    CliCommand("chat", "chat with a model in the terminal", cmd_chat, args=(
        arg("model", help=MODEL), arg("--system", default=None, help="a system prompt"), *SAMPLING)),
    CliCommand("merge", "merge models in weight space (soups, slerp, task arithmetic, TIES, DARE, model stock, LiNeS, "
               "WiSE-FT, fine-tuning transfer)", cmd_merge, epilog=merge_help, raw=True, args=(
                   arg("recipe", help="a merge recipe YAML file"),
                   arg("overrides", nargs="*", help="key=value overrides, e.g. method=ties density=0.3"))),
    CliCommand("export", "write a standalone HF model (adapters merged) or one GGUF file", cmd_export, args=(
        arg("run_dir", help="a run directory (uses final/, or --checkpoint), a model directory or 'default'"),
        arg("--out", required=True, help="output directory (hf) or file (gguf, e.g. model.gguf)"),
        arg("--checkpoint", default=None, help="export checkpoints/step-N instead of final/"),
        arg("--format", choices=("hf", "gguf"), default="hf", help="hf: a transformers directory; gguf: one file for "
            "llama.cpp / Ollama / LM Studio (llama architecture)"),
        arg("--quant", choices=("q8_0", "f16", "f32"), default="q8_0",
            help="gguf: weight type of the matrices (norms stay f32)"),
        arg("--tokenizer-pre", default=None, metavar="NAME",
            help="gguf: llama.cpp's pre-tokenizer name, for a tokenizer it does not know by fingerprint"))),
)
