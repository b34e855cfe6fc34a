"""Online RL through the engine with the tiny model: invariance of every aggregation to accumulation and
process count, KL placement, DAPO's filters, rollout state in checkpoints, evaluation, recipe errors."""

import math

import pytest
import torch

from helpers import assert_weights_close, final_weights, metrics, run_command
from posttrain.objectives.policy import AGGREGATIONS

# The tiny random model rarely samples EOS: stop strings give completions of varied lengths, and the
# length reward gives every group varied rewards, so every aggregation mode weighs tokens differently.
RL = {"rollout.num_generations": 4, "rollout.max_new_tokens": 12, "rollout.stop": '["e", "a"]',
      "rewards": "[{name: length, options: {per: 10}}]", "rl.reward_workers": 0, "train.max_steps": 2}


def run_grpo(model_dir, out, **overrides):
    return run_command("grpo", model_dir, out, **{**RL, **overrides})


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_accumulation_does_not_change_loss_or_updates(tiny_model_dir, tmp_path, mode):
    runs = {}
    for batch_size, accum in [(8, 1), (2, 4), (1, 8)]:
        out = tmp_path / f"{batch_size}x{accum}"
        run_grpo(tiny_model_dir, out,
                 **{"train.batch_size": batch_size, "train.grad_accum": accum, "rl.aggregation": mode,
                                         "rl.kl_coef": 0.05, "peft.method": "lora"})
        runs[(batch_size, accum)] = (metrics(out), final_weights(out))
    reference_metrics, reference_weights = runs[(8, 1)]
    assert reference_metrics[0]["grad_norm"] > 1e-3 and reference_metrics[1]["policy/kl_ref"] > 0
    for key, (logged, weights) in runs.items():
        for a, b in zip(reference_metrics, logged):
            for name in ("loss", "grad_norm", "policy/kl_ref", "policy/entropy", "reward/mean"):
                assert a[name] == pytest.approx(b[name], abs=1e-9), (key, name)
        assert_weights_close(reference_weights, weights, atol=1e-9)


def test_per_microbatch_normalization_would_fail_the_accumulation_test(tiny_model_dir, tmp_path, monkeypatch):
    """Guard: normalizing each micro-batch by its own tokens (TRL #3021) changes the loss by far more than the
    tolerance above."""
    from posttrain.train.tasks.grpo import GRPOTask

    original = GRPOTask.loss
    monkeypatch.setattr(GRPOTask, "loss", lambda self, module, rl, normalizer: original(
        self, module, rl, rl.units * self.recipe.train.grad_accum))
    for batch_size, accum in [(8, 1), (1, 8)]:
        run_grpo(tiny_model_dir, tmp_path / f"{batch_size}x{accum}",
                 **{"train.batch_size": batch_size, "train.grad_accum": accum})
    first, buggy = metrics(tmp_path / "8x1"), metrics(tmp_path / "1x8")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(first, buggy)) > 1e3 * 1e-9


def test_metrics_explain_the_step(tiny_model_dir, tmp_path):
    run_grpo(tiny_model_dir, tmp_path, **{"train.batch_size": 8})
    first = metrics(tmp_path)[0]
    for key in ("reward/mean", "reward/std", "reward/length/mean", "reward/length/failed", "groups/zero_std_fraction",
                "advantage/mean", "advantage/std", "policy/clip_low_fraction", "policy/clip_high_fraction",
                "policy/approx_kl_old", "policy/entropy", "policy/sampler_mismatch", "completion/length_mean",
                "completion/length_max", "completion/truncated_fraction", "time/generate_s", "time/reward_s",
                "time/update_s", "generate/tokens_per_s"):
        assert key in first, key
    # on-policy, token_mean: the loss is minus the mean token advantage (0 when lengths do not vary), whatever
    # the gradient, which is not 0
    assert first["loss"] == pytest.approx(-first["advantage/mean"], abs=1e-12)
    assert first["advantage/std"] > 0.1 and first["grad_norm"] > 0
    assert first["policy/sampler_mismatch"] < 1e-5  # generate's float32 logits against the fp64 trainer
    assert first["policy/approx_kl_old"] == 0.0 and first["policy/clip_low_fraction"] == 0.0


def test_kl_in_the_reward_and_in_the_loss(tiny_model_dir, tmp_path):
    """Step 1: the LoRA policy is its reference (KL 0). Then the KL shows up where it was put: in the loss
    (logged per token, added to the loss), or subtracted from the rewards (the advantages change)."""
    common = {"train.batch_size": 8, "train.max_steps": 3, "peft.method": "lora", "rl.kl_coef": 0.5}
    run_grpo(tiny_model_dir, tmp_path / "loss", **common, **{"rl.kl_estimator": "k3"})
    run_grpo(tiny_model_dir, tmp_path / "reward", **common, **{"rl.kl_in": "reward", "rl.kl_estimator": "k1"})
    run_grpo(tiny_model_dir, tmp_path / "none", **{**common, "rl.kl_coef": 0.0})
    in_loss, in_reward, without = metrics(tmp_path / "loss"), metrics(tmp_path / "reward"), metrics(tmp_path / "none")
    assert in_loss[0]["policy/kl_ref"] == pytest.approx(0.0, abs=1e-12)
    assert in_reward[0]["policy/kl_ref"] == pytest.approx(0.0, abs=1e-12)
    assert abs(in_loss[2]["policy/kl_ref"]) > 1e-6 and abs(in_reward[2]["policy/kl_ref"]) > 1e-6
    assert in_loss[0]["loss"] == pytest.approx(without[0]["loss"], abs=1e-12)  # no KL yet: the same step
    assert in_reward[0]["advantage/std"] == pytest.approx(without[0]["advantage/std"], abs=1e-12)
    assert "policy/kl_ref" not in without[0]


def test_dynamic_sampling_drops_groups_whose_rewards_agree(tiny_model_dir, tmp_path):
    """A constant reward: every group has zero std. ``drop`` trains on nothing (the weights do not move);
    ``none`` trains on zero advantages (the weights do not move either, but the steps are spent)."""
    run_grpo(tiny_model_dir, tmp_path, **{"train.batch_size": 8, "rl.dynamic_sampling": "drop", "peft.method": "lora",
                                          "rewards": "[{name: 'test_grpo:constant'}]"})
    logged = metrics(tmp_path)
    assert [m["groups/trained"] for m in logged] == [0.0, 0.0]
    assert [m["groups/zero_std_fraction"] for m in logged] == [1.0, 1.0]
    assert all(float(w.abs().max()) == 0.0 for k, w in final_weights(tmp_path).items() if "lora_B" in k)


def test_dynamic_sampling_filters_on_the_outcome_before_length_shaping(tiny_model_dir, tmp_path):
    """DAPO (Eq. 11) drops groups whose accuracy is all 0 or all 1. Every completion is right here, and the soft
    overlong punishment (from the second token on) makes the shaped rewards vary with length: still nothing is
    trained on, while the shaped rewards' zero-std fraction shows the groups did vary."""
    run_grpo(tiny_model_dir, tmp_path, **{"train.batch_size": 8, "rl.dynamic_sampling": "drop", "peft.method": "lora",
                                          "rewards": "[{name: 'test_grpo:constant'}]", "rl.overlong_buffer": 11})
    logged = metrics(tmp_path)
    assert [m["groups/trained"] for m in logged] == [0.0, 0.0]
    assert all(m["groups/zero_std_fraction"] < 1.0 for m in logged)
    assert all(float(w.abs().max()) == 0.0 for k, w in final_weights(tmp_path).items() if "lora_B" in k)


def test_resampling_refills_the_step(tiny_model_dir, tmp_path):
    run_grpo(tiny_model_dir, tmp_path,
             **{"train.batch_size": 8, "rl.dynamic_sampling": "resample", "rl.max_resample": 3,
                                          "rewards": "[{name: 'test_grpo:only_prompt_zero_varies'}]", "data.limit": 8})
    logged = metrics(tmp_path)
    assert all(m["groups/trained"] <= 2 for m in logged)
    assert sum(m["groups/resample_rounds"] for m in logged) > 0


def constant(prompts, completions, **_):
    return [1.0] * len(completions)


def only_prompt_zero_varies(prompts, completions, group, **_):
    """Varied rewards only for the groups of the first prompt position of each sampling round."""
    return [float(len(c)) if g % 2 == 0 else 0.0 for c, g in zip(completions, group)]


def test_overlong_filter_masks_truncated_completions(tiny_model_dir, tmp_path):
    """Every completion is cut at 12 tokens without stop strings: filtered, nothing is trained on."""
    run_grpo(tiny_model_dir, tmp_path, **{"train.batch_size": 8, "rollout.stop": "[]", "rl.overlong_filter": "true",
                                          "peft.method": "lora"})
    assert metrics(tmp_path)[0]["completion/truncated_fraction"] == 1.0
    assert all(float(w.abs().max()) == 0.0 for k, w in final_weights(tmp_path).items() if "lora_B" in k)


def loss_without_the_filtered(rollouts, per_token: list[float], mode: str, max_new_tokens: int) -> float:
    """The step loss by a loop over the completions trained on, the truncated ones left out entirely."""
    kept, t = [], 0
    for i, n in enumerate(rollouts.model_tokens()):
        if rollouts.active[i]:
            kept.append(per_token[t : t + n])
        t += n
    sums = [sum(tokens) for tokens in kept]
    if mode == "token_mean":
        return sum(sums) / sum(len(tokens) for tokens in kept)
    if mode == "seq_mean_token_mean":
        return sum(s / len(tokens) for s, tokens in zip(sums, kept)) / len(kept)
    if mode == "seq_mean_token_sum":
        return sum(sums) / len(kept)
    return sum(sums) / (len(kept) * max_new_tokens)


@pytest.mark.parametrize("command", ["grpo", "ppo"])
@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("batch_size, accum", [(8, 1), (2, 4)])
def test_overlong_filter_with_mixed_truncation_leaves_the_truncated_out(tiny_model_dir, tmp_path, monkeypatch, command,
                                                                        mode, batch_size, accum):
    """Some completions cut at 12 tokens, a truncated one ahead of kept ones in a micro-batch: the step loss is the
    aggregation over the kept completions alone. Step 1 is on-policy (ratio 1), so a token's loss is -A, plus
    PPO's value loss 0.5 R^2 at V = 0 (the zero-initialized head)."""
    from posttrain.train.tasks.grpo import GRPOTask

    collected = []
    original = GRPOTask.collect
    monkeypatch.setattr(GRPOTask, "collect", lambda self, *a: collected.append(original(self, *a)) or collected[-1])
    overrides = {"rl.overlong_filter": "true", "rl.aggregation": mode, "train.max_steps": 1,
                 "train.batch_size": batch_size,
                 "train.grad_accum": accum}
    if command == "ppo":
        overrides.update({"rollout.num_generations": 1, "rl.ppo_epochs": 1, "rl.kl_coef": 0.0, "rl.vf_coef": 0.5})
    run_command(command, tiny_model_dir, tmp_path, **{**RL, **overrides})
    rollouts = collected[0]
    active = rollouts.active.tolist()
    assert any(not a and any(active[i + 1 : (i // batch_size + 1) * batch_size]) for i, a in enumerate(active))
    per_token = (-rollouts.advantages).tolist()
    if command == "ppo":
        per_token = [x + 0.5 * 0.5 * float(r) ** 2 for x, r in zip(per_token, rollouts.returns)]
    expected = loss_without_the_filtered(rollouts, per_token, mode, 12)
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(expected, abs=1e-12)


def test_soft_overlong_punishment(tiny_model_dir, tmp_path):
    from posttrain.apps.recipes import load_recipe
    from posttrain.train.tasks.grpo import GRPOTask

    recipe = load_recipe("grpo", None, [f"model={tiny_model_dir}", f"output_dir={tmp_path}", "data.train=x.jsonl",
                                        "rollout.max_new_tokens=20", "rl.overlong_buffer=8",
                                        "rl.overlong_penalty=2.0", "rollout.chat=false"])
    task = GRPOTask(recipe, None)

    class Completion:
        def __init__(self, n):
            self.token_ids = [0] * n

    # no penalty up to 12 tokens, then linear to -2 at 20
    assert task.shape_rewards([1.0] * 4,
                              [Completion(n) for n in (5, 12, 16, 20)]) == pytest.approx([1.0, 1.0, 0.0, -1.0])


def test_num_iterations_reuses_rollouts_with_the_old_logprobs(tiny_model_dir, tmp_path):
    run_grpo(tiny_model_dir, tmp_path, **{"train.batch_size": 8, "train.max_steps": 4, "rl.num_iterations": 2,
                                          "train.lr": 5e-2})
    logged = metrics(tmp_path)
    assert logged[0]["reward/mean"] == logged[1]["reward/mean"]  # the same rollouts, trained on twice
    assert logged[0]["policy/approx_kl_old"] == 0.0 and logged[1]["policy/approx_kl_old"] > 0
    assert logged[2]["policy/approx_kl_old"] == 0.0  # a fresh rollout batch


def test_sigkill_then_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    """Kill mid-cycle of num_iterations 2: the rollout buffer and the sampling RNG come back from the checkpoint."""
    from test_engine import straight_and_killed

    common = {**RL, "train.max_steps": 6, "train.save_every": 1, "train.batch_size": 4, "train.grad_accum": 2,
              "peft.method": "lora", "peft.dropout": 0.1, "rl.num_iterations": 2, "rl.kl_coef": 0.1}
    straight, killed = straight_and_killed("grpo", tmp_path, tiny_model_dir, common,
                                           kill_at_step=4)  # step 3 saved, mid-cycle
    assert_weights_close(final_weights(straight), final_weights(killed), atol=1e-6)
    for a, b in zip(metrics(straight), metrics(killed)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["reward/mean"] == pytest.approx(b["reward/mean"],
                                                                                                     abs=1e-12)


def test_evaluation_reports_accuracy_with_an_interval(tiny_model_dir, tmp_path):
    from conftest import GSM8K

    run_grpo(tiny_model_dir, tmp_path,
             **{"train.batch_size": 8, "train.max_steps": 1, "rewards": "[{name: math_answer}]",
                                          "data.eval": str(GSM8K), "data.eval_limit": 6})
    evaluated = metrics(tmp_path, "eval.jsonl")[-1]
    assert evaluated["eval/n"] == 6 and 0.0 <= evaluated["eval/accuracy_ci_low"] <= evaluated["eval/accuracy"]
    assert evaluated["eval/accuracy_ci_high"] > 0.3  # 6 problems: the interval is wide, as it should be
    assert evaluated["eval/math_answer/accuracy"] == evaluated["eval/accuracy"]


@pytest.mark.parametrize("overrides, message", [
    ({"train.batch_size": 6}, "train.batch_size x train.grad_accum"),
    ({"rl.epsilon_low": 0.1, "rl.policy_loss": "reinforce"}, "epsilon_low not used"),
    ({"rl.advantage": "reinforce_pp", "rl.kl_coef": 0.1}, "kl_in: reward"),
    ({"rl.policy_loss": "reinforce", "rl.num_iterations": 2}, "on-policy"),
    ({"rl.kl_estimator": "none", "rl.kl_coef": 0.1}, "kl_estimator"),
    ({"rl.advantage": "gae"}, "gae"),
    ({"rewards": "[{name: nope}]"}, "unknown reward"),
    ({"train.max_tokens_per_micro_batch": 100}, "forms its own"),
])
def test_recipe_errors(tiny_model_dir, tmp_path, overrides, message):
    from posttrain.core.errors import UserError

    with pytest.raises((UserError, ValueError), match=message):
        run_grpo(tiny_model_dir, tmp_path, **{"train.batch_size": 8, **overrides})


@pytest.mark.parametrize("command, overrides, estimator", [
    ("grpo", {}, "k3"),
    ("grpo", {"rl.kl_in": "reward", "rl.advantage": "reinforce_pp"}, "k1"),  # REINFORCE++, Eqs. 8-9
    ("grpo", {"rl.kl_in": "reward", "rl.kl_estimator": "k3"}, "k3"),  # asked for: kept (the README says what it does)
    ("grpo", {"rl.kl_estimator": "k2"}, "k2"),
    ("ppo", {}, "k1"),
    ("ppo", {"rl.kl_in": "loss"}, "k3"),
])
def test_the_kl_estimator_follows_where_the_kl_goes(tiny_model_dir, tmp_path, command, overrides, estimator):
    """Unset, rl.kl_estimator is k1 in the reward and k3 in the loss, resolved at recipe load: the run's recipe.yaml
    says which, and loads back to the same recipe."""
    import yaml

    from posttrain.apps.recipes import load_recipe, validate_recipe
    from posttrain.core.config import dump_recipe

    from helpers import tiny_recipe

    recipe = load_recipe(command, None, tiny_recipe(tiny_model_dir, tmp_path, **{"rl.kl_coef": 0.1, **overrides}))
    assert recipe.rl.kl_estimator == estimator
    written = yaml.safe_load(dump_recipe(recipe))
    assert written["rl"]["kl_estimator"] == estimator
    assert validate_recipe(command, written) == recipe


@pytest.mark.parametrize("command", ["grpo", "ppo"])
def test_k1_in_the_loss_is_refused_with_the_way_out(tiny_model_dir, tmp_path, command):
    """k1 in the loss has zero expected gradient: refused at load, naming k3 / k2 in the loss or k1 in the reward;
    without a KL term (kl_coef 0) the estimator is not read and nothing is refused."""
    from posttrain.apps.recipes import load_recipe
    from posttrain.core.errors import UserError

    from helpers import tiny_recipe

    settings = {"rl.kl_in": "loss", "rl.kl_estimator": "k1"}
    with pytest.raises(UserError, match="zero expected gradient.*k3 or k2.*kl_in: reward"):
        load_recipe(command, None, tiny_recipe(tiny_model_dir, tmp_path, **settings, **{"rl.kl_coef": 0.1}))
    assert load_recipe(command, None, tiny_recipe(tiny_model_dir, tmp_path, **settings, **{"rl.kl_coef": 0.0}))


# -- the generation backend ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from posttrain.model.load import load_tokenizer
    from posttrain.rollout.backend import TransformersBackend
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    return TransformersBackend(model, load_tokenizer(str(tiny_model_dir)))


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def test_samples_do_not_depend_on_the_batch(backend):
    from posttrain.rollout.backend import SamplingSettings

    settings = SamplingSettings(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50)
    together = backend.generate(PROMPTS, [1, 2, 3], settings)
    backend.batch_size = 1
    try:
        alone = backend.generate(PROMPTS, [1, 2, 3], settings)
    finally:
        backend.batch_size = 64
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert backend.generate(PROMPTS[:1], [1], settings)[0].token_ids == together[0].token_ids  # seeded per sample
    assert backend.generate(PROMPTS[:1], [4], settings)[0].token_ids != together[0].token_ids


def test_sampler_logprobs_are_the_trainers_at_the_sampling_temperature(backend):
    from posttrain.rollout.backend import SamplingSettings

    completion = backend.generate(PROMPTS[:1], [7], SamplingSettings(max_new_tokens=8, temperature=0.7))[0]
    ids = torch.tensor([PROMPTS[0] + completion.token_ids])
    logits = backend.model(ids).logits[0, len(PROMPTS[0]) - 1 : -1] / 0.7
    direct = logits.log_softmax(-1).gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
    assert completion.sampler_logps == pytest.approx(direct.tolist(), abs=1e-5)  # generate's logits are float32


def test_temperature_zero_is_greedy(backend):
    from posttrain.rollout.backend import SamplingSettings

    greedy = backend.generate(PROMPTS[:1], [0], SamplingSettings(max_new_tokens=8, temperature=0.0))[0]
    expected = backend.model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False, pad_token_id=2)
    produced = expected[0, len(PROMPTS[0]):].tolist()
    assert greedy.token_ids == produced[: len(greedy.token_ids)]
    assert backend.generate(PROMPTS[:1], [0],
                            SamplingSettings(max_new_tokens=8, temperature=1.0,
                                             top_k=1))[0].token_ids == greedy.token_ids


def test_stop_strings_end_a_completion(backend):
    from posttrain.rollout.backend import SamplingSettings

    free = backend.generate(PROMPTS, [1, 2, 3], SamplingSettings(max_new_tokens=12))
    stopped = backend.generate(PROMPTS, [1, 2, 3], SamplingSettings(max_new_tokens=12, stop=("e",)))
    for a, b in zip(free, stopped):
        assert a.token_ids[: len(b.token_ids)] == b.token_ids  # the same sample, cut
        if "e" in a.text:
            assert b.text.count("e") >= 1 and not b.truncated and "e" not in backend.tokenizer.decode(b.token_ids[:-1])


# -- shipped task and recipes ----------------------------------------------------------------------------
def test_shipped_arithmetic_files_are_the_generator_output_and_never_overlap():
    import json
    from importlib import resources

    from posttrain.data.arithmetic import split

    assets = resources.files("posttrain") / "assets"
    train, evaluation = split()
    assert [json.loads(line) for line in (assets / "arithmetic_train.jsonl").read_text().splitlines()] == train
    assert [json.loads(line) for line in (assets / "arithmetic_eval_200.jsonl").read_text().splitlines()] == evaluation
    assert len(evaluation) == 200 and not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    for record in train + evaluation:
        expression = record["prompt"].removeprefix("What is ").split("?")[0]
        assert str(eval(expression)) == record["answer"]  # noqa: S307 - our own generated arithmetic
    assert {op: sum(f" {op} " in r["prompt"] for r in evaluation) for op in "+-*"} == {"+": 67, "-": 67, "*": 66}


def test_shipped_large_number_files_are_the_generator_output_and_never_overlap():
    import json
    from importlib import resources

    from posttrain.data.arithmetic import large_split

    assets = resources.files("posttrain") / "assets"
    train, evaluation = large_split()
    assert [json.loads(line) for line in (assets / "arithmetic_large_train.jsonl").read_text().splitlines()] == train
    assert [
        json.loads(line) for line in (assets / "arithmetic_large_eval_200.jsonl").read_text().splitlines()
    ] == evaluation
    assert (
        len(train) == 1200
        and len(evaluation) == 200
        and not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    )
    for record in train + evaluation:
        assert str(eval(record["prompt"].removeprefix("What is ").rstrip("?"))) == record["answer"]  # noqa: S307


def test_gsm8k_recipe_runs_with_tiny_settings(tiny_model_dir, tmp_path):
    """The GPU recipe as shipped (bf16 autocast, gradient checkpointing, two rewards in worker processes),
    shrunk to the tiny model and one step."""
    from helpers import reset_accelerate
    from posttrain.apps.recipes import load_recipe
    from posttrain.train.run import run

    reset_accelerate()
    overrides = {"model": tiny_model_dir, "output_dir": tmp_path, "data.limit": 8, "data.eval_limit": 4,
                 "data.max_length": 256, "rollout.max_new_tokens": 8, "rollout.num_generations": 4,
                 "train.max_steps": 1, "train.batch_size": 8, "train.grad_accum": 1, "train.report_to": "[]"}
    summary = run("grpo", load_recipe("grpo", "grpo_gsm8k", [f"{k}={v}" for k, v in overrides.items()]))
    logged = metrics(tmp_path)[0]
    assert logged["reward/math_answer/failed"] == 0 and logged["reward/format/failed"] == 0
    assert summary["eval"][-1]["eval/n"] == 4
    assert "eval/math_answer/accuracy_ci_high" in summary["eval"][-1]  # each verifier gets its own accuracy


def test_remax_trains_against_the_greedy_baseline(tiny_model_dir, tmp_path):
    runs = {}
    for batch_size, accum in [(8, 1), (1, 8)]:
        out = tmp_path / f"{batch_size}x{accum}"
        run_grpo(tiny_model_dir, out,
                 **{"train.batch_size": batch_size, "train.grad_accum": accum, "rl.advantage": "remax",
                                         "rl.policy_loss": "reinforce", "peft.method": "lora"})
        runs[(batch_size, accum)] = (metrics(out), final_weights(out))
    (first, weights), (other, other_weights) = runs.values()
    assert first[0]["advantage/std"] > 0 and first[0]["grad_norm"] > 0
    for a, b in zip(first, other):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-9)
    assert_weights_close(weights, other_weights, atol=1e-9)


def test_reward_workers_end_with_the_run(tiny_model_dir, tmp_path):
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}
    run_grpo(tiny_model_dir, tmp_path, **{"train.batch_size": 8, "train.max_steps": 1, "rl.reward_workers": 2})
    assert {p.pid for p in multiprocessing.active_children()} <= before


def test_sampler_correction_weighs_the_loss_by_the_capped_ratio(tiny_model_dir, tmp_path, monkeypatch):
    """A sampler whose log-probs are all 1 nat below the trainer's: rho = e > cap 2, so truncated IS doubles every
    token's loss at step 1 and masking drops every token; with a faithful sampler nothing changes."""
    from posttrain.rollout.backend import TransformersBackend

    common = {"train.batch_size": 8, "train.max_steps": 1, "peft.method": "lora"}
    run_grpo(tiny_model_dir, tmp_path / "plain", **common)
    run_grpo(tiny_model_dir, tmp_path / "faithful", **common, **{"rl.sampler_correction": "token_truncate"})
    plain, faithful = metrics(tmp_path / "plain")[0], metrics(tmp_path / "faithful")[0]
    # generate's float32 logits put rho within ~2e-7 of 1 (the mismatch metric), so the loss moves by about that
    assert faithful["loss"] == pytest.approx(plain["loss"],
                                             abs=1e-6) and faithful["policy/sampler_corrected_fraction"] == 0

    original = TransformersBackend._completion
    monkeypatch.setattr(TransformersBackend, "_completion", lambda self, tokens, logps, settings: original(
        self, tokens, [x - 1.0 for x in logps], settings))
    run_grpo(tiny_model_dir, tmp_path / "truncated", **common, **{"rl.sampler_correction": "token_truncate"})
    run_grpo(tiny_model_dir, tmp_path / "masked", **common, **{"rl.sampler_correction": "sequence_mask"})
    truncated, masked = metrics(tmp_path / "truncated")[0], metrics(tmp_path / "masked")[0]
    assert truncated["loss"] == pytest.approx(2 * plain["loss"], abs=1e-12)
    assert truncated["policy/sampler_corrected_fraction"] == 1.0
    assert truncated["policy/sampler_mismatch"] == pytest.approx(1.0, abs=1e-6)
    assert truncated["policy/sampler_kl"] == pytest.approx(math.e - 2, abs=1e-6)  # k3 at log r = 1
    assert masked["loss"] == 0.0 and masked["grad_norm"] == 0.0


def half_credit(prompts, completions, **_):
    return [0.5] * len(completions)


def test_evaluation_reports_each_verifier_when_the_sum_is_no_accuracy(tiny_model_dir, tmp_path):
    from conftest import GSM8K

    run_grpo(tiny_model_dir, tmp_path, **{"train.batch_size": 8, "train.max_steps": 1, "data.eval": str(GSM8K),
                                          "data.eval_limit": 4,
                                          "rewards": "[{name: math_answer}, {name: 'test_grpo:half_credit'}]"})
    evaluated = metrics(tmp_path, "eval.jsonl")[-1]
    assert "eval/accuracy" not in evaluated and "eval/test_grpo:half_credit/accuracy" not in evaluated
    assert evaluated["eval/test_grpo:half_credit/reward"] == 0.5
    assert evaluated["eval/reward"] == pytest.approx(evaluated["eval/math_answer/reward"] + 0.5)
    assert evaluated["eval/math_answer/accuracy_ci_high"] > 0.4


def test_prompt_tuned_models_decode_with_their_virtual_tokens(tiny_model_dir):
    """A prompt-tuning adapter's learned embeddings precede every prompt: greedy decoding equals greedy decoding
    recomputed from scratch at every token (virtual embeddings + the tokens so far, no cache). PEFT's own
    ``generate`` was the reference until transformers 5.24, where its cached decoding of prompt-tuned models
    diverges from that recomputation after a few tokens."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.model.load import load_tokenizer
    from posttrain.rollout.backend import SamplingSettings, TransformersBackend

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 1)
    ours = TransformersBackend(model, load_tokenizer(str(tiny_model_dir))).generate(
        PROMPTS[:1], [0], SamplingSettings(max_new_tokens=8, temperature=0.0))[0].token_ids
    ids, recomputed = list(PROMPTS[0]), []
    with torch.no_grad():
        while len(recomputed) < len(ours):
            embeddings = base.get_input_embeddings()(torch.tensor([ids]))
            inputs = torch.cat([model.get_prompt(batch_size=1).to(embeddings.dtype), embeddings], 1)
            recomputed.append(int(base(inputs_embeds=inputs).logits[0, -1].argmax()))
            ids.append(recomputed[-1])
    assert len(ours) == 8 and ours == recomputed
    plain = TransformersBackend(base, load_tokenizer(str(tiny_model_dir)))
    with model.disable_adapter():
        assert plain.generate(PROMPTS[:1], [0],
                              SamplingSettings(max_new_tokens=8, temperature=0.0))[0].token_ids != ours


def test_rows_that_end_early_leave_the_batch_without_changing_any_sample(backend):
    """With an end token that some samples hit after a few tokens, finished rows are dropped mid-decoding (the
    cache is re-indexed): every sample must still be what it is when generated alone."""
    from posttrain.rollout.backend import SamplingSettings

    settings = SamplingSettings(max_new_tokens=10, temperature=1.0)
    prompts, seeds = PROMPTS, [0, 1, 2]  # one of three ending is enough to drop it (a quarter of the batch)
    free = backend.generate(prompts, seeds, settings)
    ender = free[0].token_ids[2]  # a token that ends sample 0 at its third token
    eos = backend.eos_ids
    backend.eos_ids = eos | {ender}
    try:
        together = backend.generate(prompts, seeds, settings)
        alone = [backend.generate([p], [s], settings)[0] for p, s in zip(prompts, seeds)]
    finally:
        backend.eos_ids = eos
    lengths = [len(c.token_ids) for c in together]
    assert min(lengths) <= 3 and max(lengths) == 10 and 4 * sum(n < 10 for n in lengths) >= len(lengths)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for a, b in zip(together, alone):
        assert a.sampler_logps == pytest.approx(b.sampler_logps, abs=1e-12)
    for a, b in zip(free, together):
        assert a.token_ids[: len(b.token_ids)] == b.token_ids


def test_a_groups_prompt_is_prefilled_once_without_changing_its_samples(backend, monkeypatch):
    """GRPO samples a prompt many times: the batch prefills each distinct prompt once and copies its cache, and
    every sample (tokens and sampler log-probs) is what it is when generated alone."""
    from posttrain.rollout.backend import SamplingSettings

    settings = SamplingSettings(max_new_tokens=8, temperature=1.0)
    prompts, seeds = [PROMPTS[0]] * 3 + [PROMPTS[2]] * 2, [0, 1, 2, 3, 4]
    prefilled = []
    forward = backend.model.forward

    def counting(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            prefilled.append(ids.shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(backend.model, "forward", counting)
    together = backend.generate(prompts, seeds, settings)
    assert prefilled == [2]
    alone = [backend.generate([p], [s], settings)[0] for p, s in zip(prompts, seeds)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in together[:3]}) > 1  # different seeds, different samples
    for a, b in zip(together, alone):
        assert a.sampler_logps == pytest.approx(b.sampler_logps, abs=1e-12)
