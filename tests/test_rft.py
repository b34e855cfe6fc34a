"""Rejection-sampling fine-tuning through the engine on the tiny model: what is kept is what the rewards accept
(deduplicated, capped, top-k), the loss is the token-mean NLL of the kept completions whatever the accumulation,
STaR's hint is used for sampling only, a kill mid-round resumes on the same kept set."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import assert_weights_close, final_weights, metrics, run_command
from posttrain.core.errors import UserError

RFT = {"rollout.num_generations": 4, "rollout.max_new_tokens": 12, "rollout.stop": '["e", "a"]',
       "rewards": "[{name: 'test_rft:even_length'}]", "rft.reward_workers": 0, "rft.rounds": 2,
       "rft.steps_per_round": 2,
       "rft.prompts_per_round": 16, "train.batch_size": 4, "train.max_steps": "null"}


def even_length(prompts, completions, **_):
    """1 for completions with an even number of characters: a verifier whose verdict the test can recompute."""
    return [float(len(c) % 2 == 0) for c in completions]


def run_rft(model_dir, out, **overrides):
    return run_command("rft", model_dir, out, **{**RFT, **overrides})


def kept_set(checkpoint: Path, tokenizer) -> list[tuple[str, str]]:
    state = load_file(checkpoint / "task.safetensors")
    import torch

    prompts = torch.split(state["prompt_tokens"], state["prompt_lengths"].tolist())
    completions = torch.split(state["completion_tokens"], state["completion_lengths"].tolist())
    return [(tokenizer.decode(p), tokenizer.decode(c, skip_special_tokens=True)) for p, c in zip(prompts, completions)]


def test_kept_completions_are_the_accepted_ones(tiny_model_dir, tiny_tokenizer, tmp_path):
    run_rft(tiny_model_dir, tmp_path, **{"train.save_every": 1, "train.save_total_limit": 10})
    logged = metrics(tmp_path)
    kept = kept_set(tmp_path / "checkpoints" / "step-1", tiny_tokenizer)
    assert kept and all(len(completion) % 2 == 0 for _, completion in kept)
    assert len(kept) == logged[0]["rft/pool_size"] == len({pair for pair in kept})  # distinct
    assert 0 < logged[0]["rft/acceptance_rate"] < 1
    assert logged[0]["rft/pool_size"] + logged[0]["rft/duplicates_dropped"] == pytest.approx(
        logged[0]["rft/acceptance_rate"] * 64
    )
    assert logged[0]["rft/round"] == logged[1]["rft/round"] == 1 and logged[2]["rft/round"] == 2
    assert kept_set(tmp_path / "checkpoints" / "step-3", tiny_tokenizer) != kept  # round 2 sampled anew


def test_top_k_and_cap_per_prompt(tiny_model_dir, tiny_tokenizer, tmp_path):
    run_rft(tiny_model_dir, tmp_path / "top",
            **{"rewards": "[{name: length, options: {per: 10}}]", "rft.accept": "top_k",
                                                  "rft.top_k": 1, "train.save_every": 1, "rft.rounds": 1})
    assert metrics(tmp_path / "top")[0]["rft/pool_size"] == 16  # exactly one per prompt
    run_rft(tiny_model_dir, tmp_path / "cap",
            **{"rewards": "[{name: length, options: {per: 10}}]", "rft.threshold": 0.0,
                                                  "rft.max_per_prompt": 2, "rft.rounds": 1})
    logged = metrics(tmp_path / "cap")[0]
    assert logged["rft/acceptance_rate"] == 1.0 and logged["rft/pool_size"] <= 32


def test_accumulation_does_not_change_loss_or_updates(tiny_model_dir, tmp_path):
    runs = []
    for batch_size, accum in [(8, 1), (2, 4)]:
        out = tmp_path / f"{batch_size}x{accum}"
        run_rft(tiny_model_dir, out, **{"train.batch_size": batch_size, "train.grad_accum": accum})
        runs.append((metrics(out), final_weights(out)))
    (a_metrics, a_weights), (b_metrics, b_weights) = runs
    assert a_metrics[0]["loss"] > 1.0 and a_metrics[0]["grad_norm"] > 0
    for a, b in zip(a_metrics, b_metrics):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-9) and a["rft/pool_size"] == b["rft/pool_size"]
    assert_weights_close(a_weights, b_weights, atol=1e-9)


def test_hint_is_for_sampling_only(tiny_model_dir, tiny_tokenizer, tmp_path):
    from posttrain.apps.recipes import load_recipe
    from posttrain.train.tasks.rft import RFTTask

    from helpers import tiny_recipe

    run_rft(tiny_model_dir, tmp_path, **{"rft.hint": "(The answer is {answer}.)", "rollout.num_generations": 1,
                                         "train.save_every": 1, "rft.rounds": 1})
    first = metrics(tmp_path)[0]
    assert first["rft/hint_solved_fraction"] > 0
    assert first["rft/solved_fraction"] > first["rft/acceptance_rate"]  # the hint solved prompts sampling alone did not
    assert not any("The answer is" in prompt for prompt, _ in kept_set(tmp_path / "checkpoints" / "step-1",
                                                                       tiny_tokenizer))
    recipe = load_recipe("rft", None,
                         tiny_recipe(tiny_model_dir, tmp_path / "x", **{"rft.hint": "(The answer is {answer}.)",
                                                                              "train.max_steps": "null"}))
    task = RFTTask(recipe, tiny_tokenizer)
    example = task.build_dataset("train", quiet=True)[0]
    text = tiny_tokenizer.decode(task.hinted(example))
    assert text.endswith(f"(The answer is {example.columns['answer']}.)<|im_end|>\n<|im_start|>assistant\n")


def test_sigkill_mid_round_then_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    from test_engine import straight_and_killed

    common = {**RFT, "rft.steps_per_round": 3, "train.save_every": 1, "peft.method": "lora", "peft.dropout": 0.1,
              "rewards": "[{name: length, options: {per: 10}}]",
              "rft.threshold": 0.5}  # (a subprocess cannot import tests)
    straight, killed = straight_and_killed("rft", tmp_path, tiny_model_dir, common,
                                           kill_at_step=3)  # step 2 saved, mid-round
    assert_weights_close(final_weights(straight), final_weights(killed), atol=1e-6)
    assert [m["loss"] for m in metrics(straight)] == pytest.approx([m["loss"] for m in metrics(killed)], abs=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"train.max_steps": 7}, "rft.rounds x rft.steps_per_round"),
    ({"rft.hint": "'answer: {nope}'"}, "names a field"),
    ({"rft.prompts_per_round": 100}, "needs 100"),
])
def test_recipe_errors(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run_rft(tiny_model_dir, tmp_path, **{"data.limit": 64, **overrides})


def test_loss_is_the_token_mean_nll_of_the_steps_kept_completions(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Recomputed by hand: the kept set from the checkpoint, the step's entries from the seeded order, the
    untrained model's NLL per completion token (prompt tokens carry no loss), averaged over the step's tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.apps.recipes import load_recipe
    from posttrain.train.tasks.rft import RFTTask

    from helpers import tiny_recipe

    run_rft(tiny_model_dir, tmp_path, **{"train.save_every": 1, "train.save_total_limit": 10})
    recipe = load_recipe("rft", None, tiny_recipe(tiny_model_dir, tmp_path / "x", **{**RFT}))
    task = RFTTask(recipe, tiny_tokenizer)
    task.load_state_dict(load_file(tmp_path / "checkpoints" / "step-1" / "task.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    total, count = 0.0, 0
    for i in task.pool_indices(0, 4):
        prompt, completion = task.pool[i]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        total -= float(logps[len(prompt) - 1 :].sum())
        count += len(completion)
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(total / count, abs=1e-9)
