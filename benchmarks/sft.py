"""SFT throughput and peak memory on the embedded model, one JSON line per configuration.

    python benchmarks/sft.py                 # full and LoRA, packed and unpacked
    python benchmarks/sft.py --steps 6 --configs lora-packed

Each configuration runs in its own process so that peak RSS is its own. Tokens/s counts real
(non-padding) tokens and skips the first step (allocator and kernel warm-up).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common import main, peak_rss_gb

CONFIGS = {
    "full-packed": {"peft.method": "none", "train.packing": True},
    "full-unpacked": {"peft.method": "none", "train.packing": False},
    "lora-packed": {"peft.method": "lora", "train.packing": True},
    "lora-unpacked": {"peft.method": "lora", "train.packing": False},
}


def run_one(name: str, steps: int, batch_size: int) -> dict:
    from posttrain.apps.recipes import load_recipe
    from posttrain.train.run import run

    with tempfile.TemporaryDirectory() as out:
        overrides = {"output_dir": out, "data.train": "pkg:assets/gsm8k_train_1k.jsonl", "data.limit": 256,
                     "data.max_length": 512, "train.max_steps": steps, "train.batch_size": batch_size,
                     "train.lr": 1e-5, "train.report_to": "[]", **CONFIGS[name]}
        recipe = load_recipe("sft", None, [f"{k}={v}" for k, v in overrides.items()])
        run("sft", recipe)
        logged = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = logged[1:]
    seconds = timed[-1]["elapsed_s"] - logged[0]["elapsed_s"]
    tokens = timed[-1]["tokens"] - logged[0]["tokens"]
    return {"config": name, "steps": steps, "batch_size": batch_size, "tokens_per_s": round(tokens / seconds, 1),
            "s_per_step": round(seconds / len(timed), 2),
            "peak_rss_gb": peak_rss_gb()}


if __name__ == "__main__":
    main(__file__, __doc__, CONFIGS, run_one, steps=5, batch_size=8)
