"""Online and iterative DPO on the tiny model: pairs are the best and worst completions by the label, ties give
none, the pairwise loss and its reference are DPO's, accumulation cannot change it; the LLM judge is read from
next-token probabilities in both orders."""

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import GSM8K
from helpers import assert_weights_close, final_weights, metrics, run_command
from posttrain.core.errors import UserError

ONLINE = {"rollout.max_new_tokens": 12, "rollout.stop": '["e", "a"]', "rollout.num_generations": 4,
          "rewards": "[{name: 'test_online_dpo:characters'}]", "online.reward_workers": 0, "train.max_steps": 3,
          "train.batch_size": 4}


def characters(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def constant(prompts, completions, **_):
    return [1.0] * len(completions)


def run_online(model_dir, out, **overrides):
    return run_command("online-dpo", model_dir, out, **{**ONLINE, **overrides})


def pool(checkpoint, tokenizer):
    state = load_file(checkpoint / "task.safetensors")
    sides = {name: torch.split(state[f"{name}_tokens"], state[f"{name}_lengths"].tolist()) for name in ("chosen",
                                                                                                        "rejected")}
    return [(tokenizer.decode(c, skip_special_tokens=True), tokenizer.decode(r, skip_special_tokens=True))
            for c, r in zip(sides["chosen"], sides["rejected"])]


def test_pairs_are_best_against_worst_and_the_first_loss_is_log_2(tiny_model_dir, tiny_tokenizer, tmp_path):
    run_online(tiny_model_dir, tmp_path, **{"train.save_every": 1})
    logged = metrics(tmp_path)
    pairs = pool(tmp_path / "checkpoints" / "step-3", tiny_tokenizer)
    assert pairs and all(len(chosen) > len(rejected) for chosen, rejected in pairs)
    assert logged[2]["online/pairs"] == len(pairs) == 4 * (1 - logged[2]["online/tie_fraction"])
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-12)  # the policy is its own reference at step 1
    assert logged[0]["online/chosen_score"] > logged[0]["online/rejected_score"]
    assert logged[1]["rewards/margin"] != 0 and [m["online/round"] for m in logged] == [1, 2,
                                                                                        3]  # fresh pairs each step


def test_ties_give_no_pair(tiny_model_dir, tmp_path):
    run_online(tiny_model_dir, tmp_path, **{"rewards": "[{name: 'test_online_dpo:constant'}]", "train.max_steps": 1})
    first = metrics(tmp_path)[0]
    assert first["online/tie_fraction"] == 1.0 and first["online/pairs"] == 0 and first["loss"] == 0.0  # update skipped


@pytest.mark.parametrize("iterations", [None, 2])
def test_accumulation_does_not_change_loss_or_updates(tiny_model_dir, tmp_path, iterations):
    extra = {"online.iterations": iterations, "online.prompts_per_iteration": 8} if iterations else {}
    runs = []
    for batch_size, accum in [(4, 1), (1, 4)]:
        out = tmp_path / f"{batch_size}x{accum}"
        run_online(tiny_model_dir, out,
                   **{"train.batch_size": batch_size, "train.grad_accum": accum, "train.max_steps": 4,
                                           "peft.method": "lora", **extra})
        runs.append((metrics(out), final_weights(out)))
    (a_metrics, a_weights), (b_metrics, b_weights) = runs
    for a, b in zip(a_metrics, b_metrics):
        for name in ("loss", "grad_norm", "rewards/margin", "online/pairs"):
            assert a[name] == pytest.approx(b[name], abs=1e-9), name
    assert_weights_close(a_weights, b_weights, atol=1e-9)
    if iterations:  # one preference set per iteration, trained on for 2 steps
        assert [m["online/round"] for m in a_metrics] == [1, 1, 2, 2]
        assert a_metrics[0]["online/pairs"] == a_metrics[1]["online/pairs"]


def test_any_pairwise_loss_trains_online(tiny_model_dir, tmp_path):
    run_online(tiny_model_dir, tmp_path, **{"loss.name": "simpo", "reference": "none", "train.max_steps": 2})
    assert metrics(tmp_path)[0]["loss"] > 0


def test_judge_reads_both_orders(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from posttrain.rewards.judge import PairwiseJudge, round_robin

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    judge = PairwiseJudge(model, tiny_tokenizer, batch_size=3)
    conversations = [[{"role": "user", "content": "What is 2 + 2?"}], "raw prompt"]
    forward = judge.compare(conversations, ["4", "a longer answer here"], ["five", "short"])
    backward = judge.compare(conversations, ["five", "short"], ["4", "a longer answer here"])
    assert (forward.first_better + backward.first_better).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    assert torch.equal(forward.consistent, backward.consistent)
    # P(A) is the judge's own next-token distribution over the two letters
    text = judge.question(conversations[0], "4", "five")
    ids = tiny_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1, judge.letters]
    assert float(judge.prob_a([text])[0]) == pytest.approx(float(torch.softmax(logits, -1)[0]), abs=1e-9)
    wins, _ = round_robin(judge, conversations, [["a", "b", "c"], ["x", "y"]])
    assert [sum(w) for w in wins] == pytest.approx([3.0, 1.0])  # one point per comparison


def test_self_rewarding_with_the_policy_as_judge(tiny_model_dir, tmp_path):
    run_online(tiny_model_dir, tmp_path, **{"rewards": "[]", "online.judge": "{model: policy}", "peft.method": "lora",
                                            "train.max_steps": 2, "data.eval_limit": 8, "data.eval": str(GSM8K),
                                            "train.eval_every": 1})
    first = metrics(tmp_path)[0]
    assert 0 <= first["judge/consistency"] <= 1 and first["online/pairs"] > 0
    evals = metrics(tmp_path, "eval.jsonl")
    assert evals[0]["eval/win_rate"] == 0.5 and evals[0]["eval/tie_rate"] == 1.0  # the starting policy against itself
    assert evals[0]["eval/win_rate_ci_low"] < 0.5 < evals[0]["eval/win_rate_ci_high"]


@pytest.mark.parametrize("overrides, message", [
    ({"online.judge": "{model: policy}"}, "exactly one"),
    ({"rewards": "[]"}, "exactly one"),
    ({"online.iterations": 2}, "multiple of online.iterations"),
    ({"loss.name": "dft"}, "no gold answers and no fixed prompts"),
    ({"online.judge": "{model: policy, template: 'no fields'}", "rewards": "[]"}, "must contain"),
])
def test_recipe_errors(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run_online(tiny_model_dir, tmp_path, **overrides)
