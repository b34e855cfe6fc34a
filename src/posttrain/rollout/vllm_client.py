"""``rollout.engine: vllm``: sampling through a vLLM server (``vllm_server.py``, in its own environment).

After each optimizer step the backend is told the weights changed; before the next rollout it pushes them: the
policy with any LoRA adapter merged **out of place, in float32** (a copy is merged; the trained model is never
merged and unmerged in place, whose bf16 rounding drifts a little further at every step, TRL #6688), written to one
safetensors file that the server loads. Rollouts reused for several steps (``num_iterations``, PPO epochs) push
nothing in between.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from posttrain.core.errors import UserError
from posttrain.rollout.backend import Completion, GenerationStats, SamplingSettings


def merged_weights(model) -> dict[str, torch.Tensor]:
    """The model's full weights in float32 under their base-model names, a LoRA adapter merged into a copy."""
    if hasattr(model, "peft_config"):
        model = copy.deepcopy(model).float().merge_and_unload()
    return {name: tensor.detach().to("cpu", torch.float32, copy=True) for name, tensor in model.state_dict().items()}


class VLLMBackend:
    def __init__(self, model, tokenizer, url: str, weights_dir: Path, timeout: float = 3600.0):
        self.model, self.tokenizer, self.url, self.timeout = model, tokenizer, url.rstrip("/"), timeout
        self.weights_path = Path(weights_dir) / "vllm_weights.safetensors"
        self.stats = GenerationStats()
        self.stale = True  # the server started from the base model: push the policy before the first rollout
        self.pushes = 0
        try:
            self.call("/health")
        except UserError as exc:
            raise UserError(
                f"rollout.engine: vllm: no server at {self.url} ({exc}). Start one in its own environment: "
                "make vllm-env; .venv-vllm/bin/python -m posttrain.rollout.vllm_server --model MODEL_DIR"
            ) from None

    def call(self, route: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise UserError(f"vLLM server {route}: {json.loads(exc.read()).get('error', exc)}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise UserError(f"vLLM server {route}: {exc}") from None

    def sync(self, model) -> None:
        self.model, self.stale = model, True

    def push(self) -> None:
        from safetensors.torch import save_file

        self.weights_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(merged_weights(self.model), self.weights_path)
        self.call("/weights", {"path": str(self.weights_path.resolve())})
        self.stale, self.pushes = False, self.pushes + 1

    def generate(self, prompts: list[list[int]], seeds: list[int], settings: SamplingSettings) -> list[Completion]:
        if self.stale:
            self.push()
        start = time.perf_counter()
        answer = self.call("/generate", {"prompts": prompts, "seeds": [s % 2**31 for s in seeds],
                                         "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                                         "top_p": settings.top_p, "top_k": settings.top_k, "stop": list(settings.stop)})
        out = [Completion(c["token_ids"], c["logprobs"], c["finish_reason"] == "length",
                          self.tokenizer.decode(c["token_ids"],
                                                skip_special_tokens=True)) for c in answer["completions"]]
        self.stats.seconds += time.perf_counter() - start
        self.stats.tokens += sum(len(c.token_ids) for c in out)
        return out
