"""A recipe's data.chat_template is the run's template everywhere a prompt is rendered for generation: rollouts,
recipe evals during training, and (saved with final/) generate, chat and eval on the run afterwards."""

import json

import pytest

from conftest import GSM8K
from helpers import reset_accelerate, run_command

# not the tiny tokenizer's own ChatML, and renders conversations prefix by prefix
TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant:{% endif %}")
GSM8K_TEST = GSM8K.parent / "gsm8k_test_200.jsonl"


@pytest.fixture
def rendered(monkeypatch, tiny_tokenizer):
    """The decoded prompts every generation backend call receives."""
    from posttrain.rollout.backend import TransformersBackend

    seen, generate = [], TransformersBackend.generate

    def spy(self, prompts, seeds, settings):
        seen.extend(tiny_tokenizer.decode(p) for p in prompts)
        return generate(self, prompts, seeds, settings)

    monkeypatch.setattr(TransformersBackend, "generate", spy)
    return seen


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


def test_rollouts_recipe_evals_and_the_saved_model_use_the_recipes_template(tiny_model_dir, tmp_path, rendered):
    from posttrain.evaluate.model import EvalModel
    from posttrain.model.load import load_tokenizer, resolve_model
    from posttrain.rollout.backend import SamplingSettings
    from posttrain.rollout.generate import render_prompt

    question = json.loads(GSM8K_TEST.read_text().splitlines()[0])["question"]
    run_command("grpo", tiny_model_dir, tmp_path, **{
        "data.limit": 4, "data.chat_template": json.dumps(TEMPLATE), "rollout.num_generations": 4,
        "rollout.max_new_tokens": 4, "train.batch_size": 8, "train.max_steps": 1, "train.eval_every": 1,
        "rewards": "[{name: length}]", "rl.reward_workers": 0,
        "evals": f"[{{task: length, data: {GSM8K_TEST}, limit: 2, max_new_tokens: 4}}]"})
    assert rendered and not any("<|im_start|>" in text for text in rendered)
    assert all(text.startswith("### user: ") and text.endswith("### assistant:") for text in rendered)
    assert f"### user: {question}\n### assistant:" in rendered  # the recipe eval's prompt, not only the rollouts'

    # final/ carries the template: generate / chat (load_tokenizer of the run) and eval (EvalModel) render with it
    reset_accelerate()
    tokenizer = load_tokenizer(resolve_model(str(tmp_path)))
    assert tokenizer.chat_template == TEMPLATE
    assert render_prompt(tokenizer, "hi") == "### user: hi\n### assistant:"
    rendered.clear()
    EvalModel(str(tmp_path)).generate(["hi"], SamplingSettings(max_new_tokens=2, temperature=0.0), progress=False)
    assert rendered == ["### user: hi\n### assistant:"]


def test_a_preset_name_is_saved_as_its_template(tiny_model_dir, tmp_path):
    from posttrain.data.tokenize import CHATML
    from posttrain.model.load import load_tokenizer

    run_command("sft", tiny_model_dir, tmp_path, **{"data.limit": 8, "data.chat_template": "chatml",
                                                    "train.max_steps": 1})
    assert load_tokenizer(str(tmp_path / "final")).chat_template == CHATML
