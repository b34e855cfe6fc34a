"""``posttrain <command> ...``: the parser is built from the declarations of every command (``apps/spec.py``).

User errors (recipe, data, environment) print one clear message and exit with code 2, no
traceback; a training run stopped by SIGTERM / SIGINT checkpoints and exits with code 75.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from posttrain import __version__
from posttrain.apps import data_commands, eval_commands, model_commands, run_commands
from posttrain.core.errors import Stopped, UserError

# in the order --help lists them
COMMANDS = (*run_commands.TRAINING, *model_commands.COMMANDS, *eval_commands.COMMANDS, *data_commands.COMMANDS,
            *run_commands.HELPERS)


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
    parser = argparse.ArgumentParser(prog="posttrain", description="Post-training for language models.")
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_to(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
