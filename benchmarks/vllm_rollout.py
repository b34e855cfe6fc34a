"""vLLM rollouts against transformers rollouts on the same prompts: tokens/s, and the weight-sync check.

Start a server first (its own environment: ``make vllm-env``), e.g. in float32 for the exactness check:

    .venv-vllm/bin/python -m posttrain.rollout.vllm_server --model MODEL_DIR --dtype float32 &
    .venv/bin/python benchmarks/vllm_rollout.py --prompts 32 --new-tokens 24

It reports: greedy tokens/s of each engine (the second vLLM call, after the first weight push); then it changes
the policy's weights (scales every MLP down-projection by 1.05), syncs, and counts how many greedy completions of
the server equal transformers' greedy completions of the *updated* weights (and of the old ones), the largest
log-prob difference on identical completions, and the mean difference between the server's sampled log-probs and
the trainer's at temperature 0.7. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

import numpy as np
import torch

from posttrain.data.batching import collate
from posttrain.data.tokenize import TokenizedExample
from posttrain.model.load import load_model, load_tokenizer, resolve_model
from posttrain.rollout.backend import SamplingSettings, TransformersBackend
from posttrain.rollout.vllm_client import VLLMBackend
from posttrain.model.forward import TargetLogprobs


def timed(backend, prompts, settings, seeds):
    start = time.perf_counter()
    out = backend.generate(prompts, seeds, settings)
    seconds = time.perf_counter() - start
    return out, sum(len(c.token_ids) for c in out) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8011")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    path = resolve_model("default")
    tokenizer, model = load_tokenizer(path), load_model(path)
    records = [json.loads(line) for line in (resources.files("posttrain") / "assets" / "arithmetic_eval_200.jsonl")
               .read_text().splitlines()][: args.prompts]
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                  add_generation_prompt=True,
                                                  tokenize=True)["input_ids"]) for r in records]
    served, local = VLLMBackend(model, tokenizer, args.url, "/tmp/vllm-bench"), TransformersBackend(model, tokenizer,
                                                                                                    64)
    greedy, zeros = SamplingSettings(args.new_tokens, 0.0), [0] * len(prompts)
    served.generate(prompts, zeros, greedy)  # pushes the weights once
    vllm_out, vllm_speed = timed(served, prompts, greedy, zeros)
    hf_out, hf_speed = timed(local, prompts, greedy, zeros)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp.down_proj" in name:
                param.mul_(1.05)
    served.sync(model)
    after = served.generate(prompts, zeros, greedy)
    hf_after = local.generate(prompts, zeros, greedy)
    same = [a.token_ids == b.token_ids for a, b in zip(after, hf_after)]
    logp_gap = max((max(abs(x - y) for x, y in zip(a.sampler_logps, b.sampler_logps)) for a, b, s in zip(after,
                                                                                                         hf_after,
                                                                                                         same) if s),
                   default=float("nan"))
    sampled = served.generate(prompts, list(range(len(prompts))), SamplingSettings(args.new_tokens, 0.7))
    examples = []
    for prompt, completion in zip(prompts, sampled):
        weights = np.zeros(len(prompt) + len(completion.token_ids), np.float32)
        weights[len(prompt):] = 1
        examples.append(TokenizedExample(np.array(prompt + completion.token_ids), weights))
    batch = collate(examples, tokenizer.pad_token_id, packing=False)
    with torch.no_grad():
        trainer = TargetLogprobs(model, temperature=0.7)(batch.input_ids, batch.position_ids, batch.attention_mask,
                                                         batch.target_index, batch.target_ids)
    sampler = torch.tensor([x for c in sampled for x in c.sampler_logps], dtype=torch.float64)
    print(json.dumps({"prompts": len(prompts), "new_tokens": args.new_tokens, "vllm_tokens_per_s": vllm_speed,
                      "transformers_tokens_per_s": hf_speed, "speedup": vllm_speed / hf_speed,
                      "greedy_identical_before_update": sum(a.token_ids == b.token_ids for a, b in zip(vllm_out,
                                                                                                       hf_out)),
                      "greedy_identical_after_update": sum(same),
                      "greedy_identical_to_old_weights": sum(a.token_ids == b.token_ids for a, b in zip(after, hf_out)),
                      "max_logp_gap_greedy": logp_gap,
                      "mean_sampler_trainer_gap_t07": float((trainer.double() - sampler).abs().mean())}))


if __name__ == "__main__":
    main()
