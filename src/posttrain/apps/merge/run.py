"""``posttrain merge RECIPE.yaml``: the merging methods over model directories, one tensor at a time.

Inputs are read lazily from their safetensors files (sharded or not), so memory holds the merged model being
built plus one tensor of each input. A run directory or adapter directory is first merged into its base (once,
into a temporary directory). The output directory gets the merged ``model.safetensors`` with the config and
tokenizer of the base model (or of the first model when the method has no base).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from posttrain.apps.export import export_merged
from posttrain.apps.merge import methods
from posttrain.core.config import Section
from posttrain.core.errors import UserError
from posttrain.core.weights import LazyWeights
from posttrain.evaluate.heldout import heldout_loss
from posttrain.model.load import resolve_model

NEEDS_BASE = {"task_arithmetic", "ties", "dare", "dare_ties", "model_stock", "lines", "wise_ft", "transfer"}
PAIRS = {"slerp": 2, "lines": 1, "wise_ft": 1, "transfer": 2}  # methods with a fixed number of models (besides base)


READS = {"linear": ("normalize",), "greedy_soup": ("eval_data", "eval_limit"), "slerp": ("t",), "task_arithmetic": (),
         "ties": ("density", "normalize"),
         "dare": ("density", "normalize", "seed"), "dare_ties": ("density", "normalize", "seed"), "model_stock": (),
         "lines": ("alpha", "beta"), "wise_ft": ("alpha",), "transfer": ("scale",)}  # the settings each method reads


class MergeModel(Section):
    model: str = Field(description="a model directory, run directory (its final/, adapters merged) or 'default'")
    weight: float = Field(1.0, description="weight (linear, ties, dare) or scale (task_arithmetic) of this model")


class MergeRecipe(Section):
    method: Literal["linear", "greedy_soup", "slerp", "task_arithmetic", "ties", "dare", "dare_ties", "model_stock",
                    "lines",
                    "wise_ft", "transfer"] = Field(description="the merging method")
    base: str | None = Field(None, description="the base model whose task vectors are merged (the target base for "
                             "transfer)")
    models: list[MergeModel] = Field(description="the models to merge (transfer: [source base, source fine-tune])")
    output: str = Field(description="directory of the merged model")
    t: float = Field(0.5, ge=0, le=1, description="slerp: position between the two models")
    density: float = Field(0.5, gt=0, le=1, description="ties / dare: fraction of each task vector kept")
    normalize: bool = Field(True, description="linear / ties / dare: divide by the sum of the weights")
    alpha: float | None = Field(None, description="lines: scale of the first layer (default 0); wise_ft: weight of "
                                "the tuned model (default 0.5)")
    beta: float = Field(1.0, description="lines: added scale at the last layer")
    scale: float = Field(1.0, description="transfer: scale of the carried difference")
    seed: int = Field(0, description="dare: seed of the drop masks")
    eval_data: str | None = Field(None, description="greedy_soup: SFT-format held-out data whose loss ranks the soups")
    eval_limit: int = Field(200, gt=0, description="greedy_soup: the first N records of eval_data")

    @model_validator(mode="after")
    def _shape(self) -> "MergeRecipe":
        reads = READS[self.method]
        self.unused(tuple(k for k in ("t", "density", "normalize", "alpha", "beta", "scale", "seed", "eval_data",
                                      "eval_limit") if k not in reads),
                    f"not read by method {self.method} (it reads: {', '.join(reads) or 'no setting'})")
        if self.method in NEEDS_BASE and self.base is None:
            raise ValueError(f"method {self.method} merges task vectors: set base")
        expected = PAIRS.get(self.method)
        if expected is not None and len(self.models) != expected:
            raise ValueError(f"method {self.method} takes {expected} model(s), got {len(self.models)}")
        if not self.models:
            raise ValueError("models: give at least one model")
        if self.method == "greedy_soup" and self.eval_data is None:
            raise ValueError("method greedy_soup ranks soups by held-out loss: set eval_data")
        return self


def tensor_rule(recipe: MergeRecipe, num_layers: int):
    """``rule(name, tensors)``: tensors are [base, *models] for methods with a base, else the models."""
    weights = [m.weight for m in recipe.models]
    generator = torch.Generator().manual_seed(recipe.seed)
    rules = {
        "linear": lambda _, ts: methods.linear_tensor(ts, weights, recipe.normalize),
        "slerp": lambda _, ts: methods.slerp_tensor(ts[0], ts[1], recipe.t),
        "task_arithmetic": lambda _, ts: methods.task_arithmetic_tensor(ts[0], ts[1:], weights),
        "ties": lambda _, ts: methods.ties_tensor(ts[0], ts[1:], recipe.density, weights, recipe.normalize),
        "dare": lambda _,
        ts: methods.dare_tensor(ts[0], ts[1:], recipe.density, weights, generator, False, recipe.normalize),
        "dare_ties": lambda _, ts: methods.dare_tensor(ts[0], ts[1:], recipe.density, weights, generator, True,
                                                       recipe.normalize),
        "model_stock": lambda _, ts: methods.model_stock_tensor(ts[0], ts[1:]),
        "lines": lambda key, ts: methods.lines_tensor(key, ts[0], ts[1], num_layers,
                                                      0.0 if recipe.alpha is None else recipe.alpha, recipe.beta),
        "wise_ft": lambda _, ts: methods.linear_tensor(ts, [1 - _alpha(recipe), _alpha(recipe)], normalize=False),
        "transfer": lambda _, ts: methods.transfer_tensor(ts[0], ts[1], ts[2], recipe.scale),
    }
    return rules[recipe.method]


def _alpha(recipe: MergeRecipe) -> float:
    return 0.5 if recipe.alpha is None else recipe.alpha


def materialize(spec: str, scratch: Path) -> Path:
    """A directory of full safetensors weights for ``spec``: as it is, or its adapter merged into the base."""
    path = Path(resolve_model(spec))
    if not path.is_dir():
        raise UserError(f"merge: {spec} is not a local model directory")
    if (path / "adapter_config.json").exists():
        out = scratch / f"{len(list(scratch.iterdir()))}"
        export_merged(str(path), out)
        return out
    return path


def run_merge(recipe: MergeRecipe) -> Path:
    if recipe.method == "greedy_soup":
        return run_greedy_soup(recipe)
    return merge_streamed(recipe)


def run_greedy_soup(recipe: MergeRecipe) -> Path:
    """Greedy soup over model directories: each candidate soup is merged to a scratch directory and scored by its
    held-out loss; the kept soup is written with the decisions in ``merge.json``."""
    def loss_of(model: str) -> float:
        return heldout_loss(model, recipe.eval_data, recipe.eval_limit)

    def uniform(indices: list[int], output: str) -> MergeRecipe:
        return MergeRecipe(method="linear", models=[MergeModel(model=recipe.models[i].model) for i in indices],
                           output=output)

    with tempfile.TemporaryDirectory() as scratch:
        def soup_loss(indices: list[int]) -> float:
            if len(indices) == 1:
                return loss_of(recipe.models[indices[0]].model)
            return loss_of(str(merge_streamed(uniform(indices, f"{scratch}/soup"))))

        kept, history = methods.greedy_selection(len(recipe.models), soup_loss)
    for entry in history:
        entry["ingredient"] = recipe.models[entry["ingredient"]].model
        print(f"  {'kept' if entry['kept'] else 'left out'}: {entry['ingredient']} (alone {entry['alone']:.4f}, "
              f"soup {entry['soup']:.4f})")
    output = merge_streamed(uniform(kept, recipe.output))
    (output / "merge.json").write_text(json.dumps({**recipe.model_dump(mode="json"), "soup": history}, indent=2))
    return output


def merge_streamed(recipe: MergeRecipe) -> Path:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    output = Path(recipe.output)
    specs = ([recipe.base] if recipe.method in NEEDS_BASE else []) + [m.model for m in recipe.models]
    names = (["base"] if recipe.method in NEEDS_BASE else []) + [m.model for m in recipe.models]
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        directories = [materialize(spec, Path(scratch)) for spec in specs]
        inputs = [LazyWeights(d, stack) for d in directories]
        keys = list(inputs[0].where)
        methods.check_compatible(names, [{k: w.shape(k) for k in w.where} for w in inputs])
        layers = {methods.layer_index(k) for k in keys} - {None}
        rule = tensor_rule(recipe, max(layers) + 1 if layers else 1)
        merged = {}
        for key in tqdm(keys, desc=f"merging ({recipe.method})", unit="tensor"):
            first = inputs[0][key]
            merged[key] = (rule(key, [first] + [w[key] for w in inputs[1:]]).to(first.dtype)
                           if first.is_floating_point() else first.clone())
        staging = output.with_name(output.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(merged, str(staging / "model.safetensors"), metadata={"format": "pt"})
        for file in directories[0].iterdir():  # config, generation config, tokenizer, chat template
            if file.is_file() and not file.name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt")):
                shutil.copy2(file, staging / file.name)
        (staging / "merge.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2))
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    return output
