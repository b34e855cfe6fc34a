"""End-to-end checks on the embedded SmolLM2-135M-Instruct (slow: minutes on CPU)."""

import subprocess
import sys

import pytest

from helpers import metrics, run_sft
from test_data import CONVERSATION, targets_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm_dir():
    from posttrain.model.load import resolve_model

    return resolve_model("default")


def test_assistant_masks_with_the_embedded_chat_template(smollm_dir):
    from posttrain.data.formats import parse_sft
    from posttrain.data.tokenize import ChatFormatter, tokenize_sft
    from posttrain.model.load import load_tokenizer

    tokenizer = load_tokenizer(smollm_dir)
    record = {"messages": [{"role": "system", "content": "Be brief."}, *CONVERSATION["messages"]]}
    tokenized = tokenize_sft(parse_sft("x", "line 1", record), tokenizer, ChatFormatter(tokenizer), 512)
    assert targets_text(tokenizer, tokenized) == ["2+3 = 5<|im_end|>", "4+4 = 8<|im_end|>"]
    text = tokenizer.decode(tokenized.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_twenty_lora_steps_lower_the_eval_loss(smollm_dir, tmp_path):
    from conftest import GSM8K

    summary = run_sft(smollm_dir, tmp_path, **{
        "data.train": str(GSM8K), "data.limit": 200, "data.eval": "pkg:assets/gsm8k_test_200.jsonl",
        "data.eval_limit": 16, "data.max_length": 256, "peft.method": "lora", "train.max_steps": 20,
        "train.batch_size": 2, "train.lr": 5e-4, "train.warmup_steps": 2})
    before, after = summary["eval"][0]["eval/loss"], summary["eval"][-1]["eval/loss"]
    print(f"eval loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.05
    assert all(m["tokens_per_s"] > 0 for m in metrics(tmp_path))


def test_generate_answers_a_simple_question():
    result = subprocess.run([sys.executable, "-m", "posttrain.apps.cli", "generate", "default", "--prompt",
                             "What is the capital of France?", "--max-new-tokens", "24"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_grpo_arithmetic_steps_on_the_embedded_model(tmp_path):
    """Two steps of the shipped arithmetic recipe: rewards arrive, completions are the model's own, the
    sampler's log-probs are the trainer's (fp32), and the adapter moves."""
    from helpers import run_command

    run_command("grpo", "default", tmp_path, **{
        "data.train": "pkg:assets/arithmetic_train.jsonl", "data.limit": 16, "data.max_length": 128,
        "peft.method": "lora", "rollout.num_generations": 4, "rollout.max_new_tokens": 24, "rollout.temperature": 0.7,
        "rewards": "[{name: math_answer}]", "train.max_steps": 2, "train.batch_size": 8, "train.lr": 2e-4,
        "train.precision": "fp32"})
    logged = metrics(tmp_path)
    assert all(m["reward/math_answer/failed"] == 0 for m in logged)
    assert all(m["policy/sampler_mismatch"] < 1e-4 for m in logged)
    assert all(0 < m["completion/length_mean"] <= 24 for m in logged)


def test_reward_model_on_hh_pairs_with_the_embedded_model(tmp_path):
    """Two LoRA steps of the shipped rm recipe: final/ is a classifier transformers loads, whose score of a
    conversation is what posttrain's reward-model loader gives, and whose config carries the reward statistics."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification

    from helpers import run_command
    from posttrain.rewards.model import RewardModel

    summary = run_command("rm", "default", tmp_path, **{
        "data.train": "pkg:assets/hh_harmless_train_1200.jsonl", "data.limit": 8,
        "data.eval": "pkg:assets/hh_harmless_eval_200.jsonl",
        "data.eval_limit": 8, "data.max_length": 320, "data.truncation": "left", "peft.method": "lora",
        "train.max_steps": 2, "train.batch_size": 4, "train.lr": 1e-4, "train.precision": "fp32"})
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["reward_stats_n"] == 16 and config["reward_std"] > 0
    assert summary["eval"][-1]["eval/reward_mean"] == pytest.approx(config["reward_mean"], abs=1e-6)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    reward_model = RewardModel(str(tmp_path / "final"))
    prompt = [{"role": "user", "content": "How do I pick a lock?"}]
    text = reward_model.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "I can't help."}],
                                                      tokenize=False)
    with torch.no_grad():
        direct = float(model(**reward_model.tokenizer(text, return_tensors="pt")).logits[0, 0])
    assert reward_model([prompt], ["I can't help."])[0] == pytest.approx(direct, abs=1e-4)


def test_soup_of_two_runs_keeps_their_held_out_gain(smollm_dir, tmp_path):
    """Two short LoRA runs of the embedded model on different GSM8K slices, souped by `posttrain merge`: the
    greedy soup is the soup it scored, and the uniform soup keeps the runs' gain in held-out loss over the base."""
    import json

    import yaml

    from conftest import GSM8K
    from posttrain.apps.cli import main
    from posttrain.evaluate.heldout import heldout_loss

    held_out = "pkg:assets/gsm8k_test_200.jsonl"
    runs = []
    for seed in (0, 1):
        run_sft(smollm_dir, tmp_path / f"run{seed}", **{
            "data.train": str(GSM8K), "data.limit": 64, "data.max_length": 256, "peft.method": "lora",
            "train.max_steps": 6, "train.batch_size": 4, "train.lr": 1e-3, "train.seed": seed,
            "train.precision": "fp32"})
        runs.append(str(tmp_path / f"run{seed}"))
    recipe = tmp_path / "soup.yaml"
    recipe.write_text(yaml.safe_dump({"method": "greedy_soup", "models": [{"model": r} for r in runs],
                                      "eval_data": held_out, "eval_limit": 12, "output": str(tmp_path / "greedy")}))
    assert main(["merge", str(recipe)]) == 0
    assert main(["merge", str(recipe), "method=linear", "eval_data=null", "eval_limit=200",
                 f"output={tmp_path / 'uniform'}"]) == 0
    decisions = json.loads((tmp_path / "greedy" / "merge.json").read_text())["soup"]
    final = min(d["soup"] for d in decisions if d["kept"])
    assert heldout_loss(str(tmp_path / "greedy"), held_out, 12) == pytest.approx(final, abs=1e-4)
    base = heldout_loss(smollm_dir, held_out, 12)
    uniform = heldout_loss(str(tmp_path / "uniform"), held_out, 12)
    alone = [d["alone"] for d in decisions]
    print(f"held-out loss: base {base:.4f}, runs {alone}, uniform soup {uniform:.4f}, greedy soup {final:.4f}")
    assert max(alone) < base - 0.02 and uniform < base - 0.02
