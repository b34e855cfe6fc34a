"""SIGKILL at random moments (mid-step, mid-checkpoint, mid-evaluation), resumed each time: the run must end as
the uninterrupted one did. CI kills each command family twice; ``pytest -m killloop`` runs the long version
(10 kills per family, all six families), meant for a nightly schedule."""

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from helpers import assert_weights_close, final_weights, metrics
from test_engine import write_recipe
from test_faults import assert_same_logs

FAMILIES = ("sft", "dpo", "kto", "rank", "rm", "grpo")


def family_overrides(command: str, tmp_path) -> dict:
    from test_grpo import RL
    from test_preference import pairs_file
    from test_ranking import ranked_file
    from test_unpaired import unpaired_file

    common = {"train.max_steps": 8, "train.save_every": 1, "train.save_total_limit": 2, "train.batch_size": 4,
              "peft.method": "lora", "peft.dropout": 0.1, "train.eval_every": 3}
    data = {"sft": {},
            "dpo": {"data.train": str(pairs_file(tmp_path)), "data.eval": str(pairs_file(tmp_path)),
                    "data.limit": "null"},
            "kto": {"data.train": str(unpaired_file(tmp_path)), "data.limit": "null"},
            "rank": {"data.train": str(ranked_file(tmp_path)), "data.limit": "null"},
            "rm": {"data.train": str(pairs_file(tmp_path)), "data.limit": "null"},
            "grpo": {**RL, "train.max_steps": 8, "rl.num_iterations": 2}}[command]
    evaluation = {"sft": {"data.eval": str(__import__("conftest").GSM8K), "data.eval_limit": 8}}.get(command, {})
    return {**common, **data, **evaluation}


def posttrain(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "posttrain", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def logged_steps(out) -> int:
    log = out / "metrics.jsonl"
    return log.read_text().count("\n") if log.exists() else 0


def timeline(run: subprocess.Popen, out) -> list[float]:
    """When each step's metrics line appeared, then when the run ended (seconds from now)."""
    started, seen = time.perf_counter(), []
    while run.poll() is None:
        seen += [time.perf_counter() - started] * (logged_steps(out) - len(seen))
        time.sleep(0.002)
    return seen + [time.perf_counter() - started]


def kill_loop(command: str, tmp_path, model_dir, kills: int, seed: int) -> list[str]:
    """Run straight through (timing its start-up, steps and finish), then run again killed ``kills`` times and
    resumed until done; returns what each kill interrupted. One kill in eight lands in start-up; the others wait for
    one or two steps more than the last run logged, then a random part of a step's time (of the finish, after the
    last step), so kills land mid-step, mid-checkpoint (every step saves), mid-evaluation and while ``final/`` is
    written, spread over a run of ``2 x kills + 4`` steps."""
    overrides = {**family_overrides(command, tmp_path), "train.max_steps": max(8, 2 * kills + 4)}
    straight = posttrain([command, str(write_recipe(tmp_path, model_dir, tmp_path / "straight", overrides))])
    times = timeline(straight, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr.read()[-2000:]
    steps = len(times) - 1
    startup, step_time, finish = times[0], (times[-2] - times[0]) / max(steps - 1, 1), times[-1] - times[-2]
    out = tmp_path / "killed"
    recipe = write_recipe(tmp_path, model_dir, out, overrides)
    root = out / "checkpoints"
    rng, hits, finished = random.Random(seed), [], 0
    while len(hits) < kills:
        run = posttrain([command, str(recipe)])
        if rng.random() < 1 / 8:
            target, delay = 0, rng.uniform(0.0, startup)
        else:
            target = min(logged_steps(out) + rng.randint(1, 2), steps)
            delay = rng.uniform(0.0, finish if target == steps else step_time)
        while target and logged_steps(out) < target and run.poll() is None:
            time.sleep(0.002)
        time.sleep(delay)
        if run.poll() is not None:  # it finished first: start over from scratch, to have something to kill
            assert run.returncode == 0, run.stderr.read()[-2000:]
            finished += 1
            assert finished <= 3 * kills
            shutil.rmtree(out)
            continue
        run.kill()
        run.wait()
        saved = sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.exists() else []
        staging = bool(list(root.glob(".step-*.tmp"))) if root.exists() else False
        moment = "in start-up" if target == 0 else f"after step {logged_steps(out)}"
        hits.append(f"{moment}, checkpoint {saved[-1] if saved else 0}" + (" while writing one" if staging else ""))
    final = posttrain([command, str(recipe)])
    assert final.wait() == 0, final.stderr.read()[-2000:]
    print(json.dumps({"command": command, "kills": hits, "runs that finished first (restarted)": finished}))
    assert_weights_close(final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed"), atol=1e-6)
    assert_same_logs(metrics(tmp_path / "straight"), metrics(tmp_path / "killed"))
    if (tmp_path / "straight" / "eval.jsonl").exists():
        assert_same_logs(metrics(tmp_path / "straight", "eval.jsonl"), metrics(tmp_path / "killed", "eval.jsonl"))
    return hits


@pytest.mark.parametrize("command", ["sft", "dpo", "kto", "rank"])
def test_two_random_kills_then_resume_equal_the_uninterrupted_run(command, tiny_model_dir, tmp_path):
    kill_loop(command, tmp_path, tiny_model_dir, kills=2, seed=FAMILIES.index(command))


@pytest.mark.killloop
@pytest.mark.parametrize("command", FAMILIES)
def test_ten_random_kills_then_resume_equal_the_uninterrupted_run(command, tiny_model_dir, tmp_path):
    kill_loop(command, tmp_path, tiny_model_dir, kills=10, seed=100 + FAMILIES.index(command))
