"""posttrain against TRL (and plain transformers ``generate``), side by side on this machine, in one run.

    python benchmarks/compare_trl.py                    # 5 workloads x 3 repetitions, alternating posttrain / TRL
    python benchmarks/compare_trl.py --quick            # one repetition each (about 30 min on 2 cores)
    python benchmarks/compare_trl.py --workloads dpo_lora --reps 5 --out results.jsonl

Workloads (the embedded SmolLM2-135M, fp32, the same data slices as benchmarks/sft.py and dpo.py):

- ``sft_full`` / ``sft_lora``: GSM8K, batch 8, max length 512, completion-only loss, one epoch of
  ``steps x 8`` records; LoRA r=16, alpha 32, all linear layers. Throughput: real tokens/s.
- ``dpo_lora``: HH-RLHF harmless pairs, batch 4, max length 320, LoRA as above, beta 0.1, the reference's
  log-probs precomputed before training (both). Throughput: pairs/s.
- ``grpo_lora``: the arithmetic prompts, 2 prompts x 8 completions per step, up to 32 new tokens at
  temperature 0.7, reward = the exact-answer check, no KL term, token-mean loss, one optimizer step per
  rollout batch, LoRA as above. Throughput: steps/s (speedup = TRL's s/step over posttrain's).
- ``generation``: 48 GSM8K test questions, chat template, greedy, up to 128 new tokens, all 48 in one batch:
  posttrain's evaluation generation against plain transformers ``generate`` on the same batches
  (left padding, default dynamic KV cache). Throughput: generated tokens/s (each row counted up to its EOS).

Fairness rules:

1. Same model files (the embedded model's cached HF directory), same records in the same slice, same batch size,
   max length, LoRA settings, optimizer (AdamW), learning rate, precision (fp32: TRL's bf16 autocast on a CPU
   without native bf16 runs over 100 s per SFT step, a trap, not a configuration) and thread count (all cores).
2. Each framework runs in its own fresh process (peak RSS = that process's VmHWM), alternating A B A B, and
   every figure is the median over repetitions.
3. TRL gets its documented fast options where they exist on CPU: padding-free batches for SFT (transformers
   builds the block-diagonal mask from position ids for SDPA, so this is exact; TRL enforces no max length
   there, and none of the slice's examples is longer than 512 tokens), ``precompute_ref_log_probs``
   for DPO (its ``padding_free`` currently falls back to padding, so it is left off), no gradient checkpointing
   (posttrain uses none), no evaluation or checkpoint saving in either.
4. Throughput skips the first optimizer step (allocator and kernel warm-up) in both, and counts what each
   framework reports it trained on (real tokens / pairs), so small tokenization differences (TRL keeps the
   start of an over-long pair, posttrain the end) do not bias the ratio.

Model-FLOPs utilization (``sft_full``): achieved FLOPs = 6 x non-embedding parameters x tokens + attention
(6 x 2 x L^2 x hidden x layers per sequence of L tokens, forward and backward, the full square as PaLM's MFU
counts it; each sequence on its own, not its packed row) + the LM-head
projection at the positions actually projected (6 x vocabulary x hidden per target), over the steps timed,
divided by the peak of a large fp32 ``torch.matmul`` measured in the same run.

Output: one JSON line per workload (``speedup`` = posttrain / TRL throughput; ``memory_ratio`` = posttrain /
TRL peak RSS), then a Markdown table with the date and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

WORKLOADS = ("sft_full", "sft_lora", "dpo_lora", "grpo_lora", "generation")
UNITS = {"sft_full": "tokens/s", "sft_lora": "tokens/s", "dpo_lora": "pairs/s", "grpo_lora": "steps/s",
         "generation": "tokens/s"}
STEPS = {"sft_full": 4, "sft_lora": 4, "dpo_lora": 6, "grpo_lora": 4, "generation": 0}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
SFT_BATCH, SFT_MAX_LENGTH = 8, 512
DPO_BATCH, DPO_MAX_LENGTH = 4, 320
GRPO_GENERATIONS, GRPO_BATCH, GRPO_NEW_TOKENS, GRPO_TEMPERATURE = 8, 16, 32, 0.7
GENERATION_PROMPTS, GENERATION_BATCH, GENERATION_NEW_TOKENS = 48, 48, 128


# --- helpers shared by both sides -------------------------------------------------------------------------------

def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def peak_rss_gb() -> float:
    """This process's own high-water mark (VmHWM; ru_maxrss would inherit the parent's across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 2)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def model_path() -> str:
    from posttrain.model.load import resolve_model

    return resolve_model("default")


def asset(name: str) -> str:
    from importlib.resources import files

    return str(files("posttrain") / "assets" / name)


def records(name: str, limit: int, adapter=None) -> list[dict]:
    rows = [json.loads(line) for line in Path(asset(name)).read_text().splitlines()[:limit]]
    return [adapter(r) for r in rows] if adapter else rows


def step_timer():
    """A transformers callback recording when each optimizer step ended, and the trainer's token count then."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends, self.tokens, self.logs = [], [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.tokens.append(state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    return StepTimer()


def trl_common(out: str, steps: int, lr: float) -> dict:
    return {"output_dir": out, "max_steps": steps, "learning_rate": lr, "lr_scheduler_type": "constant",
            "optim": "adamw_torch", "bf16": False, "fp16": False, "use_cpu": True, "gradient_checkpointing": False,
            "report_to": [], "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1,
            "dataloader_num_workers": 0, "seed": 0, "disable_tqdm": True}


def trl_lora():
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM")


def posttrain_run(command: str, base: str | None, overrides: dict, record_batches: bool = False):
    """Run a posttrain command in this process; its metrics lines and, if asked, every collated training micro-batch's
    (step, sequence lengths, targets) in order."""
    from posttrain.apps.recipes import load_recipe
    from posttrain.train.run import run

    batches = []
    if record_batches:
        from posttrain.train.tasks import sft

        collate_train = sft.SFTTask.collate_train

        def recording(self, examples, step):
            batch = collate_train(self, examples, step)
            batches.append((step, [len(e.input_ids) for e in examples], batch.num_targets))
            return batch

        sft.SFTTask.collate_train = recording
    with tempfile.TemporaryDirectory() as out:
        overrides = {"output_dir": out, "train.report_to": "[]", "train.save_every": "null", "data.eval": "null",
                     "train.eval_every": "null", "train.scheduler": "constant", **overrides,
                     **json.loads(os.environ.get("POSTTRAIN_BENCH_SET", "{}"))}
        recipe = load_recipe(command, base, [f"{k}={v}" for k, v in overrides.items()])
        run(command, recipe)
        logged = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return logged, batches


# --- SFT --------------------------------------------------------------------------------------------------------

def sft_overrides(steps: int, lora: bool) -> dict:
    peft = {"peft.method": "lora", "peft.r": LORA["r"],
            "peft.alpha": LORA["alpha"]} if lora else {"peft.method": "none"}
    return {"model": model_path(), "data.train": asset("gsm8k_train_1k.jsonl"), "data.limit": steps * SFT_BATCH,
            "data.max_length": SFT_MAX_LENGTH, "train.max_steps": steps, "train.batch_size": SFT_BATCH,
            "train.grad_accum": 1, "train.lr": 1e-5, "train.warmup_steps": 0, **peft}


def posttrain_sft(steps: int, lora: bool) -> dict:
    logged, batches = posttrain_run("sft", None, sft_overrides(steps, lora), record_batches=not lora)
    seconds = logged[-1]["elapsed_s"] - logged[0]["elapsed_s"]
    tokens = logged[-1]["tokens"] - logged[0]["tokens"]
    result = {"throughput": tokens / seconds, "s_per_step": seconds / (len(logged) - 1)}
    if batches:
        timed = [(lengths, targets) for step, lengths, targets in batches if 1 <= step < len(logged)]
        result["model_flops_per_s"] = sft_flops(timed) / seconds
    return result


def sft_flops(batches: list[tuple[list[int], int]]) -> float:
    """Training FLOPs of the given (lengths, targets) batches on the embedded model (see the module docstring)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path())
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    per_layer = (2 + 2 * config.num_key_value_heads / config.num_attention_heads) * hidden * hidden  # q, o; k, v
    per_layer += 3 * hidden * config.intermediate_size  # gate, up, down
    non_embedding = layers * per_layer
    flops = 0.0
    for lengths, targets in batches:
        flops += 6 * non_embedding * sum(lengths)
        flops += 6 * 2 * hidden * layers * sum(n * n for n in lengths)
        flops += 6 * vocab * hidden * targets
    return flops


def matmul_peak_flops(size: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of a large fp32 matmul on all threads (best of repeated runs)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def trl_sft(steps: int, lora: bool) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from posttrain.data.adapters import gsm8k

    rows = [{"prompt": r["prompt"], "completion": r["completion"]}
            for r in records("gsm8k_train_1k.jsonl", steps * SFT_BATCH, gsm8k)]
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(**trl_common(out, steps, 1e-5), per_device_train_batch_size=SFT_BATCH,
                           gradient_accumulation_steps=1,
                           max_length=None, padding_free=True, packing=False, completion_only_loss=True,
                           include_num_input_tokens_seen="non_padding", model_init_kwargs={"dtype": "float32"})
        trainer = SFTTrainer(model=model_path(), args=config, train_dataset=datasets.Dataset.from_list(rows),
                             peft_config=trl_lora() if lora else None, callbacks=[timer])
        trainer.train()
    seconds = timer.ends[-1] - timer.ends[0]
    return {"throughput": (timer.tokens[-1] - timer.tokens[0]) / seconds, "s_per_step": seconds / (len(timer.ends) - 1)}


# --- DPO --------------------------------------------------------------------------------------------------------

def posttrain_dpo(steps: int) -> dict:
    overrides = {"model": model_path(), "data.train": asset("hh_harmless_train_1200.jsonl"),
                 "data.limit": steps * DPO_BATCH,
                 "data.max_length": DPO_MAX_LENGTH, "train.max_steps": steps, "train.batch_size": DPO_BATCH,
                 "train.grad_accum": 1, "train.lr": 1e-5, "train.warmup_steps": 0, "peft.method": "lora",
                 "peft.r": LORA["r"], "peft.alpha": LORA["alpha"], "reference": "precomputed", "loss.beta": 0.1}
    logged, _ = posttrain_run("dpo", "dpo_hh", overrides)
    seconds = logged[-1]["elapsed_s"] - logged[0]["elapsed_s"]
    return {"throughput": (len(logged) - 1) * DPO_BATCH / seconds, "s_per_step": seconds / (len(logged) - 1)}


def trl_dpo(steps: int) -> dict:
    import datasets
    from trl import DPOConfig, DPOTrainer

    from posttrain.data.adapters import hh_rlhf

    rows = records("hh_harmless_train_1200.jsonl", steps * DPO_BATCH, hh_rlhf)
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(**trl_common(out, steps, 1e-5), per_device_train_batch_size=DPO_BATCH,
                           gradient_accumulation_steps=1,
                           max_length=DPO_MAX_LENGTH, beta=0.1, precompute_ref_log_probs=True,
                           precompute_ref_batch_size=DPO_BATCH, model_init_kwargs={"dtype": "float32"})
        trainer = DPOTrainer(model=model_path(), args=config, train_dataset=datasets.Dataset.from_list(rows),
                             peft_config=trl_lora(), callbacks=[timer])
        trainer.train()
    seconds = timer.ends[-1] - timer.ends[0]
    return {"throughput": (len(timer.ends) - 1) * DPO_BATCH / seconds, "s_per_step": seconds / (len(timer.ends) - 1)}


# --- GRPO -------------------------------------------------------------------------------------------------------

def posttrain_grpo(steps: int) -> dict:
    overrides = {"model": model_path(), "train.max_steps": steps, "train.batch_size": GRPO_BATCH, "train.grad_accum": 1,
                 "rollout.num_generations": GRPO_GENERATIONS, "rollout.max_new_tokens": GRPO_NEW_TOKENS,
                 "rollout.temperature": GRPO_TEMPERATURE, "rl.kl_coef": 0.0, "rl.num_iterations": 1,
                 "rl.aggregation": "token_mean", "train.warmup_steps": 0, "rl.reward_workers": 1,
                 "data.limit": steps * GRPO_BATCH // GRPO_GENERATIONS,  # the prompts TRL gets
                 "peft.r": LORA["r"], "peft.alpha": LORA["alpha"]}
    logged, _ = posttrain_run("grpo", "grpo_arithmetic", overrides)
    seconds = logged[-1]["elapsed_s"] - logged[0]["elapsed_s"]
    generated = sum(m["generate/tokens_per_s"] * m["time/generate_s"] for m in logged[1:])
    return {"throughput": (len(logged) - 1) / seconds, "s_per_step": seconds / (len(logged) - 1),
            "completion_tokens_per_step": generated / (len(logged) - 1)}


def arithmetic_reward(prompts, completions, answer, **_) -> list[float]:
    from posttrain.rewards.builtin import math_answer

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(r or 0.0) for r in math_answer(prompts, texts, answer)]


def trl_grpo(steps: int) -> dict:
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    prompts_per_step = GRPO_BATCH // GRPO_GENERATIONS
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
            for r in records("arithmetic_train.jsonl", steps * prompts_per_step)]
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(**trl_common(out, steps, 2e-4), per_device_train_batch_size=GRPO_BATCH,
                            gradient_accumulation_steps=1, num_generations=GRPO_GENERATIONS,
                            max_completion_length=GRPO_NEW_TOKENS, temperature=GRPO_TEMPERATURE, beta=0.0,
                            num_iterations=1, loss_type="dapo", steps_per_generation=1,
                            model_init_kwargs={"dtype": "float32"})
        trainer = GRPOTrainer(model=model_path(), reward_funcs=arithmetic_reward, args=config,
                              train_dataset=datasets.Dataset.from_list(rows), peft_config=trl_lora(), callbacks=[timer])
        trainer.train()
    seconds = timer.ends[-1] - timer.ends[0]
    lengths = [log["completions/mean_length"] for log in timer.logs if "completions/mean_length" in log][1:]
    return {"throughput": (len(timer.ends) - 1) / seconds, "s_per_step": seconds / (len(timer.ends) - 1),
            "completion_tokens_per_step": statistics.mean(lengths) * GRPO_BATCH if lengths else None}


# --- generation -------------------------------------------------------------------------------------------------

def generation_prompts() -> list:
    from posttrain.data.adapters import gsm8k

    return [r["prompt"] for r in records("gsm8k_test_200.jsonl", GENERATION_PROMPTS, gsm8k)]


def posttrain_generation(_: int) -> dict:
    from posttrain.evaluate.model import EvalModel
    from posttrain.rollout.backend import SamplingSettings

    model = EvalModel(model_path(), batch_size=GENERATION_BATCH, cache=False)
    model.model, model.tokenizer  # loading is not generation
    prompts = generation_prompts()
    start = time.perf_counter()
    made = model.generate(prompts, SamplingSettings(max_new_tokens=GENERATION_NEW_TOKENS, temperature=0.0),
                          progress=False)
    seconds = time.perf_counter() - start
    return {"throughput": sum(g[0].tokens for g in made) / seconds, "seconds": seconds}


def transformers_generation(_: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}] if isinstance(p, str) else p,
                                           tokenize=False, add_generation_prompt=True) for p in generation_prompts()]
    eos = tokenizer.eos_token_id
    start, tokens = time.perf_counter(), 0
    with torch.no_grad():
        for first in range(0, len(texts), GENERATION_BATCH):
            enc = tokenizer(texts[first : first + GENERATION_BATCH], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=GENERATION_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                tokens += row.index(eos) + 1 if eos in row else len(row)
    seconds = time.perf_counter() - start
    return {"throughput": tokens / seconds, "seconds": seconds}


SIDES = {
    "sft_full": (lambda s: posttrain_sft(s, lora=False), lambda s: trl_sft(s, lora=False)),
    "sft_lora": (lambda s: posttrain_sft(s, lora=True), lambda s: trl_sft(s, lora=True)),
    "dpo_lora": (posttrain_dpo, trl_dpo),
    "grpo_lora": (posttrain_grpo, trl_grpo),
    "generation": (posttrain_generation, transformers_generation),
}
BASELINE = {"generation": "transformers"}


def run_side(workload: str, side: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    result = SIDES[workload][0 if side == "posttrain" else 1](steps)
    if "model_flops_per_s" in result:
        result["matmul_peak_flops_per_s"] = matmul_peak_flops()
    return {**result, "peak_rss_gb": peak_rss_gb()}


def measure(workload: str, side: str, steps: int) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, "--one", workload, side, "--steps", str(steps)],
                          capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{workload} / {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarize(workload: str, runs: dict[str, list[dict]]) -> dict:
    def median(side, key):
        values = [r[key] for r in runs[side] if r.get(key) is not None]
        return statistics.median(values) if values else None

    baseline = BASELINE.get(workload, "trl")
    ours, theirs = median("posttrain", "throughput"), median("baseline", "throughput")
    line = {"workload": workload, "unit": UNITS[workload], "baseline": baseline, "reps": len(runs["posttrain"]),
            "posttrain": round(ours, 3), baseline: round(theirs, 3), "speedup": round(ours / theirs, 2),
            "posttrain_peak_rss_gb": median("posttrain", "peak_rss_gb"),
            f"{baseline}_peak_rss_gb": median("baseline", "peak_rss_gb"),
            "memory_ratio": round(median("posttrain", "peak_rss_gb") / median("baseline", "peak_rss_gb"), 2)}
    if os.environ.get("POSTTRAIN_BENCH_SET"):
        line["posttrain_set"] = json.loads(os.environ["POSTTRAIN_BENCH_SET"])
    for key in ("s_per_step", "completion_tokens_per_step"):
        if median("posttrain", key) is not None:
            line[f"posttrain_{key}"], line[f"{baseline}_{key}"] = round(median("posttrain", key),
                                                                        3), median("baseline", key)
    if median("posttrain", "model_flops_per_s"):
        mfu = [r["model_flops_per_s"] / r["matmul_peak_flops_per_s"] for r in runs["posttrain"]]
        line["mfu"] = round(statistics.median(mfu), 3)
        line["matmul_peak_gflops"] = round(median("posttrain", "matmul_peak_flops_per_s") / 1e9, 1)
    return line


def table(lines: list[dict]) -> str:
    rows = [f"Measured {date.today()} on {cpu_name()} ({os.cpu_count()} threads), median of "
            f"{lines[0]['reps'] if lines else 0} alternating runs each, fp32"
            + (f"; posttrain with {lines[0]['posttrain_set']}." if lines and "posttrain_set" in lines[0] else "."), "",
            "| workload | posttrain | baseline | speedup | peak RSS posttrain / baseline | memory ratio |",
            "|---|---|---|---|---|---|"]
    for line in lines:
        base = line["baseline"]
        extra = f" (MFU {line['mfu']:.0%})" if "mfu" in line else ""
        rows.append(f"| {line['workload']} | {line['posttrain']:.3g} {line['unit']}{extra} | {line[base]:.3g} "
                    f"({'TRL 1.16' if base == 'trl' else 'transformers generate'}) | {line['speedup']:.2f}x | "
                    f"{line['posttrain_peak_rss_gb']:.2f} / {line[base + '_peak_rss_gb']:.2f} GB | "
                    f"{line['memory_ratio']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--reps", type=int, default=3, help="repetitions per framework (alternating)")
    parser.add_argument("--quick", action="store_true", help="one repetition of each workload")
    parser.add_argument("--steps", type=int, help="optimizer steps per training run (default: per workload)")
    parser.add_argument("--out", help="also write the JSON lines here")
    parser.add_argument("--posttrain-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for posttrain's training runs, to measure a trade-off "
                        "(e.g. train.max_tokens_per_micro_batch=700); not part of the side-by-side defaults")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.posttrain_set:
        os.environ["POSTTRAIN_BENCH_SET"] = json.dumps(dict(item.split("=", 1) for item in args.posttrain_set))
    if args.one:
        workload, side = args.one
        print("RESULT " + json.dumps(run_side(workload, side, args.steps or STEPS[workload])), flush=True)
        return
    reps = 1 if args.quick else args.reps
    lines = []
    for workload in args.workloads:
        runs: dict[str, list[dict]] = {"posttrain": [], "baseline": []}
        for _ in range(reps):
            for side in ("posttrain", "baseline"):
                runs[side].append(measure(workload, side, args.steps or STEPS[workload]))
        line = summarize(workload, runs)
        lines.append(line)
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")
    print()
    print(table(lines))


if __name__ == "__main__":
    main()
