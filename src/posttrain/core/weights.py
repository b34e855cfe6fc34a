"""Model weights read one tensor at a time from safetensors files (sharded or not), never from pickle."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from posttrain.core.errors import UserError


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory} has no safetensors weights (pickle checkpoints are not read)")
    return files


class LazyWeights:
    """Tensors of a model directory by name, read one at a time."""

    def __init__(self, directory: Path, stack: ExitStack):
        from safetensors import safe_open

        self.where: dict[str, Any] = {}
        for file in weight_files(directory):
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            self.where.update({key: handle for key in handle.keys()})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[key].get_slice(key).get_shape())
