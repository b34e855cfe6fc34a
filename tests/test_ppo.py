"""PPO with a value model through the engine on the tiny model: the loss is what the formulas say, accumulation
cannot change it, the critic is shared or separate for real, epochs and mini-batches reuse one rollout batch,
a kill mid-cycle resumes the same run; reward models as rewards."""


import pytest
import torch

from helpers import assert_weights_close, final_weights, metrics, run_command
from posttrain.core.errors import UserError

RL = {"rollout.max_new_tokens": 12, "rollout.stop": '["e", "a"]', "rewards": "[{name: length, options: {per: 10}}]",
      "rl.reward_workers": 0, "train.max_steps": 2, "train.batch_size": 8, "rl.ppo_epochs": 1}


def run_ppo(model_dir, out, **overrides):
    return run_command("ppo", model_dir, out, **{**RL, **overrides})


def test_first_step_loss_is_policy_plus_value_loss(tiny_model_dir, tmp_path):
    """Step 1 is on-policy with V = 0 (the zero-initialized head): the token-mean loss is -mean(A) + vf_coef x
    mean(0.5 (V - R)^2), and with gamma = lam = 1 and no KL every token's return is its completion's reward."""
    run_ppo(tiny_model_dir, tmp_path, **{"rl.kl_coef": 0.0, "rl.gamma": 1.0, "rl.lam": 1.0, "rl.vf_coef": 0.5})
    first = metrics(tmp_path)[0]
    assert first["value/mean"] == 0.0 and first["value/explained_variance"] == pytest.approx(0.0, abs=1e-12)
    assert first["value/error"] == pytest.approx(first["value/returns_mean"], abs=1e-12)  # |0 - R| = R >= 0
    assert first["loss"] == pytest.approx(-first["advantage/mean"] + 0.5 * first["value/loss"], abs=1e-12)
    assert first["advantage/mean"] == pytest.approx(0.0, abs=1e-9) and first["advantage/std"] == pytest.approx(1.0,
                                                                                                               abs=1e-6)
    assert first["value/loss"] > 0 and first["grad_norm"] > 0


def test_accumulation_does_not_change_loss_or_updates(tiny_model_dir, tmp_path):
    runs = {}
    for batch_size, accum in [(8, 1), (2, 4)]:
        out = tmp_path / f"{batch_size}x{accum}"
        run_ppo(tiny_model_dir, out,
                **{"train.batch_size": batch_size, "train.grad_accum": accum, "peft.method": "lora",
                                        "rl.ppo_epochs": 2, "train.max_steps": 4})
        runs[(batch_size, accum)] = (metrics(out), final_weights(out))
    (ref_metrics, ref_weights), (other_metrics, other_weights) = runs.values()
    assert ref_metrics[1]["policy/approx_kl_old"] > 0 and ref_metrics[2]["policy/kl_ref"] > 0
    for a, b in zip(ref_metrics, other_metrics):
        for name in ("loss", "grad_norm", "value/loss", "value/clip_fraction", "policy/kl_ref", "reward/mean"):
            assert a[name] == pytest.approx(b[name], abs=1e-9), name
    assert_weights_close(ref_weights, other_weights, atol=1e-9)


def test_value_head_learns_the_returns(tiny_model_dir, tmp_path):
    run_ppo(tiny_model_dir, tmp_path, **{"train.max_steps": 8, "rl.ppo_epochs": 2, "train.lr": 3e-2, "rl.vf_coef": 1.0,
                                         "rl.kl_coef": 0.0})
    logged = metrics(tmp_path)
    assert logged[0]["value/error"] > 0.2
    assert logged[-1]["value/error"] < 0.5 * logged[0]["value/error"]
    assert logged[-1]["value/explained_variance"] > logged[0]["value/explained_variance"]


@pytest.mark.parametrize("critic, policy_changes", [("shared", True), ("separate", False)])
def test_value_loss_trains_the_policy_trunk_only_when_shared(tiny_model_dir, tmp_path, critic, policy_changes):
    """Two steps (the zero-initialized head passes no gradient to the trunk in the first), no gradient clipping
    (it would couple the two through the global norm): the policy's update depends on vf_coef with a shared
    trunk, and not at all with a separate critic."""
    weights = []
    for vf_coef in (0.1, 1.0):
        out = tmp_path / f"{critic}-{vf_coef}"
        run_ppo(tiny_model_dir, out, **{"rl.critic": critic, "rl.vf_coef": vf_coef, "train.max_steps": 2,
                                        "train.max_grad_norm": "null", "peft.method": "lora", "rl.kl_coef": 0.0})
        weights.append(final_weights(out))
    difference = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    assert (difference > 1e-6) == policy_changes, difference


def test_separate_critic_is_checkpointed_with_its_own_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    run_ppo(tiny_model_dir, tmp_path, **{"rl.critic": "separate", "peft.method": "lora", "train.save_every": 2})
    saved = load_file(tmp_path / "checkpoints" / "step-2" / "trainable.safetensors")
    assert {"value_head.weight", "value_head.bias"} <= set(saved)
    assert any(k.startswith("critic.") and "lora_A" in k for k in saved)
    assert any(k.startswith("policy.") and "lora_A" in k for k in saved)
    assert not any("lm_head" in k or "embed" in k for k in saved)


def test_mini_batches_split_each_epoch_of_one_rollout_batch(tiny_model_dir, tmp_path):
    """2 epochs x 2 mini-batches: four optimizer steps per rollout batch, each on half of its completions (a
    different half per epoch), the ratio against the sampling policy from the second step on."""
    run_ppo(tiny_model_dir, tmp_path, **{"train.batch_size": 4, "rl.ppo_epochs": 2, "rl.num_mini_batches": 2,
                                         "train.max_steps": 5, "train.lr": 5e-2})
    logged = metrics(tmp_path)
    assert len({m["reward/mean"] for m in logged[:4]}) == 1 and logged[4]["reward/mean"] != logged[0]["reward/mean"]
    assert logged[0]["policy/approx_kl_old"] == 0.0 and all(m["policy/approx_kl_old"] > 0 for m in logged[1:4])
    # a new rollout batch: on-policy again, to float64 rounding (sampling-time and training-time passes put each
    # completion in a different micro-batch)
    assert logged[4]["policy/approx_kl_old"] < 1e-24


def test_mini_batch_members_cover_the_batch_once_per_epoch(tiny_model_dir, tmp_path):
    from posttrain.apps.recipes import load_recipe
    from posttrain.model.load import load_tokenizer
    from posttrain.train.tasks.ppo import PPOTask

    from helpers import tiny_recipe

    recipe = load_recipe("ppo", None,
                         tiny_recipe(tiny_model_dir, tmp_path, **{**RL, "rl.ppo_epochs": 3, "rl.num_mini_batches": 4}))
    task = PPOTask(recipe, load_tokenizer(str(tiny_model_dir)))
    parts = [task.mini_batch_members(step, 10) for step in range(12, 24)]
    for epoch in range(3):
        assert sorted(i for part in parts[4 * epoch : 4 * epoch + 4] for i in part) == list(range(10))
    assert parts[0] != parts[4]  # reshuffled per epoch
    assert parts == [task.mini_batch_members(step, 10) for step in range(12, 24)]  # a function of the step


def test_sigkill_mid_cycle_then_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    from test_engine import straight_and_killed

    common = {**RL, "train.max_steps": 6, "train.save_every": 1, "train.batch_size": 4, "peft.method": "lora",
              "peft.dropout": 0.1, "rl.ppo_epochs": 2, "rl.num_mini_batches": 2}
    straight, killed = straight_and_killed("ppo", tmp_path, tiny_model_dir, common,
                                           kill_at_step=3)  # step 2 saved, mid-cycle
    assert_weights_close(final_weights(straight), final_weights(killed), atol=1e-6)
    for a, b in zip(metrics(straight), metrics(killed)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["value/loss"] == pytest.approx(b["value/loss"],
                                                                                                    abs=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"rl.advantage": "rloo"}, "advantage"),
    ({"rl.critic_model": "x"}, "rl.critic: separate"),
    ({"rl.policy_loss": "reinforce", "rl.ppo_epochs": 2}, "on-policy"),
    ({"rl.scale_rewards": "group"}, "scale_rewards"),
])
def test_recipe_errors(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run_ppo(tiny_model_dir, tmp_path, **overrides)


# -- reward models ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    directory = tmp_path_factory.mktemp("tiny-rm")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


def test_reward_model_scores_the_last_token_whatever_the_padding(reward_model_dir):
    from posttrain.rewards.model import RewardModel, render

    scorer = RewardModel(str(reward_model_dir), batch_size=3)
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Hi"}], "raw text prompt "]
    completions = ["4", "Hello there, how can I help you today?", "and its continuation"]
    batched = scorer(prompts, completions)
    alone = [RewardModel.__call__(scorer, [p], [c])[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(alone, abs=1e-5)
    # the same number as transformers' own sequence-classification forward on one unpadded sequence
    text = render(scorer.tokenizer, prompts[1], completions[1])
    ids = scorer.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = float(scorer.model(input_ids=ids).logits[0, 0])
    assert batched[1] == pytest.approx(expected, abs=1e-5)
    assert text.endswith("<|im_end|>\n") and "Hello there" in text  # the reward model's own chat template


def test_a_causal_lm_is_not_a_reward_model(tiny_model_dir):
    from posttrain.rewards.model import RewardModel

    with pytest.raises(UserError, match="no trained score head"):
        RewardModel(str(tiny_model_dir))


def test_ppo_with_a_reward_model_and_a_critic_started_from_it(tiny_model_dir, reward_model_dir, tmp_path):
    run_ppo(tiny_model_dir, tmp_path,
            **{"rewards": f"[{{model: {reward_model_dir}, name: rm}}, {{name: length, weight: 0.5}}]",
                                         "rl.critic": "separate", "rl.critic_model": str(reward_model_dir)})
    first = metrics(tmp_path)[0]
    assert first["reward/rm/failed"] == 0 and first["reward/rm/mean"] != 0
    assert first["reward/mean"] == pytest.approx(first["reward/rm/mean"] + 0.5 * first["reward/length/mean"], abs=1e-9)
    assert first["value/mean"] != 0.0  # the value head starts as the reward model's score head


def test_critic_model_must_share_the_tokenizer(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<extra>"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(UserError, match="tokenizer differs"):
        run_ppo(tiny_model_dir, tmp_path / "run", **{"rl.critic": "separate", "rl.critic_model": str(other)})
