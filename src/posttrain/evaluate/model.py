"""A model under evaluation: loaded once on the best device, its generations cached on disk.

The cache key is (model fingerprint, rendered prompt, sampling settings, seed, sample index); the fingerprint is a
hash of the weights, config and tokenizer files, so a retrained model in the same directory never reuses stale
generations, and re-running an evaluation, or adding a task over the same prompts, generates nothing new. Each
sample's seed is a function of the prompt text and the sample index, not of its position in a file, so the same
prompt gets the same samples in any data set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from posttrain.core.cache import cache_root, digest_files
from posttrain.model.load import load_model, load_tokenizer, resolve_model
from posttrain.rollout.backend import SamplingSettings, TransformersBackend
from posttrain.rollout.generate import render_prompt

FINGERPRINTED = ("*.safetensors", "*.bin", "*.gguf", "config.json", "adapter_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def fingerprint(path: str) -> str:
    """sha256 over the files that decide what a model generates, an adapter's base model included (memoized by
    path, size and mtime)."""
    root = Path(path)
    files = sorted({f for pattern in FINGERPRINTED for f in root.glob(pattern) if f.is_file()})
    if (root / "adapter_config.json").exists():
        base = json.loads((root / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            files += sorted({f for pattern in FINGERPRINTED for f in Path(base).glob(pattern) if f.is_file()})
    return digest_files(files)


@dataclass
class Generation:
    text: str
    tokens: int
    truncated: bool  # stopped by the token limit, not by the end of turn


class KeyedCache:
    """``key -> value`` as JSON lines in one file per model fingerprint under ``cache_root()/kind``, appended as
    values arrive. Values are instances of ``value_type`` (a dataclass) or plain JSON values."""

    def __init__(self, kind: str, model_fingerprint: str, value_type=None):
        self.file = cache_root() / kind / f"{model_fingerprint[:32]}.jsonl"
        self.value_type = value_type
        self.entries: dict = {}
        if self.file.exists():
            for line in self.file.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill mid-write: that value is made again
                key = entry.pop("key")
                self.entries[key] = value_type(**entry) if value_type else entry["value"]

    def put(self, items: dict) -> None:
        self.entries.update(items)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        encode = asdict if self.value_type else (lambda value: {"value": value})
        with open(self.file, "a") as handle:
            handle.write("".join(json.dumps({"key": k, **encode(v)}) + "\n" for k, v in items.items()))


def generation_cache(model_fingerprint: str) -> KeyedCache:
    return KeyedCache("generations", model_fingerprint, Generation)


def sample_key(rendered: str, settings: SamplingSettings, seed: int, sample: int) -> str:
    spec = [rendered, settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k,
            list(settings.stop), seed, sample]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


class EvalModel:
    """A model spec ('default', a run or model directory, a .gguf file) or an in-memory model (during training;
    uncached, since its weights change)."""

    def __init__(self, spec: str | None = None, model=None, tokenizer=None, name: str | None = None,
                 batch_size: int = 64, cache: bool = True):
        if spec is None and model is None:
            raise ValueError("EvalModel needs a model spec or a model")
        self.spec, self.name = spec, name or spec or "model"
        self.batch_size, self.use_cache = batch_size, cache and spec is not None
        if model is not None:
            self.__dict__["model"] = model
        if tokenizer is not None:
            self.__dict__["tokenizer"] = tokenizer

    @cached_property
    def path(self) -> str:
        return resolve_model(self.spec)

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.path)

    @cached_property
    def model(self):
        from accelerate import PartialState

        model = load_model(self.path)
        if hasattr(model, "merge_and_unload"):  # an adapter: merged for inference, one matmul per layer
            model = model.merge_and_unload()
        return model.to(PartialState().device).eval()

    @cached_property
    def cache(self) -> KeyedCache | None:
        return generation_cache(fingerprint(self.path)) if self.use_cache else None

    def generate(self, prompts: list, settings: SamplingSettings, samples: int = 1, seed: int = 0,
                 progress: bool = True) -> list[list[Generation]]:
        """``samples`` generations per prompt (strings or message lists, rendered with the chat template)."""
        rendered = [render_prompt(self.tokenizer, p) for p in prompts]
        seed = seed if settings.temperature > 0 else 0  # greedy replies do not depend on it: one cache entry
        keys = [[sample_key(text, settings, seed, s) for s in range(samples)] for text in rendered]
        known = self.cache.entries if self.cache is not None else {}
        todo = sorted({(i, s) for i, row in enumerate(keys) for s, key in enumerate(row) if key not in known})
        if todo:
            ids = {i: self.tokenizer(rendered[i], add_special_tokens=False)["input_ids"] for i, _ in todo}
            seeds = [int(keys[i][s][:15], 16) for i, s in todo]  # a function of prompt, settings, seed and sample
            backend = TransformersBackend(self.model, self.tokenizer, self.batch_size, progress=progress)
            made = backend.generate([ids[i] for i, _ in todo], seeds, settings)
            new = {keys[i][s]: Generation(c.text, len(c.token_ids), c.truncated) for (i, s), c in zip(todo, made)}
            if self.cache is not None:
                self.cache.put(new)
            known = {**known, **new}
        return [[known[key] for key in row] for row in keys]
