"""Run training in-process on the tiny model and read back what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import GSM8K


def tiny_recipe(model_dir: Path, out: Path, **overrides) -> list[str]:
    base = {
        "model": str(model_dir), "output_dir": str(out),
        "data.train": str(GSM8K), "data.limit": 64, "data.max_length": 384,
        "train.max_steps": 3, "train.batch_size": 8, "train.grad_accum": 1, "train.lr": 1e-2,
        "train.report_to": "[]", "train.seed": 0,
        # float64 everywhere: equivalence checks (accumulation, packing, processes, resume, reference modes)
        # then agree far below their tolerances on any CPU, whatever its summation order
        "train.precision": "fp64",
    }
    base.update(overrides)
    return [f"{k}={v}" for k, v in base.items()]


def run_sft(model_dir: Path, out: Path, **overrides) -> dict:
    return run_command("sft", model_dir, out, **overrides)


def reset_accelerate() -> None:
    """Each in-process run starts from a fresh accelerate state (its precision may differ from the last)."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def run_command(command: str, model_dir: Path, out: Path, **overrides) -> dict:
    from posttrain.apps.recipes import load_recipe
    from posttrain.train.run import run

    reset_accelerate()
    recipe = load_recipe(command, None, tiny_recipe(model_dir, out, **overrides))
    return run(command, recipe)


def metrics(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (Path(out) / name).read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    final = Path(out) / "final"
    file = final / (
        "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    )
    return load_file(file)


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)
