"""GGUF export: files that posttrain's own GGUF loader (transformers) and llama.cpp read back as the same model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.core.errors import UserError
from posttrain.apps.gguf_export import permute_rotary, tensor_type, unpermute_rotary, write_gguf

MESSAGES = [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                                        "many clips in May. How many clips did Natalia sell altogether?"}]


def reload(gguf_file: Path, cache: Path, monkeypatch) -> Path:
    """The file through posttrain's GGUF loader (``model: x.gguf``), its conversion cache kept in the test."""
    from posttrain.model.load import convert_gguf

    monkeypatch.setenv("POSTTRAIN_CACHE", str(cache))
    directory = convert_gguf(gguf_file)
    monkeypatch.undo()
    return directory


def load(directory):
    from posttrain.model.load import load_model, load_tokenizer

    return load_model(str(directory)).eval(), load_tokenizer(str(directory))


def prompt_ids(tokenizer) -> torch.Tensor:
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def target_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)
    return logprobs.gather(1, ids[0, 1:, None])[:, 0]


def roundtrip(tensor: torch.Tensor, quant: str) -> torch.Tensor:
    """What a GGUF reader gets back for ``tensor`` written under ``quant`` (gguf's reference quantizer)."""
    from gguf import quants

    qtype = tensor_type("x", tuple(tensor.shape), quant)
    data = tensor.float().numpy()
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(quants.quantize(data, qtype),
                                                                   qtype))).reshape(tensor.shape)


def test_rotary_permutation_is_llama_cpps_and_inverts():
    rows = torch.arange(8.0)[:, None]  # one head of 8 rows: halves (0 1 2 3 | 4 5 6 7) -> pairs (0 4 1 5 2 6 3 7)
    assert permute_rotary(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    weight = torch.randn(24, 5)
    assert torch.equal(unpermute_rotary(permute_rotary(weight, 3), 3), weight)


def test_tensor_types_follow_llama_cpp():
    assert tensor_type("blk.0.attn_norm.weight", (32,), "q8_0").name == "F32"
    assert tensor_type("blk.0.attn_q.weight", (32, 64), "q8_0").name == "Q8_0"
    assert tensor_type("blk.0.attn_q.weight", (32, 48), "q8_0").name == "F16"  # rows not whole 32-value blocks
    assert tensor_type("token_embd.weight", (384, 32), "f16").name == "F16"
    assert tensor_type("token_embd.weight", (384, 32), "f32").name == "F32"


def test_f32_export_reloads_as_the_same_model(tiny_model_dir, tmp_path, monkeypatch):
    import gguf

    out = tmp_path / "tiny.gguf"
    summary = write_gguf(tiny_model_dir, out, "f32")
    assert summary["tensors"] == {"F32": 2 * 9 + 2}  # 9 per layer, embedding (tied: no output.weight), final norm
    reader = gguf.GGUFReader(str(out))
    fields = {name: reader.fields[name].contents() for name in ("general.architecture", "tokenizer.ggml.model",
                                                                  "tokenizer.ggml.pre", "llama.attention.head_count_kv",
                                                                  "tokenizer.ggml.add_bos_token")}
    assert fields == {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                      "llama.attention.head_count_kv": 2, "tokenizer.ggml.add_bos_token": False}

    (model, tokenizer), (back,
                         back_tokenizer) = load(tiny_model_dir), load(reload(out, tmp_path / "cache", monkeypatch))
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back_tokenizer.chat_template == tokenizer.chat_template
    ids = prompt_ids(tokenizer)
    assert torch.equal(prompt_ids(back_tokenizer), ids)
    assert torch.equal(back.generate(ids, max_new_tokens=12, do_sample=False),
                       model.generate(ids, max_new_tokens=12, do_sample=False))


@pytest.mark.parametrize("quant", ["q8_0", "f16"])
def test_quantized_export_holds_the_quantized_weights(tiny_model_dir, tmp_path, monkeypatch, quant):
    """Each weight comes back as gguf's own quantize-dequantize of it, so the log-probs are those of the HF model
    with exactly that rounding applied."""
    out = tmp_path / f"tiny-{quant}.gguf"
    write_gguf(tiny_model_dir, out, quant)
    (model, tokenizer), (back, _) = load(tiny_model_dir), load(reload(out, tmp_path / "cache", monkeypatch))
    config = model.config
    expected = {}
    for name, tensor in model.state_dict().items():
        if tensor.dim() == 1:
            expected[name] = tensor
            continue
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(name.split(".")[-2])
        if heads is None:
            expected[name] = roundtrip(tensor, quant)
        else:  # quantized in llama.cpp's row order, read back in HF's
            expected[name] = unpermute_rotary(roundtrip(permute_rotary(tensor, heads), quant), heads)
        assert torch.equal(back.state_dict()[name], expected[name]), name
        assert not torch.equal(expected[name], tensor), name  # the rounding is really there
    model.load_state_dict(expected)
    ids = prompt_ids(tokenizer)
    torch.testing.assert_close(target_logprobs(back, ids), target_logprobs(model, ids), rtol=0, atol=1e-5)


def test_refusals_name_the_way_out(tiny_model_dir, tmp_path):
    other = tmp_path / "qwen"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(UserError, match="llama architecture.*Qwen2ForCausalLM.*convert_hf_to_gguf"):
        write_gguf(other, tmp_path / "x.gguf")

    digits = tmp_path / "digits"  # a pre-tokenizer llama.cpp has no fingerprint for: refused, not guessed
    shutil.copytree(tiny_model_dir, digits)
    tokenizer_json = json.loads((digits / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, tokenizer_json["pre_tokenizer"]]}
    (digits / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(UserError, match="--tokenizer-pre"):
        write_gguf(digits, tmp_path / "x.gguf")
    write_gguf(digits, tmp_path / "x.gguf", "f32", tokenizer_pre="smollm")
    assert not list(tmp_path.glob(".*.tmp"))  # the refused exports left no half-written file


def test_cli_exports_a_lora_run_with_the_adapter_merged(tiny_model_dir, tmp_path, monkeypatch):
    from helpers import run_sft

    from posttrain.apps.cli import main

    run = tmp_path / "run"
    run_sft(tiny_model_dir, run, **{"peft.method": "lora", "train.precision": "fp32", "train.lr": 5e-2})
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(run), "--format", "gguf", "--quant", "f32", "--out", str(tmp_path / "run.gguf")]) == 0
    (merged, _), (back, _) = load(tmp_path / "hf"), load(reload(tmp_path / "run.gguf", tmp_path / "cache", monkeypatch))
    (base, _) = load(tiny_model_dir)
    for name, tensor in merged.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert not torch.equal(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           base.state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_embedded_model_q8_0_gives_the_same_greedy_completion(tmp_path, monkeypatch):
    from posttrain.model.load import resolve_model

    source = Path(resolve_model("default"))
    out = tmp_path / "smollm2-q8_0.gguf"
    summary = write_gguf(source, out, "q8_0")
    assert summary["tensors"] == {"Q8_0": 30 * 7 + 1, "F32": 30 * 2 + 1}
    (model, tokenizer), (back, back_tokenizer) = load(source), load(reload(out, tmp_path / "cache", monkeypatch))
    ids = prompt_ids(tokenizer)
    assert torch.equal(prompt_ids(back_tokenizer), ids)
    completion = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(back.generate(ids, max_new_tokens=24, do_sample=False), completion)
    drift = (target_logprobs(back, completion) - target_logprobs(model, completion)).abs()
    assert drift.mean() < 0.2, drift  # 8-bit blocks: measured 0.04 nats per token (max 0.35)


def llama_cpp_logprobs(path: Path, ids: list[int]) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    llm.eval(ids)
    logprobs = torch.tensor(np.array(llm.scores[:len(ids)]))[:-1].log_softmax(-1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_llama_cpp_reads_the_export_as_transformers_does(tiny_model_dir, tmp_path):
    """Only where llama-cpp-python is installed (it builds from source: not in CI)."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "tiny.gguf"
    write_gguf(tiny_model_dir, out, "f32")
    model, tokenizer = load(tiny_model_dir)
    ids = prompt_ids(tokenizer)
    torch.testing.assert_close(llama_cpp_logprobs(out, ids[0].tolist()), target_logprobs(model, ids),
                               rtol=0, atol=2e-3)  # llama.cpp keeps its KV cache in float16


def test_llama_cpp_completes_the_embedded_export_like_transformers(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from posttrain.model.load import resolve_model

    source = Path(resolve_model("default"))
    out = tmp_path / "smollm2-q8_0.gguf"
    write_gguf(source, out, "q8_0")
    model, tokenizer = load(source)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False)
    ids = tokenizer(text)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids  # chat markup read as special tokens
    completion = llm(text, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
    expected = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
    assert completion == tokenizer.decode(expected, skip_special_tokens=True)
