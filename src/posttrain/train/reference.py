"""The reference model of preference losses, in one of four forms.

- ``adapter_disabled``: the policy itself with its PEFT adapter switched off (no second model);
- ``policy_copy``: a frozen copy of the initial policy (full fine-tuning);
- ``precomputed``: one pass before training over the whole dataset, cached in the run
  directory under a hash of the reference weights (a fingerprint of every tensor), the
  precision and the token ids, reused on resume and invalidated by any change of those;
- ``none``: reference-free losses (SimPO, ORPO, CPO, ...).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from posttrain.core.errors import UserError
from posttrain.model.forward import TargetLogprobs


class Reference:
    def __init__(self, recipe, needed: bool, loss_names: list[str]):
        self.recipe, self.needed, self.loss_names = recipe, needed, loss_names
        self.mode = "none"
        self.frozen: TargetLogprobs | None = None
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def setup(self, model, accelerator) -> None:
        mode = self.recipe.reference
        has_adapter = hasattr(model, "peft_config")
        if mode == "auto":
            mode = "none" if not self.needed else ("adapter_disabled" if has_adapter else "policy_copy")
        if mode == "none" and self.needed:
            raise UserError(f"loss.name {self.loss_names} needs a reference model; reference: none is for "
                            f"reference-free losses")
        if mode != "none" and not self.needed:
            raise UserError(f"reference: {mode} is set but loss.name {self.loss_names} does not use a reference")
        if mode == "adapter_disabled" and not has_adapter:
            raise UserError("reference: adapter_disabled needs a PEFT adapter (peft.method); use policy_copy for full "
                            "fine-tuning")
        self.mode = mode
        if mode == "policy_copy" or (mode == "precomputed" and not has_adapter):
            frozen = copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device)
            self.frozen = TargetLogprobs(frozen, self.recipe.train.logprob_chunk)

    def prepare(self, model, accelerator, splits: dict[str, list], collate: Callable, compute: Callable) -> None:
        """Choose the reference and, for ``precomputed``, fill the cache of every non-empty split."""
        self.setup(model, accelerator)
        if self.mode == "precomputed":
            for split, examples in splits.items():
                if examples:
                    self.precompute(split, examples, collate, compute, model, accelerator)

    @torch.no_grad()
    def run(self, module, fn: Callable, *args):
        """``fn(reference_module, *args)`` without gradients, on the copy or on the adapter-less policy."""
        if self.frozen is not None:
            return fn(self.frozen, *args)
        inner = getattr(module, "module", module)  # unwrap DDP: no gradient sync for the reference pass
        with inner.model.disable_adapter():
            return fn(inner, *args)

    def precompute(self, split: str, examples: list, collate: Callable, compute: Callable, model, accelerator) -> None:
        """Fill ``cache[split]`` with ``compute(reference, batch)`` (a dict of per-example tensors) over
        ``examples``."""
        path = Path(self.recipe.output_dir) / f"reference_logps.{split}.safetensors"
        key = self.cache_key(examples, model)
        with accelerator.main_process_first():
            if path.exists():
                cached = load_file(path)
                if bytes(cached.pop("key").tolist()) == key:
                    self.cache[split] = cached
                    return
            module = TargetLogprobs(model, self.recipe.train.logprob_chunk)
            size = self.recipe.train.batch_size
            parts: dict[str, list[torch.Tensor]] = {}
            for start in tqdm(range(0, len(examples), size), desc=f"reference log-probs ({split})",
                              disable=not accelerator.is_main_process):
                batch = collate(examples[start : start + size]).to(accelerator.device)
                for name, values in self.run(module, compute, batch).items():
                    parts.setdefault(name, []).append(values.cpu())
            tensors = {name: torch.cat(values) for name, values in parts.items()}
            if accelerator.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({**tensors, "key": torch.tensor(list(key), dtype=torch.uint8)}, path)
            self.cache[split] = tensors
        self.frozen = None  # the cache replaces the copy

    def cache_key(self, examples: list, model) -> bytes:
        """The reference log-probs are a function of the reference weights, the precision and the tokens."""
        digest = hashlib.sha256(f"{weights_fingerprint(model)}|{self.recipe.train.precision}".encode())
        for example in examples:
            for ids in example.token_ids():
                digest.update(ids.tobytes())
        return digest.digest()

    def cached(self, split: str, index: torch.Tensor, names: list[str], device) -> dict[str, torch.Tensor]:
        return {name: self.cache[split][name][index].to(device) for name in names}


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """A hash of the weights the reference computes with: each tensor's name, shape, dtype, float64 sum and sum
    of squares, and a strided sample of its values. With a PEFT adapter the (trainable) adapter is left out:
    the reference runs with it disabled. Retraining a model directory in place or changing its dtype changes it."""
    digest = hashlib.sha256()
    with_adapter = hasattr(model, "peft_config")
    for name, param in model.named_parameters():
        if with_adapter and param.requires_grad:
            continue
        flat = param.detach().reshape(-1)
        wide = flat.to(torch.float64)
        sample = wide[:: max(1, flat.numel() // 4096)]
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{float(wide.sum())!r}|{float(wide.square().sum())!r}".encode())
        digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()
