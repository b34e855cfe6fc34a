"""DPO throughput and peak memory on the embedded model, one JSON line per configuration.

    python benchmarks/dpo.py                       # LoRA with each reference mode, and full fine-tuning
    python benchmarks/dpo.py --configs lora-adapter --steps 4

Pairs of HH-RLHF (harmless) truncated to 320 tokens per side. Each configuration runs in its own
process so that peak RSS is its own; pairs/s skips the first step (warm-up) and, for the
precomputed reference, excludes the one-off reference pass (reported separately).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from common import main, peak_rss_gb

CONFIGS = {
    "lora-adapter": {"peft.method": "lora", "reference": "adapter_disabled"},
    "lora-precomputed": {"peft.method": "lora", "reference": "precomputed"},
    "full-policy-copy": {"peft.method": "none", "reference": "policy_copy"},
    "lora-simpo": {"peft.method": "lora", "loss.name": "simpo", "reference": "none"},
}


def run_one(name: str, steps: int, batch_size: int) -> dict:
    from posttrain.apps.recipes import load_recipe
    from posttrain.train.run import run

    with tempfile.TemporaryDirectory() as out:
        overrides = {"output_dir": out, "data.train": "pkg:assets/hh_harmless_train_1200.jsonl",
                     "data.limit": steps * batch_size, "data.eval": "null", "train.max_steps": steps,
                     "train.batch_size": batch_size, "train.lr": 1e-5, "train.report_to": "[]",
                     "train.save_every": "null",
                     **CONFIGS[name]}
        recipe = load_recipe("dpo", "dpo_hh", [f"{k}={v}" for k, v in overrides.items()])
        started = time.perf_counter()
        run("dpo", recipe)
        total = time.perf_counter() - started
        logged = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    seconds = logged[-1]["elapsed_s"] - logged[0]["elapsed_s"]
    pairs = (len(logged) - 1) * batch_size
    return {"config": name, "steps": steps, "batch_size": batch_size, "pairs_per_s": round(pairs / seconds, 3),
            "tokens_per_s": round((logged[-1]["tokens"] - logged[0]["tokens"]) / seconds, 1),
            "s_per_step": round(seconds / (len(logged) - 1), 2), "wall_s_including_setup": round(total, 1),
            "peak_rss_gb": peak_rss_gb()}


if __name__ == "__main__":
    main(__file__, __doc__, CONFIGS, run_one, steps=4, batch_size=4)
