"""A million-record training file: how long tokenization takes the first time and from the cache, and how much
memory it holds.

    python benchmarks/data_scale.py --out runs/data_scale [--records 1000000] [--num-proc N]

The file: GSM8K train questions and solutions as chat messages, cycled to ``--records`` records (each tagged with its
number, so no two are the same). Each phase runs in a fresh process, as a new run or a resume would, with the
embedded model's tokenizer and the SFT task's ``build_dataset``:

- ``first``: an empty cache: records are read, validated and tokenized in worker processes into Arrow files.
- ``cached``: the same command again: the cache is opened (memory-mapped).

After building, both phases read the examples of 20 training steps of batch 8 in the seeded order (what the training
loop does). Reported per phase: wall seconds, peak resident memory of the main process (``VmHWM``) and of the
largest worker (``ru_maxrss`` of the children), and the cache's size on disk. One JSON line per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TRAIN = "../shared/data/gsm8k/train.jsonl"


def write_file(path: Path, records: int) -> None:
    source = [json.loads(line) for line in Path(TRAIN).read_text().splitlines()]
    with open(path, "w") as handle:
        for i in range(records):
            r = source[i % len(source)]
            answer = r["answer"].replace("####", "The answer is")
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"[{i}] {r['question']}"},
                                                  {"role": "assistant", "content": answer}]}) + "\n")


def phase(args) -> None:
    """One build in this process (run by the parent in a fresh interpreter)."""
    from posttrain.apps.recipes import load_recipe
    from posttrain.model.load import load_tokenizer, resolve_model
    from posttrain.train.tasks.sft import SFTTask

    path = resolve_model("default")  # converted by the parent already
    started = time.perf_counter()
    recipe = load_recipe("sft", None, [f"model={path}", f"output_dir={args.out}/run", f"data.train={args.file}",
                                       "data.max_length=512", "train.batch_size=8"]
                         + ([f"data.num_proc={args.num_proc}"] if args.num_proc else []))
    task = SFTTask(recipe, load_tokenizer(path))
    examples = task.build_dataset("train")
    built = time.perf_counter() - started
    tokens = 0
    for step in range(20):
        tokens += sum(len(examples[i].input_ids) for i in task.step_indices(step, len(examples)))
    read = time.perf_counter() - started - built
    cache = Path(os.environ["POSTTRAIN_CACHE"]) / "examples"
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    print(json.dumps({"phase": args.phase, "records": examples.summary["records"], "examples": len(examples),
                      "tokens": int(examples.summary["tokens"]), "build_s": round(built, 1),
                      "read_20_steps_s": round(read, 3), "step_tokens": tokens,
                      "peak_rss_main_mb": peak_rss_mb(),
                      "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
                      "cache_mb": size >> 20, "cpus": len(os.sched_getaffinity(0))}), flush=True)


def peak_rss_mb() -> int:
    """This process's own high-water mark (VmHWM: unlike ru_maxrss, not inherited from the process that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/data_scale")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--phase", choices=("first", "cached"), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return phase(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"sft_{args.records}.jsonl"
    if not file.exists():
        write_file(file, args.records)
    cache = out / "cache"
    if (cache / "examples").exists():
        subprocess.run(["rm", "-rf", str(cache / "examples")], check=True)
    os.environ["POSTTRAIN_CACHE"] = str(cache)
    from posttrain.model.load import resolve_model

    resolve_model("default")  # the GGUF conversion, once, outside the measured processes
    env = dict(os.environ)
    print(json.dumps({"file": str(file), "bytes": file.stat().st_size, "cpu": cpu_model()}), flush=True)
    for name in ("first", "cached"):
        command = [sys.executable, __file__, "--out", str(out), "--phase", name, "--file", str(file)]
        if args.num_proc:
            command += ["--num-proc", str(args.num_proc)]
        subprocess.run(command, env=env, check=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
