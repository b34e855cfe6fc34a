"""The training engine: accumulation invariance, exact resume, checkpoints, NaN handling, run directory."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import GSM8K
from helpers import assert_weights_close, final_weights, metrics, run_sft, tiny_recipe


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_accumulation_does_not_change_loss_or_updates(tiny_model_dir, tmp_path, peft, monkeypatch):
    """8 x 1 = 2 x 4 = 1 x 8, and = 8 x 1 cut by a token budget into uneven micro-batches."""
    from posttrain.train.tasks.sft import SFTTask

    collated = []
    collate_train = SFTTask.collate_train
    monkeypatch.setattr(SFTTask, "collate_train", lambda self, examples, step: collated.append(len(examples))
                        or collate_train(self, examples, step))
    runs = {}
    for batch_size, accum, budget in [(8, 1, None), (2, 4, None), (1, 8, None), (8, 1, 600)]:
        out = tmp_path / f"{batch_size}x{accum}-{budget}"
        collated.clear()
        run_sft(tiny_model_dir, out, **{"train.batch_size": batch_size, "train.grad_accum": accum, "peft.method": peft,
                                        "train.max_tokens_per_micro_batch": budget or "null"})
        runs[(batch_size, accum, budget)] = (metrics(out), final_weights(out))
    assert len(collated) > 3 and sum(collated) == 3 * 8 and len(set(collated)) > 1  # the budget cut the batches
    reference_metrics, reference_weights = runs[(8, 1, None)]
    for key, (logged, weights) in runs.items():
        for a, b in zip(reference_metrics, logged):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), key
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5), key
        assert_weights_close(reference_weights, weights, atol=1e-5)


def test_per_microbatch_mean_would_fail_the_accumulation_test(tiny_model_dir, tmp_path, monkeypatch):
    """Guard for the test above: with the classic bug (each micro-batch averaged over its own
    target count, then the micro-batch losses averaged) the same comparison fails by far more
    than its tolerance, so the test can catch it."""
    from posttrain.objectives import sft_loss
    from posttrain.model.forward import batch_logprobs
    from posttrain.train.tasks.sft import SFTTask

    def per_microbatch_mean(self, module, batch, normalizer):
        accum = self.recipe.train.grad_accum
        return sft_loss(batch_logprobs(module, batch), batch.target_weights, batch.num_targets * accum), {}

    monkeypatch.setattr(SFTTask, "loss", per_microbatch_mean)
    for batch_size, accum in [(8, 1), (1, 8)]:
        run_sft(tiny_model_dir, tmp_path / f"{batch_size}x{accum}",
                **{"train.batch_size": batch_size, "train.grad_accum": accum})
    first = [m["loss"] for m in metrics(tmp_path / "8x1")]
    buggy = [m["loss"] for m in metrics(tmp_path / "1x8")]
    assert max(abs(a - b) for a, b in zip(first, buggy)) > 100 * 1e-5


def test_run_directory_contract(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_sft(tiny_model_dir, out, **{"train.max_steps": 4, "train.save_every": 2, "train.eval_every": 2,
                                    "data.eval": str(GSM8K), "data.eval_limit": 8,
                                    "train.report_to": "[tensorboard]", "peft.method": "lora"})
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["max_steps"] == 4
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "tokens_per_s", "elapsed_s", "grad_norm"} <= logged[0].keys()
    assert [e["step"] for e in metrics(out, "eval.jsonl")] == [0, 2, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (out / "final" / "adapter_config.json").exists()
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))
    from posttrain.model.load import load_model

    load_model(str(out / "final"))  # loadable by transformers + peft


def test_lr_schedule_has_warmup_then_decay(tiny_model_dir, tmp_path):
    run_sft(tiny_model_dir, tmp_path, **{"train.max_steps": 6, "train.warmup_steps": 2, "train.scheduler": "linear"})
    lrs = [m["lr"] for m in metrics(tmp_path)]
    # HF convention: warmup rises linearly from 0 over 2 steps, then decays linearly to 0 at step 6
    assert lrs == pytest.approx([0.0, 0.5e-2, 1e-2, 0.75e-2, 0.5e-2, 0.25e-2])


def test_checkpoints_keep_only_the_newest(tiny_model_dir, tmp_path):
    run_sft(tiny_model_dir, tmp_path, **{"train.max_steps": 6, "train.save_every": 1, "train.save_total_limit": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-5", "step-6"]


def test_non_finite_loss_is_skipped_then_stops(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.train.engine import TrainingError
    from posttrain.train.tasks.sft import SFTTask

    original = SFTTask.loss

    def poisoned(self, module, batch, normalizer):
        loss, metrics = original(self, module, batch, normalizer)
        return loss * float("nan"), metrics

    monkeypatch.setattr(SFTTask, "loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite"):
        run_sft(tiny_model_dir, tmp_path, **{"train.max_steps": 10, "train.max_bad_steps": 2})


def test_changed_recipe_refuses_to_resume(tiny_model_dir, tmp_path):
    from posttrain.core.errors import UserError

    run_sft(tiny_model_dir, tmp_path, **{"train.save_every": 1})
    with pytest.raises(UserError, match="train.lr"):
        run_sft(tiny_model_dir, tmp_path, **{"train.save_every": 1, "train.lr": 0.5})


KILL_DRIVER = """
import os, signal, sys
from posttrain.train import checkpoint
from posttrain.apps.cli import main
kill_at = int(os.environ["KILL_AT_STEP"])
publish = checkpoint.publish

def publish_then_die(staging, root, step, keep):
    if step == kill_at:  # die while writing: the staging directory is complete but not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    return publish(staging, root, step, keep)

checkpoint.publish = publish_then_die
sys.exit(main(sys.argv[1:]))
"""


def run_cli(args, kill_at_step=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "KILL_AT_STEP": str(kill_at_step or -1)}
    return subprocess.run([sys.executable, "-c", KILL_DRIVER, *args], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_sigkill_then_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path, peft):
    common = {"train.max_steps": 8, "train.save_every": 2, "train.batch_size": 4, "peft.method": peft,
              "peft.dropout": 0.1 if peft == "lora" else 0.0}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_cli(["sft", str(write_recipe(tmp_path, tiny_model_dir, straight, common))])
    assert done.returncode == 0, done.stderr

    recipe = write_recipe(tmp_path, tiny_model_dir, killed, common)
    crashed = run_cli(["sft", str(recipe)], kill_at_step=6)
    assert crashed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [".step-6.tmp", "step-2", "step-4"]
    assert len(metrics(killed)) == 6  # steps 5 and 6 were logged before the crash

    resumed = run_cli(["sft", str(recipe)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_weights_close(final_weights(straight), final_weights(killed), atol=1e-6)
    assert [m["step"] for m in metrics(killed)] == list(range(1, 9))
    assert [m["loss"] for m in metrics(killed)] == pytest.approx([m["loss"] for m in metrics(straight)], abs=1e-6)
    assert not any(p.name.startswith(".") for p in (killed / "checkpoints").iterdir())  # stale staging cleaned


def straight_and_killed(command: str, tmp_path: Path, model_dir: Path, overrides: dict,
                        kill_at_step: int) -> tuple[Path, Path]:
    """One recipe run straight through, and run again but SIGKILLed at ``kill_at_step`` and resumed: both run dirs."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli([command, str(write_recipe(tmp_path, model_dir, straight, overrides))]).returncode == 0
    recipe = write_recipe(tmp_path, model_dir, killed, overrides)
    assert run_cli([command, str(recipe)], kill_at_step=kill_at_step).returncode == -signal.SIGKILL
    resumed = run_cli([command, str(recipe)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return straight, killed


def write_recipe(tmp_path: Path, model_dir: Path, out: Path, overrides: dict) -> Path:
    from posttrain.core.config import apply_override, parse_override

    tree: dict = {}
    for item in tiny_recipe(model_dir, out, **overrides):
        apply_override(tree, *parse_override(item))
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_gradient_checkpointing_gives_the_same_run(tiny_model_dir, tmp_path):
    run_sft(tiny_model_dir, tmp_path / "plain", **{"peft.method": "lora"})
    run_sft(tiny_model_dir, tmp_path / "ckpt", **{"peft.method": "lora", "train.gradient_checkpointing": True})
    assert [m["loss"] for m in metrics(tmp_path / "ckpt")] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "plain")], abs=1e-6
    )
    assert_weights_close(final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt"), atol=1e-6)


def test_bf16_autocast_trains_close_to_fp32(tiny_model_dir, tmp_path):
    run_sft(tiny_model_dir, tmp_path / "fp32", **{"train.precision": "fp32"})
    run_sft(tiny_model_dir, tmp_path / "bf16", **{"train.precision": "bf16"})
    fp32, bf16 = metrics(tmp_path / "fp32"), metrics(tmp_path / "bf16")
    assert [m["loss"] for m in bf16] == pytest.approx([m["loss"] for m in fp32], abs=5e-2)
