"""Faults long runs meet: pre-emption signals, damaged checkpoints, a full disk."""

import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import assert_weights_close, final_weights, metrics, run_sft
from test_engine import write_recipe

SIGNAL_DRIVER = """
import os, signal, sys
from posttrain.cli import main
from posttrain.train.engine import Engine
at, times = int(os.environ["SIGNAL_AT_STEP"]), int(os.environ["SIGNAL_TIMES"])
train_step = Engine.train_step

def signalled_step(self, step, *args):
    if step == at:  # the signal lands while this step's work is still ahead
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGTERM)
    return train_step(self, step, *args)

Engine.train_step = signalled_step
sys.exit(main(sys.argv[1:]))
"""


def run_signalled(args, at_step=-1, times=1):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "SIGNAL_AT_STEP": str(at_step), "SIGNAL_TIMES": str(times)}
    return subprocess.run([sys.executable, "-c", SIGNAL_DRIVER, *args], env=env, capture_output=True, text=True)


def rl_overrides():
    from test_grpo import RL

    return {**RL, "train.max_steps": 5, "train.save_every": 100, "train.batch_size": 4, "peft.method": "lora",
            "rl.num_iterations": 2}


def dpo_overrides(tmp_path):
    from test_preference import pairs_file

    return {"train.max_steps": 5, "train.save_every": 100, "train.batch_size": 4, "peft.method": "lora",
            "data.train": str(pairs_file(tmp_path)), "data.limit": "null"}


@pytest.mark.parametrize("command", ["sft", "dpo", "grpo"])
def test_sigterm_checkpoints_after_the_step_and_the_resumed_run_equals_the_uninterrupted_one(
        command, tiny_model_dir, tmp_path):
    overrides = {"sft": {"train.max_steps": 5, "train.save_every": 100, "train.batch_size": 4},
                 "dpo": None, "grpo": None}[command] or (dpo_overrides(tmp_path) if command == "dpo" else rl_overrides())
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_signalled([command, str(write_recipe(tmp_path, tiny_model_dir, straight, overrides))]).returncode == 0
    recipe = write_recipe(tmp_path, tiny_model_dir, stopped, overrides)
    first = run_signalled([command, str(recipe)], at_step=2)  # save_every 100: the signal alone makes a checkpoint
    assert first.returncode == 75, first.stderr[-2000:]
    assert "SIGTERM received: stopping after this optimizer step" in first.stdout
    assert f"stopped by SIGTERM after step 3 of 5; checkpoint {stopped / 'checkpoints' / 'step-3'}" in first.stderr
    assert f"posttrain {command} {stopped / 'recipe.yaml'}" in first.stderr
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-3"] and not (stopped / "final").exists()
    resumed = subprocess.run([sys.executable, "-m", "posttrain", command, str(stopped / "recipe.yaml")],
                             capture_output=True, text=True)  # the printed resume command works as printed
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_weights_close(final_weights(straight), final_weights(stopped), atol=1e-6)
    assert_same_logs(metrics(straight), metrics(stopped))


def assert_same_logs(a: list[dict], b: list[dict]) -> None:
    """The same steps with the same values, apart from timings and memory."""
    def timing(key: str) -> bool:
        return key.startswith("time/") or key.endswith(("_s", "memory_gb"))

    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        kept = sorted(k for k in x if not timing(k))
        assert kept == sorted(k for k in y if not timing(k))
        assert [x[k] for k in kept] == pytest.approx([y[k] for k in kept], abs=1e-6), x["step"]


def test_a_second_signal_stops_at_once_without_a_checkpoint(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir, tmp_path / "run", {"train.max_steps": 5, "train.save_every": 100})
    done = run_signalled(["sft", str(recipe)], at_step=2, times=2)
    assert done.returncode == -signal.SIGTERM
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def damage(checkpoint, how):
    if how == "truncated tensors":
        file = checkpoint / "trainable.safetensors"
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        return "trainable.safetensors has"
    if how == "missing optimizer":
        (checkpoint / "optimizer.pt").unlink()
        return "optimizer.pt is missing"
    if how == "bad json":
        (checkpoint / "state.json").write_text('{"step": 4,')
        return "state.json has"
    if how == "edited json":  # same size, different content
        text = (checkpoint / "state.json").read_text()
        (checkpoint / "state.json").write_text(text.replace('"step": 4', '"step": 9'))
        return "state.json does not match its sha256"
    (checkpoint / "manifest.json").unlink()
    return "manifest.json is missing"


@pytest.mark.parametrize("how", ["truncated tensors", "missing optimizer", "bad json", "edited json", "no manifest"])
def test_a_damaged_newest_checkpoint_is_named_set_aside_and_the_previous_one_resumes(how, tiny_model_dir, tmp_path,
                                                                                     capsys):
    common = {"train.max_steps": 4, "train.batch_size": 4, "train.save_every": 1, "train.save_total_limit": 2}
    straight = run_sft(tiny_model_dir, tmp_path / "straight", **common)
    run_sft(tiny_model_dir, tmp_path / "run", **common)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-4"]
    said = damage(root / "step-4", how)
    capsys.readouterr()
    again = run_sft(tiny_model_dir, tmp_path / "run", **common)  # the last step is trained again
    printed = capsys.readouterr()
    assert f"checkpoint {root / 'step-4'} is damaged ({said}" in printed.err + printed.out
    assert "moved to corrupt-step-4" in printed.err + printed.out
    assert "step-3 (step 3 of 4)" in printed.err + printed.out and again["resumed_from"] == 3
    assert sorted(p.name for p in root.iterdir()) == ["corrupt-step-4", "step-3", "step-4"]
    assert again["last_loss"] == pytest.approx(straight["last_loss"], abs=1e-9)
    assert_weights_close(final_weights(tmp_path / "straight"), final_weights(tmp_path / "run"), atol=1e-6)


def test_the_manifest_holds_every_file_with_its_size_and_hash(tiny_model_dir, tmp_path):
    import hashlib

    run_sft(tiny_model_dir, tmp_path, **{"train.max_steps": 1, "train.save_every": 1})
    checkpoint = tmp_path / "checkpoints" / "step-1"
    files = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in checkpoint.iterdir() if p.name != "manifest.json")
    for name, entry in files.items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_full_disk_stops_before_writing_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from posttrain.errors import UserError

    run_sft(tiny_model_dir, tmp_path, **{"train.max_steps": 2, "train.save_every": 1})
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"not enough free disk for a checkpoint under .*: it needs about 0\.\d+ GiB "
                                        r"and 0\.00 GiB are free"):
        run_sft(tiny_model_dir, tmp_path, **{"train.max_steps": 4, "train.save_every": 1})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]  # nothing half-written, nothing pruned


def test_a_runs_recipe_yaml_loads_back_as_the_same_recipe_for_every_shipped_recipe(tiny_tokenizer, tmp_path):
    """The printed resume command feeds recipe.yaml (every field written out) back in: defaults written out must
    not read as settings a user chose."""
    import re
    from pathlib import Path

    from posttrain.commands import COMMANDS
    from posttrain.config import dump_recipe, load_recipe

    checked = 0
    for path in sorted(Path(__file__).parents[1].glob("recipes/*.yaml")):
        command = re.search(r"posttrain (\w+)", path.read_text()).group(1)
        if command not in COMMANDS or not COMMANDS[command].task_class:
            continue
        recipe = load_recipe(command, str(path))
        written = tmp_path / f"{path.stem}.yaml"
        written.write_text(dump_recipe(recipe))
        again = load_recipe(command, str(written))
        assert again == recipe, path.name
        assert again.peft.changed() == recipe.peft.changed()
        COMMANDS[command].task_class()(again, tiny_tokenizer)  # the task's own checks accept it too
        checked += 1
    assert checked >= 12
