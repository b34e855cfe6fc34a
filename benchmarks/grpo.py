"""GRPO throughput on the embedded model, one JSON line per configuration.

    python benchmarks/grpo.py                            # LoRA and full fine-tuning on the arithmetic task
    python benchmarks/grpo.py --configs lora --steps 4

Each step samples ``batch_size`` completions (8 per prompt, up to 32 new tokens) and trains on them.
Reported, skipping the first step (warm-up): generation tokens/s (sampled tokens over time in
``generate``), training tokens/s (prompt + completion tokens over the update time: the policy's
log-prob passes and the backward passes), seconds per step, and the share of a step spent sampling.
Each configuration runs in its own process, so that peak RSS is its own.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

from common import main, peak_rss_gb

CONFIGS = {
    "lora": {"peft.method": "lora"},
    "full": {"peft.method": "none", "train.lr": 1e-6},
    "lora-kl": {"peft.method": "lora", "rl.kl_coef": 0.04},  # adds the reference pass (adapter disabled)
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run_one(name: str, steps: int, batch_size: int) -> dict:
    import torch

    from posttrain.apps.recipes import load_recipe
    from posttrain.train.run import run

    with tempfile.TemporaryDirectory() as out:
        overrides = {"output_dir": out, "data.eval": "null", "train.max_steps": steps, "train.batch_size": batch_size,
                     "train.grad_accum": 1, "train.report_to": "[]", "train.save_every": "null",
                     "train.eval_every": "null",
                     "rl.reward_workers": 1, **CONFIGS[name]}
        recipe = load_recipe("grpo", "grpo_arithmetic", [f"{k}={v}" for k, v in overrides.items()])
        started = time.perf_counter()
        run("grpo", recipe)
        total = time.perf_counter() - started
        logged = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][1:]
    generate_s = sum(m["time/generate_s"] for m in logged)
    update_s = sum(m["time/update_s"] for m in logged)
    later_update_s = sum(m["time/update_s"] for m in logged[1:])
    generated = sum(m["generate/tokens_per_s"] * m["time/generate_s"] for m in logged)
    step_s = (logged[-1]["elapsed_s"] - logged[0]["elapsed_s"]) / max(len(logged) - 1, 1)
    trained = logged[-1]["tokens"] - logged[0]["tokens"]  # cumulative: the tokens of steps 2..n
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    return {"config": name, "device": device, "steps": steps, "completions_per_step": batch_size,
            "generate_tokens_per_s": round(generated / generate_s, 1),
            "train_tokens_per_s": round(trained / max(later_update_s, 1e-9), 1),
            "s_per_step": round(step_s, 2), "generate_share": round(generate_s / (generate_s + update_s), 3),
            "wall_s_including_setup": round(total, 1), "peak_rss_gb": peak_rss_gb()}


if __name__ == "__main__":
    main(__file__, __doc__, CONFIGS, run_one, steps=4, batch_size=32)
