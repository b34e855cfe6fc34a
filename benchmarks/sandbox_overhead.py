"""What the code sandbox costs per program: ``run_python('print(1)')`` under the sandbox against the same program
run by a bare ``python -I`` subprocess, medians of N runs, in one process on one machine.

    python benchmarks/sandbox_overhead.py [--runs 40]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from posttrain.core.sandbox import run_python, unavailable_reason


def median_ms(runs: int, program) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        program()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def sandboxed() -> None:
    assert run_python("print(1)").ok


def bare() -> None:
    subprocess.run([sys.executable, "-I", "-"], input=b"print(1)", capture_output=True, check=True, env={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    if unavailable_reason():
        raise SystemExit(f"no sandbox here: {unavailable_reason()}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    median_ms(3, sandboxed)  # warm the page cache
    inside, outside = median_ms(args.runs, sandboxed), median_ms(args.runs, bare)
    print(f"{cpu} ({'root' if os.geteuid() == 0 else 'user'}): sandboxed {inside:.1f} ms, bare python -I "
          f"{outside:.1f} ms per program (+{inside - outside:.1f} ms), median of {args.runs}")


if __name__ == "__main__":
    main()
