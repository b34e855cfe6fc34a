"""One GGUF file (llama.cpp, Ollama, LM Studio) from a llama-family HF model: weights, tokenizer, chat template.

Follows llama.cpp's ``convert_hf_to_gguf.py`` for its ``llama`` architecture: query and key projections are
permuted from HF's rotate-half layout to llama.cpp's interleaved one, norms stay float32, ``q8_0`` falls back to
float16 for rows that are not a whole number of 32-value blocks, and the byte-level BPE pre-tokenizer is named by
the same fingerprint llama.cpp uses (the hash of a fixed text's token ids). Tensors are read one at a time.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from posttrain.core.errors import UserError
from posttrain.core.weights import LazyWeights
from posttrain.model.load import load_tokenizer

ARCHITECTURES = ("LlamaForCausalLM",)
QUANTS = ("q8_0", "f16", "f32")

# llama.cpp's pre-tokenizer fingerprint: sha256 of str(tokenizer.encode(CHECK_TEXT)) (convert_hf_to_gguf.py)
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's "
    "there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {  # the llama-family entries of llama.cpp's table
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half row order within each head -> llama.cpp's interleaved pairs (its ``LlamaModel.permute``)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1,
                                                                                               2).reshape(weight.shape)


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_rotary` (what a GGUF loader applies)."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1,
                                                                                               2).reshape(weight.shape)


def tensor_type(name: str, shape: tuple[int, ...], quant: str):
    """The GGML type of one tensor under ``quant`` (llama.cpp's choice: 1-D tensors stay float32)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if quant == "f32" or len(shape) == 1 or name == "rope_freqs.weight":
        return Q.F32
    if quant == "q8_0" and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def encode_tensor(tensor: torch.Tensor, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    data = tensor.detach().to(torch.float32).numpy()
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return quants.quantize(data, qtype)


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope theta, scaling) from either config layout (``rope_parameters`` in transformers 5, ``rope_theta`` +
    ``rope_scaling`` before)."""
    parameters = config.get("rope_parameters") or {}
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (parameters if parameters.get("rope_type",
                                                                          "default") != "default" else None)
    return float(theta), scaling


def llama3_rope_factors(config: dict, head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Llama 3.1's per-frequency rope factors, stored by llama.cpp as the ``rope_freqs`` tensor."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def pre_tokenizer_name(tokenizer, override: str | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; an unknown one is refused rather than guessed, since a
    wrong name splits text differently from training without any error."""
    if override:
        return override
    fingerprint = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if fingerprint in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[fingerprint]
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = backend.get("pre_tokenizer") or {}
    if backend.get("normalizer") is None and {k: pre.get(k) for k in GPT2_PRE_TOKENIZER} == GPT2_PRE_TOKENIZER:
        return "gpt-2"  # plain GPT-2 byte-level splitting, whatever the vocabulary
    raise UserError(f"export: the tokenizer's pre-tokenizer is not one llama.cpp knows by fingerprint ({fingerprint}); "
                    "pass --tokenizer-pre NAME with llama.cpp's name for it (e.g. llama-bpe, smollm, gpt-2)")


def add_tokenizer(writer, directory: Path, vocab_size: int, pre_override: str | None) -> None:
    """The byte-level BPE vocabulary, merges, special ids, BOS / EOS behaviour and chat template."""
    import gguf

    tokenizer = load_tokenizer(str(directory))
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or backend["model"].get("byte_fallback"):
        raise UserError("export: only byte-level BPE tokenizers (Llama 3, SmolLM) are written to GGUF here; for a "
                        "SentencePiece tokenizer run llama.cpp's convert_hf_to_gguf.py on the exported HF directory")
    pre = pre_tokenizer_name(tokenizer, pre_override)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[index].special or (by_id[index].startswith("<|") and by_id[index].endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise UserError(f"export: {directory}/tokenizer.json has no BPE merges")
    probe = tokenizer("a")["input_ids"]  # what the HF tokenizer really adds, not what a config file claims
    special.add_special_token = {"bos": tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
                                 "eos": tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id}
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def write_gguf(directory: Path, out: Path, quant: str = "q8_0", tokenizer_pre: str | None = None) -> dict:
    """Write ``directory`` (a full HF model with safetensors weights) as one GGUF file; returns a summary."""
    import gguf

    if quant not in QUANTS:
        raise UserError(f"export: --quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    config = json.loads((directory / "config.json").read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise UserError(f"export: GGUF export covers the llama architecture ({', '.join(ARCHITECTURES)}); this model "
                        f"is {architecture}. Export it as an HF directory and convert it with llama.cpp's "
                        "convert_hf_to_gguf.py")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(staging), "llama")
    extra = add_hyperparameters(writer, config, out.stem, quant)
    add_tokenizer(writer, directory, config["vocab_size"], tokenizer_pre)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with ExitStack() as stack:
        counts = add_tensors(writer, LazyWeights(directory, stack), config, quant, extra)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        except BaseException:  # a full disk or a kill mid-write leaves no half-written file behind
            staging.unlink(missing_ok=True)
            raise
    staging.replace(out)
    return {"path": str(out), "quant": quant, "bytes": out.stat().st_size, "tensors": counts}


def head_counts(config: dict) -> tuple[int, int, int]:
    """(attention heads, key / value heads, head dimension)."""
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads, config.get("head_dim") or config["hidden_size"] // heads


def add_hyperparameters(writer, config: dict, name: str, quant: str) -> dict[str, torch.Tensor]:
    """The llama architecture's keys; returns the extra tensors the rope scaling needs (llama3's frequencies)."""
    import gguf

    heads, kv_heads, head_dim = head_counts(config)
    theta, scaling = rope_settings(config)
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "f32": gguf.LlamaFileType.ALL_F32}[quant]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(file_type)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if scaling is None:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
        return {}
    if kind == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(config, head_dim, theta, scaling)}
    raise UserError(f"export: rope scaling {kind!r} is not written to GGUF here (linear and llama3 are)")


def add_tensors(writer, weights: LazyWeights, config: dict, quant: str, extra: dict) -> dict[str, int]:
    """Every weight under its GGUF name, encoded as ``quant`` says (q and k rows permuted for llama.cpp's rotary
    layout); returns the count of tensors per GGUF type."""
    import gguf
    from tqdm.auto import tqdm

    heads, kv_heads, _ = head_counts(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    counts: dict[str, int] = {}

    def add(name: str, tensor: torch.Tensor) -> None:
        qtype = tensor_type(name, tuple(tensor.shape), quant)
        writer.add_tensor(name, encode_tensor(tensor, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1

    for name, tensor in extra.items():
        add(name, tensor)
    keys = [k for k in weights.where if not (config.get("tie_word_embeddings") and k == "lm_head.weight")]
    for key in tqdm(keys, desc=f"writing GGUF ({quant})", unit="tensor"):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"export: tensor {key} has no GGUF name in the llama architecture")
        tensor = weights[key]
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_rotary(tensor, heads)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_rotary(tensor, kv_heads)
        add(name, tensor)
    return counts
