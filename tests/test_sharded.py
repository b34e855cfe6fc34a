"""FSDP2 (parameters, gradients and optimizer states sharded over 2 CPU processes) trains exactly like one process:
same losses, gradient norms and final weights; sharded checkpoints resume the same run; final/ is one ordinary
model. The launch uses the shipped recipes/accelerate/fsdp2.yaml (see tests/fsdp_on_cpu.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import assert_weights_close, final_weights, metrics
from test_distributed import differences
from test_engine import write_recipe

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS.parent / "src" / "posttrain" / "recipes" / "accelerate"
FSDP2 = CONFIGS / "fsdp2.yaml"


def environment() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


def run_one(command: str, recipe: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "posttrain.apps.cli", command, str(recipe)], capture_output=True,
                          text=True, env=environment(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_sharded(command: str, recipe: Path, port: int, config: Path = FSDP2) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(TESTS / "fsdp_on_cpu.py"),
                           str(config), command, str(recipe)], capture_output=True, text=True, env=environment(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_and_sharded(command, model_dir, tmp_path, common, accum_two, port, config=FSDP2):
    """The same run in one process and sharded over two, side by side (they share only the model they read)."""
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    one_recipe = write_recipe(tmp_path, model_dir, single, {**common, "train.grad_accum": 2 * accum_two})
    one = subprocess.Popen([sys.executable, "-m", "posttrain.apps.cli", command, str(one_recipe)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    run_sharded(command, write_recipe(tmp_path, model_dir, sharded, {**common, "train.grad_accum": accum_two}), port,
                config)
    _, one_err = one.communicate(timeout=300)
    assert one.returncode == 0, one_err[-3000:]
    return single, sharded


def assert_same_run(command, single, sharded, keys=("loss", "grad_norm")):
    differences(f"{command} (fsdp2)", single, sharded, keys)
    for a, b in zip(metrics(single), metrics(sharded), strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
        assert a["tokens"] == b["tokens"]
    assert_weights_close(final_weights(single), final_weights(sharded), atol=1e-9)


@pytest.mark.parametrize(("peft", "config"), [("none", "fsdp2"), ("lora", "fsdp2"), ("none", "fsdp2_zero2")])
def test_fsdp2_trains_like_one_process_and_saves_an_ordinary_final(tiny_model_dir, tmp_path, peft, config):
    common = {"train.max_steps": 3, "train.batch_size": 2, "peft.method": peft, "train.save_every": 2,
              "train.max_grad_norm": 1.0}
    if peft == "lora":  # a token budget splits micro-batches: 3 on one process, 4 on the other (checked)
        common.update({"train.batch_size": 4, "train.max_tokens_per_micro_batch": 600})
    port = 29540 + [("none", "fsdp2"), ("lora", "fsdp2"), ("none", "fsdp2_zero2")].index((peft, config))
    single, sharded = one_and_sharded("sft", tiny_model_dir, tmp_path, common, accum_two=1 if peft == "lora" else 2,
                                      port=port,
                                      config=CONFIGS / f"{config}.yaml")
    assert_same_run("sft", single, sharded)
    parts = sorted(p.name for p in (sharded / "checkpoints" / "step-2" / "sharded").iterdir())
    assert parts == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own part
    assert sorted(os.listdir(sharded / "final")) == sorted(os.listdir(single / "final"))


def test_a_sharded_checkpoint_resumes_the_same_run_is_verified_part_by_part_and_exports(tiny_model_dir, tmp_path):
    """Stopped after step 2 of 3, the newest checkpoint's part from process 1 damaged: the run resumes under FSDP2
    from step 1 and ends as the uninterrupted run; one process reads a sharded checkpoint for export. (A constant
    learning rate: a longer max_steps would otherwise stretch the schedule.)"""
    from posttrain.apps.cli import main

    from helpers import reset_accelerate

    common = {"train.batch_size": 2, "train.grad_accum": 2, "peft.method": "lora", "train.save_every": 1,
              "train.scheduler": "constant", "train.warmup_steps": 0}
    whole = tmp_path / "whole"
    run_one("sft",
            write_recipe(tmp_path, tiny_model_dir, whole, {**common, "train.grad_accum": 4, "train.max_steps": 3}))
    first = tmp_path / "first"
    run_sharded("sft", write_recipe(tmp_path, tiny_model_dir, first, {**common, "train.max_steps": 2}), port=29565)

    part = first / "checkpoints" / "step-2" / "sharded" / "__1_0.distcp"
    part.write_bytes(part.read_bytes()[:-7])
    resumed = run_sharded("sft", write_recipe(tmp_path, tiny_model_dir, first, {**common, "train.max_steps": 3}), 29566)
    assert (
        "checkpoint" in resumed.stdout + resumed.stderr
        and "sharded/__1_0.distcp has" in resumed.stdout + resumed.stderr
    )
    assert "resuming from" in resumed.stdout + resumed.stderr and "step-1" in resumed.stdout + resumed.stderr
    assert (first / "checkpoints" / "corrupt-step-2").is_dir()
    assert_same_run("sft", whole, first)

    for run in (first, whole):  # the sharded checkpoint and the unsharded one, merged into full weights
        reset_accelerate()
        assert main(["export", str(run), "--checkpoint", "step-3", "--out", str(tmp_path / f"{run.name}-step-3")]) == 0
    assert_weights_close(*(load_file(tmp_path / f"{run}-step-3" / "model.safetensors") for run in ("first", "whole")),
                         atol=1e-9)


@pytest.mark.parametrize("command", ["dpo", "kto", "rank", "rm", "prm"])
def test_fsdp2_trains_the_offline_families_like_one_process(tiny_model_dir, tmp_path, command):
    """Held-out evaluation included (split unevenly: 3 batches of 2 over 2 processes)."""
    from test_preference import pairs_file
    from test_process_reward import steps_file
    from test_ranking import ranked_file
    from test_reward_model import pairs_file as rated_pairs
    from test_unpaired import unpaired_file

    files = {"dpo": pairs_file, "kto": unpaired_file, "rank": ranked_file, "rm": rated_pairs, "prm": steps_file}
    (tmp_path / "eval").mkdir()
    common = {"train.max_steps": 2, "train.batch_size": 2, "peft.method": "lora", "data.limit": "null",
              "train.save_every": 2,
              "data.train": str(files[command](tmp_path)), "data.eval": str(files[command](tmp_path / "eval", n=5))}
    if command == "rm":
        common.update({"data.train": str(rated_pairs(tmp_path, ratings=True)), "rm.objectives": "[correct, concise]",
                       "rm.weighting": "learned", "data.eval": str(rated_pairs(tmp_path / "eval", n=5))})
    port = 29560 + list(files).index(command)
    single, sharded = one_and_sharded(command, tiny_model_dir, tmp_path, common, accum_two=1, port=port)
    assert_same_run(command, single, sharded)
    assert (sharded / "checkpoints" / "step-2" / "sharded").is_dir()
    evals = [metrics(run, "eval.jsonl")[-1] for run in (single, sharded)]
    assert evals[0].keys() == evals[1].keys()
    for key in evals[0]:
        assert evals[0][key] == pytest.approx(evals[1][key], abs=1e-9), key


@pytest.mark.parametrize("command", ["grpo", "ppo", "rft", "online-dpo", "grpo-full"])
def test_fsdp2_runs_the_sampling_commands_like_one_process(tiny_model_dir, tmp_path, command):
    """Each process samples its prompts on gathered parameters (a different number of decoding passes per process),
    then trains sharded; held-out greedy evaluation too. grpo-full: all weights trained, gradient checkpointing,
    and a separate (unsharded) reference model for the KL term."""
    from test_grpo import RL
    from test_online_dpo import ONLINE
    from test_ppo import RL as PPO
    from test_rft import RFT

    from helpers import GSM8K

    grpo = {**RL, "rl.kl_coef": 0.05}
    common = {**{"grpo": grpo, "ppo": PPO, "rft": RFT, "online-dpo": ONLINE, "grpo-full": grpo}[command],
              "peft.method": "lora", "train.save_every": 2}
    if command == "grpo":
        common.update({"train.batch_size": 4, "data.eval": str(GSM8K), "data.eval_limit": 3, "train.eval_every": 1})
    if command == "grpo-full":
        common.update({"peft.method": "none", "train.gradient_checkpointing": True, "train.lr": 1e-3})
    port = 29550 + ["grpo", "ppo", "rft", "online-dpo", "grpo-full"].index(command)
    command = command.removesuffix("-full")
    single, sharded = one_and_sharded(command, tiny_model_dir, tmp_path, common, accum_two=1, port=port)
    assert_same_run(command, single, sharded)
    if "data.eval" in common:
        evals = [metrics(run, "eval.jsonl") for run in (single, sharded)]
        assert [e["eval/reward"] for e in evals[0]] == pytest.approx([e["eval/reward"] for e in evals[1]], abs=1e-9)


def test_recipe_evals_generate_on_gathered_parameters_under_fsdp2(tiny_model_dir, tmp_path):
    from test_eval import GSM8K_TEST

    evals = (f"[{{task: perplexity, data: {GSM8K_TEST}, limit: 3, max_length: 384}}, "
             f"{{task: answer_accuracy, data: {GSM8K_TEST}, limit: 3, max_new_tokens: 6}}]")
    common = {"evals": evals, "train.eval_every": 1, "train.max_steps": 2, "train.batch_size": 2, "peft.method": "lora"}
    single, sharded = one_and_sharded("sft", tiny_model_dir, tmp_path, common, accum_two=1, port=29555)
    assert_same_run("sft", single, sharded)
    a, b = metrics(single, "eval.jsonl"), metrics(sharded, "eval.jsonl")
    assert [r["step"] for r in b] == [0, 1, 2]
    for x, y in zip(a, b, strict=True):
        assert x["eval/perplexity/loss"] == pytest.approx(y["eval/perplexity/loss"], abs=1e-9)
        assert x["eval/answer_accuracy/accuracy"] == y["eval/answer_accuracy/accuracy"]


def test_deepspeed_and_fsdp1_launches_are_refused_with_the_way_out():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from posttrain.core.errors import UserError
    from posttrain.train.sharding import check_supported

    with pytest.raises(UserError, match="DeepSpeed.*backward.*recipes/accelerate/fsdp2.yaml"):
        check_supported(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, is_fsdp2=False))
    with pytest.raises(UserError, match="fsdp_version: 2"):
        check_supported(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False))
    check_supported(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True))
    check_supported(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_fsdp2=False))


def test_fsdp2_on_policy_distillation_samples_on_gathered_parameters(tiny_model_dir, tmp_path):
    from test_sft_variants import second_model

    teacher = str(second_model(tiny_model_dir, tmp_path, 7))
    common = {"sft.loss": "distill", "teacher": teacher, "sft.distill.lmbda": 0.5, "sft.distill.max_new_tokens": 8,
              "sft.distill.divergence": "reverse_kl", "train.batch_size": 2, "train.max_steps": 2,
              "peft.method": "lora"}
    single, sharded = one_and_sharded("sft", tiny_model_dir, tmp_path, common, accum_two=2, port=29567)
    assert_same_run("sft", single, sharded, keys=("loss", "grad_norm", "distill/on_policy_fraction"))
    assert 0 < metrics(sharded)[0]["distill/on_policy_fraction"] < 1


def test_sigterm_under_fsdp2_checkpoints_every_part_and_the_run_resumes_the_same(tiny_model_dir, tmp_path):
    """SIGTERM to torchrun (what SLURM sends) mid-run: both processes finish the step, write their parts of one
    checkpoint and stop; the same launch again resumes and ends as the uninterrupted run."""
    import signal
    import time

    common = {"train.batch_size": 2, "train.max_steps": 40, "train.save_every": 1000, "peft.method": "lora",
              "train.scheduler": "constant", "train.warmup_steps": 0}
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run_one("sft", write_recipe(tmp_path, tiny_model_dir, whole, {**common, "train.grad_accum": 2}))
    recipe = write_recipe(tmp_path, tiny_model_dir, stopped, {**common, "train.grad_accum": 1})
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    job = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", "29568", str(TESTS / "fsdp_on_cpu.py"),
                            str(FSDP2), "sft", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True,
                           env=environment())
    deadline = time.time() + 120
    while time.time() < deadline and len(metrics(stopped) if (stopped / "metrics.jsonl").exists() else []) < 2:
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    checkpoints = list((stopped / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and "stopped by SIGTERM after step" in output, output[-3000:]
    step = int(checkpoints[0].name.split("-")[1])
    assert 2 <= step < 40 and not (stopped / "final").exists()
    assert sorted(p.name for p in (checkpoints[0] / "sharded").iterdir()) == [".metadata", "__0_0.distcp",
                                                                              "__1_0.distcp"]
    resumed = run_sharded("sft", recipe, port=29569)
    assert f"resuming from {checkpoints[0]}" in resumed.stdout + resumed.stderr
    assert_same_run("sft", whole, stopped)
