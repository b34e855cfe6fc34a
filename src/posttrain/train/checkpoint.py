"""Checkpoints for exact resume, written atomically.

A checkpoint is a directory ``checkpoints/step-N/`` holding the trainable parameters (safetensors) and the optimizer
state (under FSDP2 both in ``sharded/``, each process's part), the scheduler state, every process's RNG states,
``state.json`` and, written last, ``manifest.json``: each file's size and sha256, hashed after the files were synced
to disk. It is assembled under a temporary name and renamed into place only when complete, so a kill at any moment
leaves the previous checkpoint intact; a checkpoint damaged later (a truncated file, a lost optimizer state, an
edited JSON) fails its manifest on resume and is moved aside. Frozen weights are not saved: they are reloaded from
the model the recipe names.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from posttrain.core.errors import UserError
from posttrain.train import sharding

_STEP = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
    }
    return state


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return tensors


def restore_rng(directory: Path, rank: int) -> None:
    state = json.loads((directory / f"rng-{rank}.json").read_text())
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    tensors = load_file(directory / f"rng-{rank}.safetensors")
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def staging_dir(root: Path, step: int) -> Path:
    return root / f".step-{step}.tmp"


def write_rank_state(staging: Path, rank: int) -> None:
    """Each process saves its own RNG states (they differ per rank)."""
    staging.mkdir(parents=True, exist_ok=True)
    (staging / f"rng-{rank}.json").write_text(json.dumps(rng_state()))
    save_file(rng_tensors(), staging / f"rng-{rank}.safetensors")


def write_main_state(staging: Path, weights: tuple | None, scheduler, state: dict, task_state: dict) -> None:
    """``weights``: (model, optimizer) whose trainable parameters and optimizer state the main process writes, or
    None where every process wrote its shard of them (``sharding.save_sharded``). The task's state goes to
    ``task.safetensors`` (its tensors) and ``state.json`` (everything else)."""
    if weights is not None:
        model, optimizer = weights
        save_file(trainable_state(model), staging / "trainable.safetensors")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    tensors = {k: v.detach().cpu().contiguous() for k, v in task_state.items() if isinstance(v, torch.Tensor)}
    if tensors:
        save_file(tensors, staging / "task.safetensors")
    state = {**state, "task": {k: v for k, v in task_state.items() if k not in tensors}}
    (staging / "state.json").write_text(json.dumps(state, indent=1))


def needed_bytes(model, optimizer) -> int:
    """What a checkpoint will take on disk: the trainable tensors plus the optimizer's (Adam: two per parameter)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor))
    return params + max(moments, 2 * params) + 2**20


def check_free_space(root: Path, needed: int) -> str | None:
    """Why a checkpoint of ``needed`` bytes should not be written under ``root`` (None: it fits, with 10% spare)."""
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free >= needed * 1.1:
        return None
    return (f"not enough free disk for a checkpoint under {root}: it needs about {needed / 2**30:.2f} GiB and "
            f"{free / 2**30:.2f} GiB are free; free some space (older checkpoints are pruned only after a new one is "
            "written) and run the same "
            "command again to resume from the last checkpoint")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(staging: Path) -> None:
    """Sync every file, then record its size and sha256; the manifest is written last and marks completeness."""
    files = {}
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):  # sharded/ holds each process's part
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
        files[file.relative_to(staging).as_posix()] = {"size": file.stat().st_size, "sha256": file_sha256(file)}
    with open(staging / MANIFEST, "w") as handle:
        handle.write(json.dumps({"files": files}, indent=1))
        handle.flush()
        os.fsync(handle.fileno())


def problem(directory: Path) -> str | None:
    """What is wrong with a checkpoint, checked against its manifest (None: every file is as written)."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{MANIFEST} is not a valid manifest"
    for name, expected in files.items():
        file = directory / name
        if not file.exists():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['size']}"
        if file_sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def set_aside(directory: Path) -> Path:
    """Move a damaged checkpoint out of the way (kept for inspection, never resumed from)."""
    target = directory.with_name(f"corrupt-{directory.name}")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"corrupt-{directory.name}-{n}")
    os.replace(directory, target)
    return target


def load_task_state(directory: Path, saved: dict) -> dict:
    """The task state a checkpoint holds: the JSON part from state.json plus task.safetensors, if any."""
    tensors = load_file(directory / "task.safetensors") if (directory / "task.safetensors").exists() else {}
    return {**saved, **tensors}


def publish(staging: Path, root: Path, step: int, keep: int | None) -> Path:
    """Rename the finished (manifested) checkpoint into place, then prune old ones: the newest verified
    checkpoint is the one just published, so pruning never removes the last good one."""
    write_manifest(staging)
    final = root / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale(root: Path) -> None:
    """Staging directories left by a crash mid-write are incomplete by construction."""
    if root.is_dir():
        for stale in root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints, oldest first (``problem`` says whether one is still as written)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(directory: Path, model, optimizer, scheduler, rank: int, sharded: bool = False) -> dict:
    """Restore a checkpoint into this run (``sharded``: its parameters are split over the processes). A sharded
    checkpoint loads into any number of processes; an unsharded one only into an unsharded launch."""
    if (directory / sharding.SHARDED).is_dir():
        sharding.load_sharded(directory, model, optimizer)
    elif sharded:
        raise UserError(f"{directory} was written by an unsharded run; resume it without FSDP (the same launch as "
                        "before), or start a new output_dir")
    else:
        _load_whole(directory, model, optimizer)
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    restore_rng(directory, rank)
    return json.loads((directory / "state.json").read_text())


def _load_whole(directory: Path, model, optimizer) -> None:
    weights = load_file(directory / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise RuntimeError(f"checkpoint {directory} has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
