"""posttrain rm: TRL's loss on transformers' own scores, the saved classifier, accumulation, packing, resume,
multi-objective heads, any sequence-classification model, bad records."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import write_jsonl
from helpers import assert_weights_close, final_weights, metrics, run_command
from test_engine import straight_and_killed


def pairs_file(tmp_path, n=24, margins=False, ratings=False):
    records = []
    for i in range(n):
        a, b = i % 7 + 2, i % 5 + 3
        record = {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                  "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}"}],
                  "rejected": [{"role": "assistant", "content": f"I think it is {a * b + 1}, or maybe not."}]}
        if margins:
            record["margin"] = (i % 3) * 0.5
        if ratings:
            record["chosen_ratings"] = {"correct": 1.0, "concise": 0.8}
            record["rejected_ratings"] = {"correct": 0.0, "concise": 0.2 if i % 2 else None}
        records.append(record)
    return write_jsonl(tmp_path / "pairs.jsonl", records)


def run_rm(model_dir, out, data, **overrides):
    base = {"data.train": str(data), "train.batch_size": 4, "train.max_steps": 3, "peft.method": "lora",
            "data.max_length": 512}
    return run_command("rm", model_dir, out, **{**base, **overrides})


def build_task(model_dir, tmp_path, data, **overrides):
    from posttrain.apps.recipes import load_recipe
    from posttrain.model.load import load_tokenizer
    from posttrain.train.tasks.reward_model import RewardModelTask
    from helpers import tiny_recipe

    base = {"data.train": str(data), "data.max_length": 512}
    recipe = load_recipe("rm", None, tiny_recipe(model_dir, tmp_path / "unused", **{**base, **overrides}))
    task = RewardModelTask(recipe, load_tokenizer(str(model_dir)))
    return task, task.build_dataset("train", quiet=True)


def trl_loss(model, task, examples, center):
    """TRL's RewardTrainer.compute_loss on transformers' own forward (right padding, its last-non-pad pooling)."""
    from trl import RewardTrainer

    from posttrain.data.batching import right_padded

    trainer = object.__new__(RewardTrainer)
    trainer.model = model
    trainer.args = SimpleNamespace(center_rewards_coefficient=center)
    trainer.accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer._metrics = {"eval": {k: [] for k in ("min_reward", "mean_reward", "max_reward", "accuracy", "margin")}}
    trainer._total_train_tokens = 0
    rows = [e.sequences[0].input_ids.tolist() for e in examples] + [e.sequences[1].input_ids.tolist() for e in examples]
    input_ids, mask, _ = right_padded(rows, task.tokenizer.pad_token_id)
    inputs = {"input_ids": input_ids, "attention_mask": mask,
              "margin": torch.tensor([e.margin for e in examples], dtype=torch.float64)}
    with torch.no_grad():
        return float(trainer.compute_loss(model.eval(), inputs)), trainer._metrics["eval"]


def test_long_sequences_lose_their_beginning_not_the_token_the_reward_is_read_at(tiny_model_dir, tmp_path):
    task, examples = build_task(tiny_model_dir, tmp_path, pairs_file(tmp_path, n=2), **{"data.max_length": 12})
    assert task.recipe.data.truncation == "left"
    _, full = build_task(tiny_model_dir, tmp_path, pairs_file(tmp_path, n=2))
    for cut, whole in zip(examples, full):
        assert cut.sequences[0].truncated and len(cut.sequences[0].input_ids) == 12
        assert cut.sequences[0].input_ids.tolist() == whole.sequences[0].input_ids[-12:].tolist()


def test_loss_and_scores_equal_trl_reward_trainer_on_transformers_forward(tiny_model_dir, tmp_path):
    task, examples = build_task(tiny_model_dir, tmp_path, pairs_file(tmp_path, n=8, margins=True),
                                **{"rm.center_rewards_coefficient": 0.01})
    model = task.load_model(str(tiny_model_dir)).double()
    torch.nn.init.normal_(model.score.weight, std=0.5)  # a head with an opinion, so the check is not all ties
    task.setup(model, None, examples, [])
    module = task.module(model)
    loss, metrics_ = task.loss(module, task.collate(examples), normalizer=len(examples))  # packed rows
    expected, trl_metrics = trl_loss(model, task, examples, center=0.01)
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    assert metrics_["accuracy"][0] / metrics_["accuracy"][1] == pytest.approx(trl_metrics["accuracy"][0], abs=1e-12)
    assert metrics_["margin"][0] / metrics_["margin"][1] == pytest.approx(trl_metrics["margin"][0], abs=1e-10)


def test_final_loads_with_automodel_for_sequence_classification(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from posttrain.rewards.model import RewardModel

    data = pairs_file(tmp_path, n=16)
    summary = run_rm(tiny_model_dir, tmp_path / "run", data, **{"data.eval": str(data), "train.lr": 1e-2})
    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()  # merged: a plain classifier
    model = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float64).eval()
    config = json.loads((final / "config.json").read_text())
    assert model.config.num_labels == 1 and config["reward_stats_n"] == 32
    last_eval = summary["eval"][-1]
    assert config["reward_mean"] == pytest.approx(last_eval["eval/reward_mean"], abs=1e-9)
    assert config["reward_std"] == pytest.approx(last_eval["eval/reward_std"], abs=1e-9)

    task, examples = build_task(final, tmp_path, data)
    with torch.no_grad():  # one unpadded sequence at a time: transformers' pooling reads the last token
        scores = [[float(model(input_ids=torch.tensor([s.input_ids])).logits) for s in e.sequences] for e in examples]
    accuracy = sum(c > r for c, r in scores) / len(scores)
    assert accuracy == pytest.approx(last_eval["eval/accuracy"], abs=1e-12)
    flat = [s for pair in scores for s in pair]
    # transformers' RMSNorm rounds a float64 model's activations to float32; the trained model's lean norms do not
    assert sum(flat) / len(flat) == pytest.approx(last_eval["eval/reward_mean"], rel=1e-6)

    reward_model = RewardModel(str(final))  # the reward for RL scores the same conversations alike
    record = json.loads(data.read_text().splitlines()[0])
    got = reward_model([record["prompt"]], [record["chosen"][0]["content"]])
    assert got[0] == pytest.approx(scores[0][0], abs=1e-4)
    normalized = RewardModel(str(final), normalize=True)([record["prompt"]], [record["chosen"][0]["content"]])
    assert normalized[0] == pytest.approx((got[0] - config["reward_mean"]) / config["reward_std"], abs=1e-9)


def test_accumulation_and_packing_do_not_change_the_run(tiny_model_dir, tmp_path):
    data = pairs_file(tmp_path, margins=True)
    run_rm(tiny_model_dir, tmp_path / "a", data, **{"rm.center_rewards_coefficient": 0.05})
    run_rm(tiny_model_dir, tmp_path / "b", data, **{"train.batch_size": 2, "train.grad_accum": 2,
                                                     "train.packing": False, "rm.center_rewards_coefficient": 0.05})
    assert [m["loss"] for m in metrics(tmp_path / "b")] == pytest.approx([m["loss"] for m in metrics(tmp_path / "a")],
                                                                         abs=1e-9)
    assert_weights_close(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"), atol=1e-9)


def test_rm_resumes_exactly_after_sigkill(tiny_model_dir, tmp_path):
    overrides = {"data.train": str(pairs_file(tmp_path)), "train.batch_size": 4, "train.max_steps": 4,
                 "train.save_every": 1, "peft.method": "lora", "data.max_length": 512,
                 "rm.objectives": "[correct, concise]",
                 "rm.weighting": "learned"}
    overrides["data.train"] = str(pairs_file(tmp_path, ratings=True))
    straight, killed = straight_and_killed("rm", tmp_path, tiny_model_dir, overrides, kill_at_step=2)
    assert [m["loss"] for m in metrics(killed)] == pytest.approx([m["loss"] for m in metrics(straight)], abs=1e-9)
    assert_weights_close(final_weights(straight), final_weights(killed), atol=1e-9)
    weights = json.loads((killed / "final" / "config.json").read_text())["reward_weights"]
    assert weights == pytest.approx(json.loads((straight / "final" / "config.json").read_text())["reward_weights"],
                                    abs=1e-9)


def test_multi_objective_heads_regress_ratings_and_learn_a_weighting(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from posttrain.rewards.model import RewardModel

    data = pairs_file(tmp_path, ratings=True)
    singles = write_jsonl(tmp_path / "rated.jsonl",
                          [{"prompt": "Say hi", "completion": "hi", "ratings": {"concise": 1.0}}] * 4)
    overrides = {"data.train": f"[{{path: {data}}}, {{path: {singles}}}]", "data.eval": str(data),
                 "rm.objectives": "[correct, concise]",
                 "rm.weighting": "learned", "train.max_steps": 12, "train.lr": 3e-2}
    summary = run_rm(tiny_model_dir, tmp_path / "run", data, **overrides)
    first, last = summary["eval"][0], summary["eval"][-1]
    assert (
        last["eval/rmse/correct"] < first["eval/rmse/correct"]
        and last["eval/rmse/concise"] < first["eval/rmse/concise"]
    )
    logged = metrics(tmp_path / "run")
    assert logged[-1]["weight/correct"] + logged[-1]["weight/concise"] == pytest.approx(1.0, abs=1e-9)
    assert logged[-1]["weight/correct"] != pytest.approx(0.5, abs=1e-4)  # learned from the pairs

    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["id2label"] == {"0": "correct", "1": "concise"}
    weights = config["reward_weights"]
    assert weights["correct"] + weights["concise"] == pytest.approx(1.0, abs=1e-12)
    assert weights["correct"] == pytest.approx(logged[-1]["weight/correct"], abs=1e-3)  # logged before the last update
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final", dtype=torch.float64).eval()
    record = json.loads(data.read_text().splitlines()[0])
    reward_model = RewardModel(str(tmp_path / "run" / "final"), dtype=torch.float64)
    text = reward_model.tokenizer.apply_chat_template(record["prompt"] + record["chosen"], tokenize=False)
    with torch.no_grad():
        logits = model(**reward_model.tokenizer(text, return_tensors="pt")).logits[0]
    expected = weights["correct"] * float(logits[0]) + weights["concise"] * float(logits[1])
    assert reward_model([record["prompt"]], [record["chosen"][0]["content"]])[0] == pytest.approx(expected, abs=1e-9)


def test_fixed_weighting_and_regression_loss_by_hand(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "rated.jsonl",
                       [{"prompt": "Say hi", "completion": "hi", "ratings": {"a": 2.0, "b": None}},
                                                  {"prompt": "Say yo", "completion": "yo",
                                                   "ratings": {"a": 1.0, "b": -1.0}}])
    task, examples = build_task(tiny_model_dir, tmp_path, data,
                                **{"rm.objectives": "[a, b]", "rm.weights": "{a: 0.25, b: 0.75}",
                                                                    "rm.regression_weight": 0.5})
    model = task.load_model(str(tiny_model_dir)).double()
    task.setup(model, None, examples, [])
    module = task.module(model)
    batch = task.collate(examples)
    scores, reward = module(batch.batch.input_ids, batch.batch.position_ids, batch.batch.attention_mask,
                            batch.last_index)
    assert reward.tolist() == pytest.approx((0.25 * scores[:, 0] + 0.75 * scores[:, 1]).tolist(), abs=1e-12)
    loss, _ = task.loss(module, batch, normalizer=2.0)
    s = scores.tolist()
    expected = 0.5 * ((s[0][0] - 2.0) ** 2 + ((s[1][0] - 1.0) ** 2 + (s[1][1] + 1.0) ** 2) / 2) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-12)


def test_any_sequence_classification_model_trains_unpacked(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    directory = tmp_path / "bert"
    config = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1,
                        pad_token_id=tiny_tokenizer.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    data = pairs_file(tmp_path)
    with pytest.raises(Exception, match="train.packing: false"):
        run_rm(directory, tmp_path / "packed", data, **{"peft.method": "none"})
    summary = run_rm(directory, tmp_path / "run", data, **{"peft.method": "none", "train.packing": False,
                                                             "data.eval": str(data), "train.lr": 1e-3})
    assert math.isfinite(summary["last_loss"])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final").eval()
    from posttrain.rewards.model import RewardModel

    scorer = RewardModel(str(tmp_path / "run" / "final"))
    prompt, answers = [{"role": "user", "content": "What is 2 + 3?"}], ["2 + 3 = 5", "It is 7, or maybe 6."]
    texts = [scorer.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": a}],
                                                  tokenize=False) for a in answers]
    with torch.no_grad():  # BERT pools its first token: the loader uses the model's own forward
        direct = [float(model(**scorer.tokenizer(t, return_tensors="pt",
                                                 add_special_tokens=False)).logits) for t in texts]
    assert scorer([prompt, prompt], answers) == pytest.approx(direct, abs=1e-5)


@pytest.mark.parametrize("record,objectives,message", [
    ({"prompt": "p", "completion": "c"}, "[]", "not a preference pair"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "[]", "'margin': must be a number"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_ratings": {"x": 1}}, "[]", "need rm.objectives"),
    ({"prompt": "p", "completion": "c", "ratings": {"y": 1}}, "[x]", "'ratings.y': not one of rm.objectives"),
    ({"prompt": "p", "completion": "c", "ratings": {"x": "high"}}, "[x]", "'ratings.x': must be a number"),
])
def test_bad_reward_records_name_the_line_and_field(tiny_model_dir, tmp_path, record, objectives, message):
    from posttrain.core.errors import UserError

    data = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(UserError, match=message) as info:
        build_task(tiny_model_dir, tmp_path, data, **{"rm.objectives": objectives})
    assert "bad.jsonl, line 1" in str(info.value)


@pytest.mark.parametrize("overrides,message", [
    ({"rm.weighting": "learned"}, "multi-objective settings"),
    ({"rm.objectives": "[a, b]", "rm.weights": "{a: 1.0}"}, "one weight per objective"),
    ({"rm.objectives": "[a, b]", "rm.weighting": "learned", "rm.weights": "{a: 1.0, b: 1.0}"}, "exclude each other"),
    ({"data.truncation": "right"}, "cut off the end of long answers"),
])
def test_inconsistent_rm_settings_are_refused(tiny_model_dir, tmp_path, overrides, message):
    from posttrain.apps.recipes import load_recipe
    from posttrain.core.errors import UserError
    from helpers import tiny_recipe

    with pytest.raises(UserError, match=message):
        load_recipe("rm", None, tiny_recipe(tiny_model_dir, tmp_path, **overrides))


def test_a_checkpoint_exports_as_the_final_classifier(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from posttrain.apps.cli import main

    overrides = {"data.train": str(pairs_file(tmp_path, ratings=True)), "rm.objectives": "[correct, concise]",
                 "rm.weighting": "learned", "train.save_every": 3}
    run_rm(tiny_model_dir, tmp_path / "run", None, **overrides)
    assert main(["export", str(tmp_path / "run"), "--checkpoint", "step-3", "--out", str(tmp_path / "exported")]) == 0
    final, exported = ({k: v.double() for k, v in load_file(tmp_path / d / "model.safetensors").items()}
                       for d in ("run/final", "exported"))
    assert_weights_close(final, exported, atol=1e-6)  # the run trained in float64; the export is float32
    config = lambda d: json.loads((tmp_path / d / "config.json").read_text())  # noqa: E731
    assert config("exported")["reward_weights"] == pytest.approx(config("run/final")["reward_weights"], abs=1e-6)
