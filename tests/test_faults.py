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
from posttrain.apps.cli import main
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
                 "dpo": None,
                 "grpo": None}[command] or (dpo_overrides(tmp_path) if command == "dpo" else rl_overrides())
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

    from posttrain.core.errors import UserError

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

    from posttrain.train.commands import COMMANDS
    from posttrain.apps.recipes import load_recipe
    from posttrain.core.config import dump_recipe

    checked = 0
    for path in sorted(Path(__file__).parents[1].glob("recipes/*.yaml")):
        command = re.search(r"posttrain (\w+)", path.read_text()).group(1)
        if command not in COMMANDS:
            continue
        recipe = load_recipe(command, str(path))
        written = tmp_path / f"{path.stem}.yaml"
        written.write_text(dump_recipe(recipe))
        again = load_recipe(command, str(written))
        assert again == recipe, path.name
        assert again.peft.changed() == recipe.peft.changed()
        COMMANDS[command].task(again, tiny_tokenizer)  # the task's own checks accept it too
        checked += 1
    assert checked >= 12


# -- safety ---------------------------------------------------------------------------------------------------------
def test_secrets_in_the_environment_never_reach_the_run_directory(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import GSM8K

    secret = "sk-planted-7f3a9c1e5b"
    for name in ("WANDB_API_KEY", "HF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(name, secret)
    evals = f"[{{task: answer_accuracy, data: {GSM8K}, limit: 2, max_new_tokens: 4}}]"
    run_sft(tiny_model_dir, tmp_path,
            **{"train.max_steps": 2, "train.save_every": 1, "train.report_to": "[tensorboard]",
                                         "data.eval": str(GSM8K), "data.eval_limit": 4, "train.eval_every": 1,
                                         "evals": evals})
    assert subprocess.run([sys.executable, "-m", "posttrain", "report", str(tmp_path)],
                          capture_output=True).returncode == 0
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "report.html" for p in files) and any("tfevents" in p.name for p in files)
    assert not [p for p in files if secret.encode() in p.read_bytes()]


def test_pickle_weights_are_refused_unless_the_recipe_allows_them(tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from posttrain.core.errors import UserError

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"holds its weights only as pickle \(pytorch_model.bin\), which can run code "
                                        r"while it loads; .* or set allow_pickle: true"):
        run_sft(pickled, tmp_path / "refused", **{"train.max_steps": 1})
    run_sft(pickled, tmp_path / "allowed", **{"train.max_steps": 1, "allow_pickle": "true"})
    assert (tmp_path / "allowed" / "final").is_dir()


def test_remote_code_in_a_model_directory_does_not_run_by_default(tiny_model_dir, tmp_path):
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    marker = tmp_path / "code-ran"
    (custom / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers.models.llama.modeling_llama import LlamaForCausalLM\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    pass\n")
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (custom / "config.json").write_text(json.dumps(config))
    run_sft(custom, tmp_path / "run", **{"train.max_steps": 1})  # transformers' own Llama class, the file not run
    assert not marker.exists()
    run_sft(custom, tmp_path / "trusted", **{"train.max_steps": 1, "trust_remote_code": "true"})
    assert marker.read_text() == "ran"  # the switch is what decides


def test_reward_functions_import_from_beside_the_recipe_never_from_data(tiny_model_dir, tmp_path):
    from test_grpo import RL

    project = tmp_path / "project"
    project.mkdir()
    (project / "my_rewards.py").write_text("def short(prompts, completions, **columns):\n"
                                           "    return [1.0 / (1 + len(c)) for c in completions]\n")
    prompts = [{"prompt": f"Count to {i}.", "reward": "os:system"} for i in range(8)]  # a data column, never imported
    (project / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    overrides = {**RL, "rewards": "[{name: my_rewards:short}]", "data.train": str(project / "prompts.jsonl"),
                 "data.limit": "null", "train.max_steps": 1, "train.batch_size": 4}
    recipe = write_recipe(project, tiny_model_dir, tmp_path / "run", overrides)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "posttrain", "grpo", str(recipe)], cwd=elsewhere,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    logged = metrics(tmp_path / "run")[0]
    assert logged["reward/my_rewards:short/failed"] == 0 and logged["reward/mean"] > 0
    moved = tmp_path / "recipe-alone.yaml"  # the same recipe away from my_rewards.py: not importable
    moved.write_text(recipe.read_text())
    refused = subprocess.run([sys.executable, "-m", "posttrain", "grpo", str(moved),
                              f"output_dir={tmp_path / 'other'}"],
                             cwd=elsewhere, capture_output=True, text=True)
    assert refused.returncode == 2 and "my_rewards:short" in refused.stderr and "cannot import" in refused.stderr


def test_a_run_killed_after_its_last_checkpoint_logs_the_final_evaluation_once(tiny_model_dir, tmp_path):
    import shutil

    from conftest import GSM8K

    settings = {"train.max_steps": 2, "train.save_every": 1, "data.eval": str(GSM8K), "data.eval_limit": 4}
    run_sft(tiny_model_dir, tmp_path, **settings)
    before = metrics(tmp_path, "eval.jsonl")
    shutil.rmtree(tmp_path / "final")  # as if killed after the final evaluation, before final/ was written
    again = run_sft(tiny_model_dir, tmp_path, **settings)
    assert again["resumed_from"] == 2
    assert [m["step"] for m in metrics(tmp_path, "eval.jsonl")] == [0, 2]
    assert_same_logs(before, metrics(tmp_path, "eval.jsonl"))
