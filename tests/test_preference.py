"""The preference task: masks, sequence sums, reference modes, accumulation, caching, errors."""

import json

import pytest

from conftest import build_model, write_jsonl
from helpers import assert_weights_close, final_weights, metrics, tiny_recipe
from test_data import targets_text


def pairs_file(tmp_path, n=24):
    records = []
    for i in range(n):
        a, b = i % 7 + 2, i % 5 + 3
        records.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                        "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}"}],
                        "rejected": [{"role": "assistant", "content": f"I think it is {a * b + 1}, or maybe not."}]})
    return write_jsonl(tmp_path / "pairs.jsonl", records)


def run_dpo(model_dir, out, data, **overrides):
    from accelerate.state import AcceleratorState, PartialState

    from posttrain.apps.recipes import load_recipe
    from posttrain.train.run import run

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    base = {"data.train": str(data), "train.batch_size": 4, "train.max_steps": 3, "peft.method": "lora",
            "train.lr": 1e-2}
    recipe = load_recipe("dpo", None, tiny_recipe(model_dir, out, **{**base, **overrides}))
    return run("dpo", recipe)


def test_only_the_final_completion_is_trained_in_multi_turn_prompts(tiny_tokenizer):
    from posttrain.data.adapters import hh_rlhf
    from posttrain.data.formats import parse_preference
    from posttrain.data.tokenize import ChatFormatter, tokenize_sft

    record = hh_rlhf({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: sure",
                      "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: no"})
    pair = parse_preference("x", "line 1", record)
    formatter = ChatFormatter(tiny_tokenizer)
    chosen = tokenize_sft(pair.chosen, tiny_tokenizer, formatter, 512)
    rejected = tokenize_sft(pair.rejected, tiny_tokenizer, formatter, 512)
    assert targets_text(tiny_tokenizer, chosen) == ["sure<|im_end|>"]
    assert targets_text(tiny_tokenizer, rejected) == ["no<|im_end|>"]


def test_packed_sequence_sums_equal_one_sequence_at_a_time(tiny_model_dir, tmp_path):
    from posttrain.apps.recipes import load_recipe
    from posttrain.model.load import load_tokenizer
    from posttrain.model.forward import TargetLogprobs
    from posttrain.model.forward import sequence_stats
    from posttrain.train.tasks.preference import PreferenceTask

    recipe = load_recipe("dpo", None,
                         tiny_recipe(tiny_model_dir, tmp_path, **{"data.train": str(pairs_file(tmp_path))}))
    task = PreferenceTask(recipe, load_tokenizer(str(tiny_model_dir)))
    pairs = task.build_dataset("train", quiet=True)[:5]
    module = TargetLogprobs(build_model(len(task.tokenizer)).double())
    packed = sequence_stats(module, task.collate(pairs))
    for i, pair in enumerate(pairs):
        for side, offset in ((pair.chosen, 0), (pair.rejected, 5)):
            alone = task.collate([type(pair)(side, side, 0, "train")]).batch
            logps = module(alone.input_ids, alone.position_ids, alone.attention_mask, alone.target_index,
                           alone.target_ids)
            assert packed["logps"][i + offset].item() == pytest.approx(logps[: len(logps) // 2].sum().item(), abs=1e-8)
            assert packed["lengths"][i + offset].item() == side.num_targets


def test_reference_modes_agree_for_lora(tiny_model_dir, tmp_path):
    data = pairs_file(tmp_path)
    losses = {}
    for mode in ("adapter_disabled", "policy_copy", "precomputed"):
        run_dpo(tiny_model_dir, tmp_path / mode, data, reference=mode)
        losses[mode] = [m["loss"] for m in metrics(tmp_path / mode)]
    assert losses["adapter_disabled"] == pytest.approx(losses["policy_copy"], abs=1e-6)
    assert losses["adapter_disabled"] == pytest.approx(losses["precomputed"], abs=1e-6)
    assert (tmp_path / "precomputed" / "reference_logps.train.safetensors").exists()
    assert metrics(tmp_path / "precomputed")[0]["loss"] == pytest.approx(0.6931,
                                                                         abs=1e-4)  # policy == reference at step 0


def test_precomputed_cache_is_reused_when_the_data_is_unchanged(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.train.tasks import preference

    data = pairs_file(tmp_path)
    run_dpo(tiny_model_dir, tmp_path / "run", data, reference="precomputed", **{"train.save_every": 3})
    calls = []
    original = preference.sequence_stats
    monkeypatch.setattr(preference, "sequence_stats", lambda *a: calls.append(1) or original(*a))
    run_dpo(tiny_model_dir, tmp_path / "run", data, reference="precomputed",
            **{"train.save_every": 3, "train.max_steps": 4})
    # one resumed step: only the policy forward runs, the reference comes from the cache
    assert len(calls) == 1


def test_precomputed_cache_is_invalidated_when_the_weights_change(tiny_model_dir, tmp_path, monkeypatch):
    """Retraining a model directory in place (same name, new weights) must not reuse stale reference log-probs."""
    import shutil

    from posttrain.train.tasks import preference

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    data = pairs_file(tmp_path)
    run_dpo(model_dir, tmp_path / "run", data, reference="precomputed", **{"train.save_every": 3})
    cache = tmp_path / "run" / "reference_logps.train.safetensors"
    before = cache.read_bytes()
    build_model(len(json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]),
                seed=1).save_pretrained(model_dir)
    calls = []
    original = preference.sequence_stats
    monkeypatch.setattr(preference, "sequence_stats", lambda *a: calls.append(1) or original(*a))
    run_dpo(model_dir, tmp_path / "run", data, reference="precomputed", **{"train.save_every": 3, "train.max_steps": 4})
    assert len(calls) > 1 and cache.read_bytes() != before  # recomputed over the whole dataset


def test_weights_fingerprint_sees_one_changed_value_and_the_dtype():
    import torch

    from posttrain.train.reference import weights_fingerprint

    model = build_model(64)
    first = weights_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    second = weights_fingerprint(model)
    assert len({first, second, weights_fingerprint(model.double())}) == 3


def test_dpo_accumulation_is_a_mean_over_pairs(tiny_model_dir, tmp_path, monkeypatch):
    """4 x 1 = 1 x 4 = 2 x 2, and = 4 x 1 cut by a token budget."""
    from posttrain.train.tasks.preference import PreferenceTask

    collated = []
    collate_train = PreferenceTask.collate_train
    monkeypatch.setattr(PreferenceTask, "collate_train", lambda self, pairs, step: collated.append(len(pairs))
                        or collate_train(self, pairs, step))
    data = pairs_file(tmp_path)
    for batch_size, accum, budget in [(4, 1, None), (1, 4, None), (2, 2, None), (4, 1, 200)]:
        run_dpo(tiny_model_dir, tmp_path / (f"{batch_size}x{accum}" + ("-budget" if budget else "")), data,
                **{"train.batch_size": batch_size, "train.grad_accum": accum, "reference": "adapter_disabled",
                   "train.max_tokens_per_micro_batch": budget or "null"})
    assert collated[-6:] == [2, 2] * 3  # the budget run: 3 steps of 4 pairs in two micro-batches each
    reference = metrics(tmp_path / "4x1")
    for name in ("1x4", "2x2", "4x1-budget"):
        for a, b in zip(reference, metrics(tmp_path / name)):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
            assert a["rewards/margin"] == pytest.approx(b["rewards/margin"], abs=1e-6)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
        assert_weights_close(final_weights(tmp_path / "4x1"), final_weights(tmp_path / name), atol=1e-5)


def test_step_metrics_and_eval_accuracy(tiny_model_dir, tmp_path):
    data = pairs_file(tmp_path)
    run_dpo(tiny_model_dir, tmp_path, data, **{"data.eval": str(data), "data.eval_limit": 8, "train.max_steps": 6,
                                               "train.lr": 5e-2})
    logged = metrics(tmp_path)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
                "logps/rejected", "length/chosen", "length/rejected"):
        assert key in logged[0]
    evals = metrics(tmp_path, "eval.jsonl")
    assert evals[0]["eval/accuracy"] == 0.5  # policy == reference: every margin is a tie
    assert evals[-1]["eval/accuracy"] > 0.5 and evals[-1]["eval/margin"] > 0


@pytest.mark.parametrize("overrides,message", [
    ({"reference": "none"}, "needs a reference"),
    ({"peft.method": "none", "reference": "adapter_disabled"}, "needs a PEFT adapter"),
    ({"loss.name": "simpo", "reference": "policy_copy"}, "does not use a reference"),
    ({"loss.gamma": 1.0}, "gamma not used by dpo"),
    ({"loss.name": "dpo2"}, "unknown pairwise loss"),
])
def test_inconsistent_settings_are_refused(tiny_model_dir, tmp_path, overrides, message):
    from posttrain.core.errors import UserError

    with pytest.raises(UserError, match=message):
        run_dpo(tiny_model_dir, tmp_path, pairs_file(tmp_path), **overrides)


def test_reference_free_losses_train_without_a_reference(tiny_model_dir, tmp_path):
    run_dpo(tiny_model_dir, tmp_path, pairs_file(tmp_path), **{"loss.name": "orpo", "train.max_steps": 4})
    losses = [m["loss"] for m in metrics(tmp_path)]
    assert losses[-1] < losses[0]


def test_dpo_can_start_from_an_sft_adapter_run(tiny_model_dir, tmp_path):
    from helpers import run_sft

    run_sft(tiny_model_dir, tmp_path / "sft", **{"peft.method": "lora", "train.max_steps": 2})
    run_dpo(tmp_path / "sft", tmp_path / "dpo", pairs_file(tmp_path))  # a run directory means its final/
    assert (tmp_path / "dpo" / "final" / "adapter_config.json").exists()


@pytest.mark.parametrize("reference", ["adapter_disabled", "precomputed"])
def test_wpo_weights_pairs_by_policy_likelihood(tiny_model_dir, tmp_path, reference):
    data = pairs_file(tmp_path)
    run_dpo(tiny_model_dir, tmp_path / "plain", data, reference=reference)
    run_dpo(tiny_model_dir, tmp_path / "wpo", data, reference=reference, **{"loss.wpo": True})
    plain, weighted = metrics(tmp_path / "plain")[0], metrics(tmp_path / "wpo")[0]
    assert 0 < weighted["wpo/weight"] < 1
    assert weighted["loss"] < plain["loss"]  # every pair is scaled down by a weight below 1


def test_tpo_trains_on_gold_answers(tiny_model_dir, tmp_path):
    from posttrain.core.errors import DataError

    records = [json.loads(line) for line in pairs_file(tmp_path).read_text().splitlines()]
    for record in records:
        record["gold"] = record["chosen"]
    data = write_jsonl(tmp_path / "gold.jsonl", records)
    run_dpo(tiny_model_dir, tmp_path / "tpo", data, **{"loss.name": "tpo", "train.max_steps": 4})
    losses = [m["loss"] for m in metrics(tmp_path / "tpo")]
    assert losses[-1] < losses[0]
    with pytest.raises(DataError, match="gold"):
        run_dpo(tiny_model_dir, tmp_path / "missing", pairs_file(tmp_path), **{"loss.name": "tpo"})


@pytest.mark.parametrize("name", ["dft", "dft2"])
def test_dft_tracks_a_log_partition_per_prompt_across_resume(tiny_model_dir, tmp_path, name):
    data = pairs_file(tmp_path)
    common = {"loss.name": name, "train.scheduler": "constant", "train.save_every": 2}
    run_dpo(tiny_model_dir, tmp_path / "straight", data, **{**common, "train.max_steps": 4})
    run_dpo(tiny_model_dir, tmp_path / "resumed", data, **{**common, "train.max_steps": 2})
    run_dpo(tiny_model_dir, tmp_path / "resumed", data, **{**common, "train.max_steps": 4})
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], abs=1e-6)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-4" / "state.json").read_text())
    assert len(state["task"]["dft_log_partition"]) == 16  # 4 steps x 4 pairs, each prompt once in the first epoch


def test_dft_settings_without_dft_are_refused(tiny_model_dir, tmp_path):
    from posttrain.core.errors import UserError

    with pytest.raises(UserError, match="dft_gamma not used"):
        run_dpo(tiny_model_dir, tmp_path, pairs_file(tmp_path), **{"loss.dft_gamma": 0.5})


@pytest.mark.parametrize("command", ["dpo", "kto", "rank"])
def test_eva_initializes_from_preferred_completions(tiny_model_dir, tmp_path, command):
    from test_ranking import ranked_file
    from test_unpaired import run_kto, unpaired_file

    overrides = {"peft.method": "eva", "peft.r": 4, "train.max_steps": 2}
    if command == "dpo":
        run_dpo(tiny_model_dir, tmp_path, pairs_file(tmp_path), **overrides)
    elif command == "kto":
        run_kto(tiny_model_dir, tmp_path, unpaired_file(tmp_path), **overrides)
    else:
        run_dpo_like("rank", tiny_model_dir, tmp_path, ranked_file(tmp_path), **overrides)
    assert len(metrics(tmp_path)) == 2


def run_dpo_like(command, model_dir, out, data, **overrides):
    from accelerate.state import AcceleratorState, PartialState

    from posttrain.apps.recipes import load_recipe
    from posttrain.train.run import run

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    base = {"data.train": str(data), "train.batch_size": 4, "peft.method": "lora", "train.lr": 1e-2}
    return run(command, load_recipe(command, None, tiny_recipe(model_dir, out, **{**base, **overrides})))


@pytest.mark.parametrize("overrides,message", [
    ({"loss.name": "[dpo,sft]", "loss.weights": "[1.0]"}, "loss.weights has 1 entries for 2 losses"),
    ({"loss.name": "robust", "loss.label_smoothing": 0.6}, "robust DPO needs 0 <= label_smoothing < 0.5"),
])
def test_loss_settings_checked_before_training(tiny_model_dir, tmp_path, overrides, message):
    from posttrain.core.errors import UserError

    with pytest.raises(UserError, match=message):
        run_dpo(tiny_model_dir, tmp_path, pairs_file(tmp_path), **overrides)
