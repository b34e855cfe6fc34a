"""Multi-turn rollouts with the Python tool: the call syntax, the sandboxed tool, the generate loop (tool output
enters the context, carries no sampler log-prob and no loss), the prompt's instructions."""

import shutil

import pytest
import torch

from posttrain.core.sandbox import Limits
from posttrain.rollout.backend import Completion, GenerationStats, SamplingSettings
from posttrain.rollout.tools import CLOSE, INSTRUCTIONS, ToolUse, run_tool, tool_call


def test_a_turn_calls_the_tool_only_when_it_ends_with_a_call():
    assert tool_call("Let me compute. <python>print(2 ** 10)</python>") == "print(2 ** 10)"
    assert tool_call("<python>x = 3\nprint(x)</python>\n") == "x = 3\nprint(x)"
    assert tool_call("<python>print(1)</python> and then more text") is None
    assert tool_call("no call at all") is None


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_the_tool_runs_in_the_sandbox():
    limits = Limits(wall_seconds=5, cpu_seconds=5, memory_mb=256)
    assert run_tool("print(48213 * 7719)", limits) == ("372156147", True)
    answer, ok = run_tool("1 / 0", limits)
    assert not ok and answer == "ZeroDivisionError: division by zero"
    answer, ok = run_tool("import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)", limits)
    assert not ok and "Error" in answer  # no network
    answer, ok = run_tool("while True: pass", Limits(wall_seconds=1, cpu_seconds=1, memory_mb=256))
    assert not ok


class ScriptedBackend:
    """Returns scripted turns (text -> token ids by the tokenizer), recording what it was asked."""

    def __init__(self, tokenizer, turns):
        self.tokenizer, self.turns, self.asked = tokenizer, list(turns), []
        self.stats = GenerationStats()

    def sync(self, model):
        pass

    def generate(self, prompts, seeds, settings):
        self.asked.append((prompts, seeds, settings))
        out = []
        for _ in prompts:
            text = self.turns.pop(0)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: settings.max_new_tokens]
            cut = len(ids) == settings.max_new_tokens and not text.endswith(CLOSE)
            out.append(Completion(ids, [-0.5] * len(ids), cut, self.tokenizer.decode(ids)))
        return out


def test_tool_output_enters_the_context_without_logprobs_or_loss(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, ["I will compute. <python>print(6 * 7)</python>", " The answer is 42."])
    tools = ToolUse(backend, tiny_tokenizer, max_calls=2, limits=Limits(wall_seconds=5, cpu_seconds=5, memory_mb=256))
    [done] = tools.generate([[1, 2, 3]], [7], SamplingSettings(max_new_tokens=200, stop=("e",)))
    first, second = (tiny_tokenizer(t, add_special_tokens=False)["input_ids"]
                     for t in ("I will compute. <python>print(6 * 7)</python>", " The answer is 42."))
    output = tiny_tokenizer("\n<output>\n42\n</output>\n", add_special_tokens=False)["input_ids"]
    assert done.token_ids == first + output + second
    assert done.mask == [1] * len(first) + [0] * len(output) + [1] * len(second)
    assert len(done.sampler_logps) == done.model_tokens == len(first) + len(second)
    assert done.tool_calls == 1 and not done.truncated and "<output>\n42\n</output>" in done.text
    (_, _, turn1), (prompts2, seeds2, turn2) = backend.asked[0], backend.asked[1]
    assert CLOSE in turn1.stop and "e" in turn1.stop  # the user's stop strings stay
    assert prompts2 == [[1, 2, 3] + first + output] and seeds2 != [7]  # the second turn sees the output; fresh noise
    assert turn2.max_new_tokens == 200 - len(first) - len(output)  # one budget for the whole trajectory


def test_calls_beyond_the_limit_end_the_trajectory(tiny_tokenizer):
    call = "<python>print(1)</python>"
    backend = ScriptedBackend(tiny_tokenizer, [call, call])
    tools = ToolUse(backend, tiny_tokenizer, max_calls=1)
    [done] = tools.generate([[1]], [0], SamplingSettings(max_new_tokens=200))
    assert done.tool_calls == 1 and len(backend.asked) == 2 and done.mask[-1] == 1


def test_the_budget_cuts_tool_output_and_marks_truncation(tiny_tokenizer):
    call = "<python>print('x' * 300)</python>"
    length = len(tiny_tokenizer(call, add_special_tokens=False)["input_ids"])
    tools = ToolUse(ScriptedBackend(tiny_tokenizer, [call]), tiny_tokenizer)
    [done] = tools.generate([[1]], [0], SamplingSettings(max_new_tokens=length + 5))
    assert len(done.token_ids) == length + 5 and done.truncated and done.mask[length:] == [0] * 5


def test_micro_batches_train_on_the_models_tokens_only(tiny_model_dir, tmp_path, tiny_tokenizer):
    """Rollouts with tool output in the middle: the batch's targets are exactly the model's tokens, and each
    lines up with its entry of the per-token tensors (which hold the model's tokens only)."""
    from posttrain.apps.recipes import load_recipe
    from posttrain.train.tasks.grpo import GRPOTask, Rollouts

    from helpers import tiny_recipe

    recipe = load_recipe("grpo", None, tiny_recipe(tiny_model_dir, tmp_path, **{"rollout.num_generations": 2,
                                                                               "train.batch_size": 2}))
    task = GRPOTask(recipe, tiny_tokenizer)
    completions, masks = [[10, 11, 12, 13, 14], [20, 21, 22]], [[1, 0, 0, 1, 1], [1, 1, 1]]
    model_tokens = [t for c, m in zip(completions, masks) for t, keep in zip(c, m) if keep]
    advantages = torch.arange(len(model_tokens), dtype=torch.float64)
    rollouts = Rollouts([[1, 2], [1, 2, 3]], completions, torch.ones(2, dtype=torch.bool), advantages,
                        torch.zeros(len(model_tokens), dtype=torch.float64), masks=masks)
    rl = task.micro_batch(rollouts, [1, 0])
    assert sorted(rl.batch.target_ids.tolist()) == sorted(model_tokens)
    by_token = dict(zip(model_tokens, advantages.tolist()))
    assert rl.advantages.tolist() == [by_token[t] for t in rl.batch.target_ids.tolist()]
    assert rl.units == len(model_tokens)  # token_mean counts the model's tokens only
    again = Rollouts.from_tensors(rollouts.tensors())
    assert again.masks == masks and again.completion_ids == completions


def test_prompts_carry_the_tool_instructions(tiny_model_dir, tmp_path, tiny_tokenizer):
    from posttrain.apps.recipes import load_recipe
    from posttrain.train.tasks.grpo import GRPOTask

    from helpers import tiny_recipe

    recipe = load_recipe("grpo", None, tiny_recipe(tiny_model_dir, tmp_path, **{"rollout.tool": "python"}))
    example = GRPOTask(recipe, tiny_tokenizer).build_dataset("train", quiet=True)[0]
    text = tiny_tokenizer.decode(example.prompt_ids)
    assert text.startswith("<|im_start|>system\n" + INSTRUCTIONS.split("\n")[0])
    assert example.conversation[0]["role"] == "system" and example.conversation[-1]["role"] == "user"


def test_grpo_with_the_tool_runs_and_logs_tool_metrics(tiny_model_dir, tmp_path):
    from helpers import metrics, run_command

    run_command("grpo", tiny_model_dir, tmp_path, **{"rollout.tool": "python", "rollout.num_generations": 4,
                                                     "rollout.max_new_tokens": 12, "rollout.stop": '["e", "a"]',
                                                     "rewards": "[{name: length, options: {per: 10}}]",
                                                     "rl.reward_workers": 0, "train.max_steps": 1})
    first = metrics(tmp_path)[0]
    assert (
        first["tools/call_rate"] == 0.0 and first["tools/calls_per_completion"] == 0.0
    )  # a random model calls nothing


def test_pool_commands_refuse_the_tool(tiny_model_dir, tmp_path):
    from helpers import run_command
    from posttrain.core.errors import UserError

    with pytest.raises(UserError, match="grpo or ppo"):
        run_command("rft", tiny_model_dir, tmp_path, **{"rollout.tool": "python", "train.max_steps": "null"})


def test_few_shot_turns_come_after_the_system_message(tiny_model_dir, tmp_path, tiny_tokenizer):
    from posttrain.apps.recipes import load_recipe
    from posttrain.core.errors import UserError
    from posttrain.train.tasks.grpo import GRPOTask

    from helpers import tiny_recipe

    shots = '[{role: user, content: "Compute 1 + 1."}, {role: assistant, content: "<python>print(1 + 1)</python>"}]'
    recipe = load_recipe("grpo", None, tiny_recipe(tiny_model_dir, tmp_path, **{"rollout.tool": "python",
                                                                               "rollout.few_shot": shots}))
    example = GRPOTask(recipe, tiny_tokenizer).build_dataset("train", quiet=True)[0]
    assert [m["role"] for m in example.conversation] == ["system", "user", "assistant", "user"]
    assert example.conversation[1]["content"] == "Compute 1 + 1." and example.prompt != "Compute 1 + 1."
    with pytest.raises(UserError, match="few_shot"):
        load_recipe("grpo", None,
                    tiny_recipe(tiny_model_dir, tmp_path, **{"rollout.few_shot": '[{role: system, content: x}]'}))
