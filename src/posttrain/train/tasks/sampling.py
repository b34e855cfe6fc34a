"""What every command that learns from the model's own samples shares: prompts as data, a generation backend
on the trained model, reward functions and reward models, and held-out evaluation of greedy completions.

GRPO / PPO (``grpo.py``, ``ppo.py``) and rejection-sampling fine-tuning (``rft.py``) build on it; their recipe
section (``cfg``) carries ``reward_workers`` and ``reward_timeout``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from posttrain.core.errors import UserError
from posttrain.core.sandbox import Limits, SandboxUnavailable, require_isolation
from posttrain.data.formats import Message, RecordChecker, Segment
from posttrain.data.store import Encoded, Encoder, load_examples
from posttrain.data.tokenize import ChatFormatter, TokenizedExample
from posttrain.evaluate.stats import wilson_interval
from posttrain.rewards.model import load_scorer
from posttrain.rewards.runner import RewardRunner
from posttrain.rollout.backend import SamplingSettings, TransformersBackend
from posttrain.rollout.tools import INSTRUCTIONS, ToolUse
from posttrain.rollout.vllm_client import VLLMBackend
from posttrain.train.task import OfflineTask, sum_over_processes


@dataclass
class PromptExample:
    index: int
    prompt_ids: list[int]
    prompt: str  # what reward functions see
    columns: dict  # the record's other fields, passed to reward functions by name
    truncated: bool = False
    conversation: str | list[dict] = ""  # what reward models see: chat messages, or the raw prompt text


class PromptEncoder(Encoder):
    """A prompt record -> the rendered prompt's token ids (kept from the left up to ``max_length``), with what reward
    functions and reward models read: the prompt text, the record's other fields, the conversation."""

    def __init__(self, tokenizer, chat_template: str | None, chat: bool, tool: str, tool_instructions: str | None,
                 few_shot: list[dict], max_length: int):
        self.tokenizer, self.chat_template, self.chat = tokenizer, chat_template, chat
        self.tool, self.tool_instructions, self.few_shot, self.max_length = (
            tool,
            tool_instructions,
            few_shot,
            max_length,
        )
        self._formatter = None

    @property
    def formatter(self) -> ChatFormatter | None:
        if self.chat and self._formatter is None:
            self._formatter = ChatFormatter(self.tokenizer, self.chat_template)
        return self._formatter

    def encode(self, path: str, where: str, record: dict) -> tuple[list[Encoded], int]:
        check = RecordChecker(path, where, record)
        prompt = self.with_context(check.text_or_messages("prompt", "user"))
        if isinstance(prompt, str):
            text = self.formatter.render([user_message(prompt)],
                                         add_generation_prompt=True) if self.formatter else prompt
            shown, conversation = prompt, ([{"role": "user", "content": prompt}] if self.formatter else prompt)
        else:
            if self.formatter is None:
                raise check.fail("prompt", "a conversation needs rollout.chat: true (a chat template)")
            text = self.formatter.render(prompt, add_generation_prompt=True)
            shown = prompt[-1].content
            conversation = [{"role": m.role, "content": m.content} for m in prompt]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        cut = len(ids) > self.max_length
        ids = ids[-self.max_length :]
        tokens = TokenizedExample(np.asarray(ids, np.int64), np.zeros(len(ids), np.float32), cut)
        columns = {k: v for k, v in record.items() if k != "prompt"}
        return [Encoded([tokens], {"prompt": shown, "columns": columns, "conversation": conversation})], 0

    def with_context(self, prompt):
        """The prompt with what the recipe puts before it: the tool's instructions (a system message, or the first
        paragraph of a raw-text prompt) and few-shot turns (after any system message)."""
        if self.tool == "none" and not self.few_shot:
            return prompt
        instructions = (self.tool_instructions or INSTRUCTIONS) if self.tool != "none" else None
        if isinstance(prompt, str) and self.formatter is None:
            return instructions + "\n\n" + prompt
        messages = [user_message(prompt)] if isinstance(prompt, str) else list(prompt)
        system = [messages.pop(0)] if messages[0].role == "system" else []
        if instructions is not None:
            text = instructions + ("\n\n" + system[0].content if system else "")
            system = [Message("system", [Segment(text)])]
        shots = [Message(turn["role"], [Segment(turn["content"])]) for turn in self.few_shot]
        return [*system, *shots, *messages]


def prompt_example(sequences: list[TokenizedExample], extra: dict, index: int) -> PromptExample:
    tokens = sequences[0]
    return PromptExample(index, tokens.input_ids.tolist(), extra["prompt"], extra["columns"], tokens.truncated,
                         extra["conversation"])


class SamplingTask(OfflineTask):
    """Prompts as examples, a backend that samples from the trained model, rewards that score completions;
    subclasses decide what is learned from the samples."""

    generates = True

    def __init__(self, recipe, tokenizer, cfg):
        self.recipe, self.tokenizer, self.cfg = recipe, tokenizer, cfg
        rollout = recipe.rollout
        self.settings = SamplingSettings(rollout.max_new_tokens, rollout.temperature, rollout.top_p, rollout.top_k,
                                         tuple(rollout.stop))
        self.formatter = ChatFormatter(tokenizer, recipe.data.chat_template) if rollout.chat else None
        self.runner = None

    # -- data ---------------------------------------------------------------------------------
    def build_dataset(self, which: str, quiet: bool = False):
        rollout = self.recipe.rollout
        encoder = PromptEncoder(self.tokenizer, self.recipe.data.chat_template if rollout.chat else None, rollout.chat,
                                rollout.tool, rollout.tool_instructions, list(rollout.few_shot),
                                self.recipe.data.max_length)
        examples = load_examples(self.recipe.data, self.recipe.train.seed, which, encoder, prompt_example, quiet)
        self.track_sources(which, examples)
        if examples and not quiet:
            print(f"data.{which}: {len(examples)} prompts; {examples.summary['truncated']:.0f} truncated on the left "
                  f"to "
                  f"data.max_length={self.recipe.data.max_length}", flush=True)
        return examples

    def adapter_init_examples(self, examples: list[PromptExample]):
        """EVA initializes from the rendered prompts: the tokens the policy reads before it samples."""
        return (TokenizedExample(np.asarray(e.prompt_ids, np.int64), np.zeros(len(e.prompt_ids), np.float32))
                for e in examples)

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, model, accelerator, train: list, evaluation: list) -> None:
        super().setup(model, accelerator, train, evaluation)
        self.model = model
        self.backend = self.generation_backend(model)
        models = [(r.label, r.weight, load_scorer(r.model, self.device, self.recipe.trust_remote_code, **r.options))
                  for r in self.recipe.rewards if r.model is not None]
        self.runner = RewardRunner([(r.name, r.weight, r.options) for r in self.recipe.rewards if r.model is None],
                                   self.cfg.reward_workers, self.cfg.reward_timeout, models)

    def generation_backend(self, model):
        rollout = self.recipe.rollout
        if rollout.engine == "vllm":
            from pathlib import Path

            if self.processes()[0] > 1:
                raise UserError("rollout.engine: vllm serves one training process; use transformers with several")
            backend = VLLMBackend(model, self.tokenizer, rollout.vllm_url, Path(self.recipe.output_dir))
        else:
            backend = TransformersBackend(model, self.tokenizer, rollout.batch_size)
        if rollout.tool == "none":
            return backend
        if not rollout.tool_unsandboxed:
            try:
                require_isolation("rollout.tool: python", "rollout.tool_unsandboxed: true")
            except SandboxUnavailable as exc:
                raise UserError(str(exc)) from None
        limits = Limits(wall_seconds=rollout.tool_timeout, cpu_seconds=max(1, int(rollout.tool_timeout)), memory_mb=512)
        return ToolUse(backend, self.tokenizer, rollout.max_tool_calls, limits, rollout.tool_unsandboxed)

    def after_step(self, model) -> None:
        self.backend.sync(model)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()

    def score(self, prompts: list[PromptExample], completions: list, groups: list[int]):
        """The reward functions on ``completions`` of ``prompts``, with the records' other fields by name."""
        columns = {key: [ex.columns.get(key) for ex in prompts] for key in {k for ex in prompts for k in ex.columns}}
        return self.runner.score([ex.prompt for ex in prompts], [c.text for c in completions], columns, groups,
                                 [ex.conversation for ex in prompts])

    def gathered(self, mine: dict) -> list[dict]:
        """Every process's ``mine``, in rank order (a group is never split, but batch statistics are global)."""
        if self.processes()[0] == 1:
            return [mine]
        from accelerate.utils import gather_object

        return gather_object([mine])

    @staticmethod
    def unwrapped(module):
        return getattr(module, "module", module)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, module, examples: list) -> dict[str, float]:
        """Greedy completions of the held-out prompts, scored by the reward functions: the mean summed reward
        (``eval/reward``) and each function's (``eval/<name>/reward``); where every score is 0 or 1 (a verifier),
        also the accuracy with its 95% Wilson interval (``eval/accuracy``, ``eval/<name>/accuracy``)."""
        world, rank = self.processes()
        mine = examples[rank::world]
        greedy = SamplingSettings(self.settings.max_new_tokens, 0.0, stop=self.settings.stop)
        completions = self.backend.generate([e.prompt_ids for e in mine], [0] * len(mine), greedy) if mine else []
        scores = self.score(mine, completions, list(range(len(mine))))
        # the summed reward, and each reward function on its own (a failed score counts 0)
        parts = {"": scores.total,
                 **{f"{name}/": [v or 0.0 for v in values] for name, values in scores.by_reward.items()}}
        local = {"n": float(len(mine)), "length": float(sum(len(c.token_ids) for c in completions)),
                 "tool_users": float(sum(c.tool_calls > 0 for c in completions))}
        for prefix, values in parts.items():
            local[f"{prefix}reward"] = float(sum(values))
            local[f"{prefix}non_binary"] = float(not all(v in (0.0, 1.0) for v in values))
        sums = sum_over_processes(local, self.accelerator)
        n = max(sums["n"], 1.0)
        out = {"eval/completion_length": sums["length"] / n, "eval/n": sums["n"]}
        if self.recipe.rollout.tool != "none":
            out["eval/tool_call_rate"] = sums["tool_users"] / n
        for prefix in parts:
            out[f"eval/{prefix}reward"] = sums[f"{prefix}reward"] / n
            if not sums[f"{prefix}non_binary"]:  # a verifier: an accuracy, with its interval
                low, high = wilson_interval(int(sums[f"{prefix}reward"]), int(sums["n"]))
                out.update({f"eval/{prefix}accuracy": sums[f"{prefix}reward"] / n, f"eval/{prefix}accuracy_ci_low": low,
                            f"eval/{prefix}accuracy_ci_high": high})
        return out

    def say(self, message: str) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"posttrain: {message}")


@contextmanager
def eval_mode(module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def user_message(text: str):
    return Message("user", [Segment(text)])


def mean_or_zero(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
