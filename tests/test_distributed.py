"""Two processes (torchrun, gloo) with accumulation k train exactly like one process with 2k."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_weights_close, final_weights, metrics
from test_engine import write_recipe


RECIPES = Path(__file__).resolve().parents[1] / "src" / "posttrain" / "recipes"


def single_and_two_processes(command, model_dir, tmp_path, common, accum_two, port):
    """Run ``command`` in one process with accumulation 2k and under torchrun with 2 processes and k."""
    single, double = tmp_path / "single", tmp_path / "ddp"
    tests = os.path.dirname(os.path.abspath(__file__))  # reward functions defined in the tests import by name
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    one_recipe = write_recipe(tmp_path, model_dir, single, {**common, "train.grad_accum": 2 * accum_two})
    two_recipe = write_recipe(tmp_path, model_dir, double, {**common, "train.grad_accum": accum_two})
    # side by side: the runs share nothing but the model directory they read
    one = subprocess.Popen([sys.executable, "-m", "posttrain.apps.cli", command, str(one_recipe)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "posttrain.apps.cli",
                          command, str(two_recipe)], capture_output=True, text=True, env=env, timeout=300)
    _, one_err = one.communicate(timeout=300)
    assert one.returncode == 0, one_err
    assert two.returncode == 0, two.stderr[-3000:]
    return single, double


def differences(command: str, single, double, keys=("loss", "grad_norm")) -> dict:
    """The largest gaps between the two runs, printed (``pytest -s``) for the record."""
    a, b = final_weights(single), final_weights(double)
    gaps = {"command": command, "max |weight gap|": max(float((a[k] - b[k]).abs().max()) for k in a)}
    for key in keys:
        gaps[f"max |{key} gap|"] = max(abs(x[key] - y[key]) for x, y in zip(metrics(single), metrics(double)))
    print(json.dumps(gaps))
    return gaps


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_two_processes_equal_one_process_with_double_accumulation(tiny_model_dir, tmp_path, peft):
    common = {"train.max_steps": 3, "train.batch_size": 2, "peft.method": peft, "train.save_every": 3}
    single, double = single_and_two_processes("sft", tiny_model_dir, tmp_path, common, accum_two=2, port=29517)
    single_log, double_log = metrics(single), metrics(double)
    assert [m["step"] for m in double_log] == [1, 2, 3]  # rank 0 alone writes metrics
    differences(f"sft ({peft})", single, double)
    for a, b in zip(single_log, double_log):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
        assert a["tokens"] == b["tokens"]
    assert_weights_close(final_weights(single), final_weights(double), atol=1e-5)
    assert sorted(p.name for p in (double / "checkpoints" / "step-3").iterdir()) == [
        "manifest.json", "optimizer.pt", "rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors",
        "scheduler.pt", "state.json", "trainable.safetensors"]


def test_dpo_on_two_processes_equals_one_process(tiny_model_dir, tmp_path):
    from test_preference import pairs_file

    common = {"train.max_steps": 2, "train.batch_size": 2, "peft.method": "lora",
              "data.train": str(pairs_file(tmp_path))}
    single, double = single_and_two_processes("dpo", tiny_model_dir, tmp_path, common, accum_two=1, port=29518)
    differences("dpo", single, double)
    for a, b in zip(metrics(single), metrics(double)):
        for key in ("loss", "grad_norm", "rewards/margin", "rewards/accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert_weights_close(final_weights(single), final_weights(double), atol=1e-5)


def test_reward_model_on_two_processes_equals_one_process(tiny_model_dir, tmp_path):
    """Learned multi-objective weighting included: it lives inside the distributed module's forward."""
    from test_reward_model import pairs_file

    train = pairs_file(tmp_path, ratings=True)
    (tmp_path / "eval").mkdir()
    common = {"train.max_steps": 2, "train.batch_size": 2, "peft.method": "lora", "data.train": str(train),
              "data.eval": str(pairs_file(tmp_path / "eval", n=7)), "rm.objectives": "[correct, concise]",
              "rm.weighting": "learned"}
    single, double = single_and_two_processes("rm", tiny_model_dir, tmp_path, common, accum_two=1, port=29519)
    differences("rm", single, double)
    for a, b in zip(metrics(single), metrics(double)):
        for key in ("loss", "grad_norm", "accuracy", "margin", "weight/correct"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert_weights_close(final_weights(single), final_weights(double), atol=1e-5)
    evals = [metrics(run, "eval.jsonl")[-1] for run in (single, double)]
    assert evals[0]["eval/accuracy"] == evals[1]["eval/accuracy"]
    assert evals[0]["eval/reward_mean"] == pytest.approx(evals[1]["eval/reward_mean"], abs=1e-6)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"])
def test_grpo_on_two_processes_equals_one_process(tiny_model_dir, tmp_path, mode):
    """Advantages over the whole step (gathered), completions sampled by per-sample seeds, the aggregation's
    normalizer summed over processes: the process count changes nothing."""
    from test_grpo import RL

    common = {**RL, "train.batch_size": 4, "peft.method": "lora", "rl.aggregation": mode, "rl.kl_coef": 0.05}
    port = 29520 + ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"].index(mode)
    single, double = single_and_two_processes("grpo", tiny_model_dir, tmp_path, common, accum_two=1, port=port)
    differences(f"grpo ({mode})", single, double)
    for a, b in zip(metrics(single), metrics(double)):
        for key in ("loss", "grad_norm", "reward/mean", "advantage/std", "policy/kl_ref"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
    assert_weights_close(final_weights(single), final_weights(double), atol=1e-9)


@pytest.mark.parametrize("command", ["kto", "rank", "prm"])
def test_offline_families_on_two_processes_equal_one_process(tiny_model_dir, tmp_path, command):
    from test_process_reward import steps_file
    from test_ranking import ranked_file
    from test_unpaired import unpaired_file

    train = {"kto": unpaired_file, "rank": ranked_file, "prm": steps_file}[command](tmp_path)
    common = {"train.max_steps": 2, "train.batch_size": 2, "peft.method": "lora", "data.train": str(train),
              "data.limit": "null"}
    port = 29526 + ["kto", "rank", "prm"].index(command)
    single, double = single_and_two_processes(command, tiny_model_dir, tmp_path, common, accum_two=2, port=port)
    gaps = differences(command, single, double)
    assert gaps["max |loss gap|"] < 1e-5 and gaps["max |grad_norm gap|"] < 1e-5
    assert_weights_close(final_weights(single), final_weights(double), atol=1e-5)


@pytest.mark.parametrize("command", ["ppo", "rft", "online-dpo"])
def test_other_sampling_commands_on_two_processes_equal_one_process(tiny_model_dir, tmp_path, command):
    """Rollouts sharded over the processes, rewards gathered: the same run as one process."""
    from test_online_dpo import ONLINE
    from test_ppo import RL as PPO
    from test_rft import RFT

    common = {**{"ppo": PPO, "rft": RFT, "online-dpo": ONLINE}[command], "peft.method": "lora"}
    port = 29530 + ["ppo", "rft", "online-dpo"].index(command)
    single, double = single_and_two_processes(command, tiny_model_dir, tmp_path, common, accum_two=1, port=port)
    gaps = differences(command, single, double)
    assert gaps["max |loss gap|"] < 1e-9 and gaps["max |grad_norm gap|"] < 1e-9
    assert_weights_close(final_weights(single), final_weights(double), atol=1e-9)


def test_a_process_whose_groups_are_all_dropped_still_joins_the_update(tiny_model_dir, tmp_path):
    """Dynamic sampling drops process 1's only group (constant reward) while process 0 trains on its own: process 1
    runs a zero-weight backward pass so that the gradient reduction completes, and the run equals one process
    with both prompts (which drops the same group)."""
    from test_grpo import RL

    common = {**RL, "train.batch_size": 4, "peft.method": "lora", "rl.dynamic_sampling": "drop",
              "rewards": "[{name: 'test_grpo:only_prompt_zero_varies'}]"}
    single, double = single_and_two_processes("grpo", tiny_model_dir, tmp_path, common, accum_two=1, port=29525)
    for a, b in zip(metrics(single), metrics(double)):
        assert a["groups/trained"] == b["groups/trained"] == 1.0
        for key in ("loss", "grad_norm", "reward/mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
    assert_weights_close(final_weights(single), final_weights(double), atol=1e-9)


SLURM_FAKES = {
    "srun": '#!/bin/bash\nwhile [ "$1" != torchrun ]; do shift; done\nexec "$@"\n',  # one node: run the task here
    "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then echo localhost; else echo "$@" >> "$SCONTROL_LOG"; fi\n',
}


def test_the_slurm_script_checkpoints_on_sigterm_and_requeues(tiny_model_dir, tmp_path):
    """The shipped sbatch script on one node, with srun and scontrol stood in for: SIGTERM (SLURM's time-limit
    warning) reaches every training process through srun and torchrun; they checkpoint, and the job is requeued."""
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in SLURM_FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "torchrun").symlink_to(shutil.which("torchrun") or Path(sys.executable).parent / "torchrun")
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_model_dir, run, {"train.max_steps": 100000, "train.save_every": 100000})
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "2",
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    job = subprocess.Popen(["bash", str(RECIPES / "launch" / "slurm_multinode.sbatch"), "sft", str(recipe)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    checkpoints = list((run / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1, output[-3000:]
    assert "stopped by SIGTERM after step" in output and "requeueing job 4242" in output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
