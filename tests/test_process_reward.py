"""posttrain prm: TRL's row layout, the token head read at separators, accumulation, the saved classifier, errors."""

import random

import pytest
import torch

from conftest import write_jsonl
from helpers import assert_weights_close, final_weights, metrics, run_command


def steps_file(tmp_path, n=24, seed=0):
    """Sums of three numbers, solved in two steps; about half the solutions have a wrong step."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        first_ok, second_ok = rng.random() < 0.7, rng.random() < 0.7
        ab = a + b if first_ok else a + b + rng.randint(1, 3)
        abc = ab + c if second_ok else ab + c + rng.randint(1, 3)
        records.append({"prompt": f"Compute {a} + {b} + {c}.",
                        "completions": [f"{a} + {b} = {ab}", f"{ab} + {c} = {abc}"],
                        "labels": [first_ok, second_ok and first_ok]})
    return write_jsonl(tmp_path / "steps.jsonl", records)


def run_prm(model_dir, out, data, **overrides):
    base = {"data.train": str(data), "train.batch_size": 4, "train.max_steps": 3, "peft.method": "lora"}
    return run_command("prm", model_dir, out, **{**base, **overrides})


def test_rows_follow_trl_prm_layout(tiny_tokenizer):
    from posttrain.data.formats import StepsExample
    from posttrain.data.encoders import tokenize_steps

    tok = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    example = StepsExample("Which is larger, 9.8 or 9.11?", ["11 is greater than 8.", "Hence, 9.11 > 9.8."],
                           [True, False])
    ids, positions, labels = tokenize_steps(example, tiny_tokenizer, "\n")
    prompt, first, second, sep = tok(example.prompt), tok(example.steps[0]), tok(example.steps[1]), tok("\n")
    assert ids == [tiny_tokenizer.bos_token_id] + prompt + first + sep + second + sep
    assert positions == [len(prompt) + len(first) + len(sep), len(ids) - 1] and labels == [1, 0]
    ids, positions, labels = tokenize_steps(example, tiny_tokenizer, "\n", max_prompt_length=3, last_step_only=True)
    assert ids[:3] == ([tiny_tokenizer.bos_token_id] + prompt)[-3:] and positions == [len(ids) - 1] and labels == [0]


def test_head_reads_separators_like_transformers_token_classifier(tiny_model_dir, tmp_path):
    from transformers import AutoModelForTokenClassification

    from posttrain.data.formats import StepsExample
    from posttrain.data.encoders import tokenize_steps

    data = steps_file(tmp_path)
    summary = run_prm(tiny_model_dir, tmp_path / "run", data, **{"data.eval": str(data), "train.lr": 1e-2})
    last = summary["eval"][-1]
    assert {"eval/accuracy", "eval/f1", "eval/f1_error", "eval/f1_correct"} <= set(last)
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "run" / "final", dtype=torch.float64).eval()
    assert model.config.id2label == {0: "error", 1: "correct"} and model.config.step_separator == "\n"
    from posttrain.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(tmp_path / "run" / "final"))
    right = total = 0
    import json

    for line in data.read_text().splitlines():
        record = json.loads(line)
        ids, positions, labels = tokenize_steps(StepsExample(record["prompt"], record["completions"], record["labels"]),
                                                tokenizer, "\n")
        with torch.no_grad():
            predicted = model(input_ids=torch.tensor([ids])).logits[0, positions].argmax(-1)
        right += int((predicted == torch.tensor(labels)).sum())
        total += len(labels)
    assert right / total == pytest.approx(last["eval/accuracy"], abs=1e-12)


def test_loss_is_a_mean_over_the_steps_labels_whatever_the_accumulation(tiny_model_dir, tmp_path):
    data = steps_file(tmp_path)
    run_prm(tiny_model_dir, tmp_path / "a", data)
    run_prm(tiny_model_dir, tmp_path / "b", data,
            **{"train.batch_size": 1, "train.grad_accum": 4, "train.packing": False})
    assert [m["loss"] for m in metrics(tmp_path / "b")] == pytest.approx([m["loss"] for m in metrics(tmp_path / "a")],
                                                                         abs=1e-9)
    assert_weights_close(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"), atol=1e-9)


def test_last_step_only_labels_training_rows_but_not_held_out_ones(tiny_model_dir, tmp_path):
    from posttrain.apps.recipes import load_recipe
    from posttrain.model.load import load_tokenizer
    from posttrain.train.tasks.process_reward import ProcessRewardTask
    from helpers import tiny_recipe

    data = steps_file(tmp_path, n=6)
    recipe = load_recipe("prm", None, tiny_recipe(tiny_model_dir, tmp_path / "x", **{
        "data.train": str(data), "data.eval": str(data), "prm.train_on_last_step_only": True}))
    task = ProcessRewardTask(recipe, load_tokenizer(str(tiny_model_dir)))
    assert [len(e.labels) for e in task.build_dataset("train", quiet=True)] == [1] * 6
    assert [len(e.labels) for e in task.build_dataset("eval", quiet=True)] == [2] * 6


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True]}, "'labels': must be a list of 2 booleans"),
    ({"prompt": "p", "completions": ["a"], "labels": [1]}, "'labels\\[0\\]': must be true"),
    ({"prompt": "p", "completions": [], "labels": []}, "'completions': must be a non-empty list"),
    ({"prompt": "p", "completions": ["a", 3], "labels": [True, True]}, "'completions\\[1\\]': must be a string"),
])
def test_bad_step_records_name_the_line_and_field(tiny_model_dir, tmp_path, record, message):
    from posttrain.core.errors import UserError

    data = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(UserError, match=message) as info:
        run_prm(tiny_model_dir, tmp_path / "run", data)
    assert "bad.jsonl, line 1" in str(info.value)


def test_settings_a_prm_does_not_read_are_refused(tiny_model_dir, tmp_path):
    from posttrain.core.errors import UserError

    with pytest.raises(UserError, match="data.truncation"):
        run_prm(tiny_model_dir, tmp_path / "run", steps_file(tmp_path), **{"data.truncation": "left"})
    with pytest.raises(UserError, match="chat_template"):
        run_prm(tiny_model_dir, tmp_path / "run", steps_file(tmp_path), **{"data.chat_template": "chatml"})
