"""rollout.engine: vllm. The weight sync (LoRA merged out of place in float32, pushed before the next rollout,
never between reused rollouts) and the client's protocol, against a stand-in server that speaks the same HTTP
API with transformers inside; the real vLLM server is tested when ``.venv-vllm`` exists (``make vllm-env``)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from helpers import metrics, run_command
from posttrain.rollout.backend import SamplingSettings, TransformersBackend
from posttrain.rollout.vllm_client import VLLMBackend, merged_weights


class StandIn:
    """The vllm_server API over a plain transformers model: /weights loads the pushed file into it."""

    def __init__(self, model_dir, tokenizer):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.backend = TransformersBackend(self.model, tokenizer)
        self.loads = 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.reply({"ok": True})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/weights":
                    stand_in.model.load_state_dict(load_file(body["path"]))
                    stand_in.loads += 1
                    return self.reply({"tensors": 1})
                settings = SamplingSettings(body["max_new_tokens"], body["temperature"], body["top_p"], body["top_k"],
                                            tuple(body["stop"]))
                outs = stand_in.backend.generate(body["prompts"], body["seeds"], settings)
                self.reply({"completions": [{"token_ids": c.token_ids, "logprobs": c.sampler_logps,
                                             "finish_reason": "length" if c.truncated else "stop"} for c in outs]})

            def reply(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def stand_in(tiny_model_dir, tiny_tokenizer):
    server = StandIn(tiny_model_dir, tiny_tokenizer)
    yield server
    server.server.shutdown()


def test_merged_weights_leave_the_adapter_unmerged(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = merged_weights(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing merged in place
    assert all(v.dtype == torch.float32 for v in weights.values()) and not any("lora" in k for k in weights)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()) * layer.scaling["default"]
    expected = layer.base_layer.weight.float() + delta
    assert torch.allclose(weights["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)


def test_after_an_update_the_server_samples_from_the_trained_weights(tiny_model_dir, tmp_path, stand_in):
    """GRPO with LoRA through the server: weights pushed before each rollout (not between reused ones), and
    after training the server's greedy completions equal transformers' greedy completions of the final policy."""
    from posttrain.model.load import load_model, load_tokenizer

    run_command("grpo", tiny_model_dir, tmp_path, **{
        "rollout.engine": "vllm", "rollout.vllm_url": stand_in.url, "rollout.num_generations": 4,
        "rollout.max_new_tokens": 12, "rewards": "[{name: length, options: {per: 10}}]", "rl.reward_workers": 0,
        "train.max_steps": 4, "rl.num_iterations": 2, "peft.method": "lora", "train.lr": 5e-2,
        "train.precision": "fp32"})
    assert stand_in.loads == 2  # rollouts at steps 1 and 3
    assert metrics(tmp_path)[1]["policy/sampler_mismatch"] < 1e-4  # the server sampled with the weights trained on
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_model(str(tmp_path / "final"))
    client = VLLMBackend(policy, tokenizer, stand_in.url, tmp_path)
    prompts = [tokenizer("What is 2 + 2?")["input_ids"], tokenizer("Name a colour.")["input_ids"]]
    greedy = SamplingSettings(max_new_tokens=10, temperature=0.0)
    served = client.generate(prompts, [0, 0], greedy)
    local = TransformersBackend(policy, tokenizer).generate(prompts, [0, 0], greedy)
    assert [c.token_ids for c in served] == [c.token_ids for c in local]
    for a, b in zip(served, local):
        assert a.sampler_logps == pytest.approx(b.sampler_logps, abs=1e-5)


def test_a_missing_server_is_a_clear_error(tiny_model_dir, tmp_path):
    from posttrain.core.errors import UserError

    with pytest.raises(UserError, match="make vllm-env"):
        run_command("grpo", tiny_model_dir, tmp_path,
                    **{"rollout.engine": "vllm", "rollout.vllm_url": "http://127.0.0.1:9",
                                                         "rollout.num_generations": 2, "rl.reward_workers": 0})


def vllm_python():
    import os
    from pathlib import Path

    candidate = os.environ.get("POSTTRAIN_VLLM_PYTHON") or str(
        Path(__file__).resolve().parents[1] / ".venv-vllm/bin/python"
    )
    return candidate if Path(candidate).exists() else None


@pytest.mark.slow
@pytest.mark.skipif(vllm_python() is None, reason="no vLLM environment (make vllm-env, or POSTTRAIN_VLLM_PYTHON)")
def test_real_vllm_server_samples_from_the_pushed_weights(tiny_model_dir, tmp_path):
    """The real server (float32): after GRPO updates a LoRA policy, its greedy completions equal transformers'
    greedy completions of the trained weights, and its log-probs match the trainer's."""
    import os
    import socket
    import subprocess
    import time
    import urllib.request
    from pathlib import Path

    from posttrain.model.load import load_model, load_tokenizer

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "model"  # vLLM's CPU attention needs a head size of at least 32: heads of 64 here
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                 tie_word_embeddings=True, eos_token_id=2, pad_token_id=2,
                                 bos_token_id=1)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    src = str(Path(__file__).resolve().parents[1] / "src")
    server = subprocess.Popen([vllm_python(), "-m", "posttrain.rollout.vllm_server", "--model", str(model_dir),
                               "--dtype", "float32", "--port", str(port), "--max-model-len", "512"],
                              env={**os.environ, "PYTHONPATH": src, "VLLM_CPU_KVCACHE_SPACE": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, "the vLLM server exited"
                time.sleep(1)
        run_command("grpo", model_dir, tmp_path / "run", **{
            "rollout.engine": "vllm", "rollout.vllm_url": url, "rollout.num_generations": 4,
            "rollout.max_new_tokens": 12,
            "rewards": "[{name: length, options: {per: 10}}]", "rl.reward_workers": 0, "train.max_steps": 3,
            "peft.method": "lora", "train.lr": 5e-2, "train.precision": "fp32"})
        assert max(m["policy/sampler_mismatch"] for m in metrics(tmp_path / "run")) < 1e-3
        tokenizer = load_tokenizer(str(model_dir))
        policy = load_model(str(tmp_path / "run" / "final"))
        prompts = [tokenizer("What is 2 + 2?")["input_ids"], tokenizer("Name a colour.")["input_ids"]]
        greedy = SamplingSettings(max_new_tokens=10, temperature=0.0)
        served = VLLMBackend(policy, tokenizer, url, tmp_path).generate(prompts, [0, 0], greedy)
        local = TransformersBackend(policy, tokenizer).generate(prompts, [0, 0], greedy)
        assert [c.token_ids for c in served] == [c.token_ids for c in local]
        for a, b in zip(served, local):
            assert a.sampler_logps == pytest.approx(b.sampler_logps, abs=1e-3)
    finally:
        server.terminate()
        server.wait(timeout=60)
