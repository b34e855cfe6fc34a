"""Shared driver for the benchmarks: each configuration in its own process, one JSON line each."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main(script: str, doc: str, configs: dict, run_one: Callable[[str, int, int], dict], steps: int,
         batch_size: int) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=list(configs), choices=list(configs))
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.batch_size)), flush=True)
        return
    for name in args.configs:
        done = subprocess.run([sys.executable, script, "--one", name, "--steps", str(args.steps),
                               "--batch-size", str(args.batch_size)], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(json.dumps({"config": name, "error": done.stderr.strip().splitlines()[-1:]}), flush=True)
        else:
            print(lines[-1][len("RESULT "):], flush=True)
