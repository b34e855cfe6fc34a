"""Values another model computes once over the training data (a teacher's top-k, reference log-probs).

The other model is loaded, run over every example, and freed before training; what it computed is
cached in the run directory under a hash of its weights, the precision, the token ids and the
settings, so a resumed run reads the cache and a changed model or dataset recomputes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from posttrain.core.errors import UserError
from posttrain.data.batching import Batch
from posttrain.model.load import load_model, load_tokenizer, resolve_model
from posttrain.train.reference import weights_fingerprint


@dataclass
class TargetTable:
    """Per-target values of every example of a dataset, flat in example order (``offsets[i]:offsets[i+1]``)."""

    values: dict[str, torch.Tensor]
    offsets: torch.Tensor  # [n + 1]

    def for_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The values of ``batch``'s targets, in the batch's target order."""
        rows = self.offsets[batch.example_index.cpu()[batch.target_example.cpu()]] + batch.target_rank.cpu()
        return {name: values[rows].to(batch.input_ids.device) for name, values in self.values.items()}

    def per_example(self, name: str) -> torch.Tensor:
        """Each example's sum of ``name`` over its targets [n]."""
        owner = torch.repeat_interleave(torch.arange(len(self.offsets) - 1), self.offsets.diff())
        return torch.zeros(len(self.offsets) - 1, dtype=self.values[name].dtype).index_add(0, owner, self.values[name])


def load_frozen(spec: str, recipe, tokenizer, device, name: str):
    """A frozen auxiliary model (teacher, reference) whose token-level values must line up with the trained model's
    tokens: refused unless it shares the tokenizer; float64 in fp64 runs, float32 otherwise (autocast does the rest)."""
    resolved = resolve_model(spec)
    if load_tokenizer(resolved, recipe.trust_remote_code).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{name}: {spec} has a different tokenizer than the model being trained; its token-level "
                        "values would not line up with the training tokens")
    dtype = torch.float64 if recipe.train.precision == "fp64" else torch.float32
    return load_model(resolved, recipe.trust_remote_code, dtype).eval().requires_grad_(False).to(device)


def compute_targets(spec: str, examples: list, collate: Callable, compute: Callable, recipe, accelerator, tokenizer,
                    name: str, settings: str = "") -> TargetTable:
    """Run the model ``spec`` over ``examples`` (each with ``.index``) once; ``compute(model, batch)`` returns
    per-target tensors [N, ...] for a batch. Cached in ``output_dir/{name}.safetensors``."""
    path = Path(recipe.output_dir) / f"{name}.safetensors"
    counts = torch.tensor([e.num_targets for e in examples])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    with accelerator.main_process_first():
        model = load_frozen(spec, recipe, tokenizer, accelerator.device, name)
        digest = hashlib.sha256(f"{weights_fingerprint(model)}|{recipe.train.precision}|{settings}".encode())
        for example in examples:
            digest.update(example.input_ids.tobytes())
            digest.update(example.weights.tobytes())
        key = digest.digest()
        if path.exists():
            cached = load_file(path)
            if bytes(cached.pop("key").tolist()) == key:
                return TargetTable(cached, offsets)
        values: dict[str, torch.Tensor] = {}
        size = recipe.train.batch_size
        with torch.no_grad(), accelerator.autocast():
            for start in tqdm(range(0, len(examples), size), desc=name, disable=not accelerator.is_main_process):
                batch = collate(examples[start : start + size]).to(accelerator.device)
                rows = offsets[batch.example_index.cpu()[batch.target_example.cpu()]] + batch.target_rank.cpu()
                for field, part in compute(model, batch).items():
                    if field not in values:
                        values[field] = torch.zeros((int(offsets[-1]), *part.shape[1:]), dtype=part.dtype)
                    values[field][rows] = part.cpu()
        del model
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({**values, "key": torch.tensor(list(key), dtype=torch.uint8)}, path)
    return TargetTable(values, offsets)
