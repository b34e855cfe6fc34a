"""The ``rollout:`` section: how completions are sampled (and tools called) for the commands that learn from samples."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, model_validator

from posttrain.core.config import Section


class RolloutConfig(Section):
    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (one group)")
    max_new_tokens: int = Field(256, gt=0, description="token budget of a completion (longer ones are cut: truncated)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the trainer's log-probs use it too)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    top_k: int | None = Field(None, gt=0, description="sample among the k most likely tokens")
    stop: list[str] = Field(default_factory=list, description="stop strings: a completion ends after the first one")
    batch_size: int = Field(64, gt=0, description="sequences per generate call")
    engine: Literal["transformers", "vllm"] = Field("transformers", validation_alias=AliasChoices("engine", "backend"),
                                                    description="transformers: HF generate on the trained model; "
                                                                "vllm: a "
                                                    "vLLM server (own environment, see README), weights pushed after "
                                                    "updates")
    vllm_url: str = Field("http://127.0.0.1:8011", description="engine vllm: the server's address")
    chat: bool = Field(True, description="render prompts with the chat template (false: raw text prompts)")
    tool: Literal["none", "python"] = Field("none", description="python: the model may run code between turns "
                                            "(<python>...</python>, output shown as <output>...</output>, no loss on "
                                            "it)")
    max_tool_calls: int = Field(2, ge=1, description="tool calls per completion at most")
    tool_timeout: float = Field(5.0, gt=0, description="seconds per tool call (the sandbox kills it after)")
    tool_unsandboxed: bool = Field(False,
                                   description="run tool code with resource limits only where the sandbox cannot "
                                   "isolate it (no network / filesystem isolation: opt in knowingly)")
    tool_instructions: str | None = Field(None,
                                          description="how the tool is explained to the model, as a system message "
                                          "(default: posttrain.rollout.tools.INSTRUCTIONS)")
    few_shot: list[dict[str, str]] = Field(default_factory=list, description="conversation turns ({role, content}) put "
                                           "before every prompt: worked examples (chat prompts only)")

    @model_validator(mode="after")
    def _few_shot_turns(self) -> "RolloutConfig":
        for turn in self.few_shot:
            if set(turn) != {"role", "content"} or turn["role"] not in ("user", "assistant"):
                raise ValueError(f"rollout.few_shot: each turn is {{role: user | assistant, content: ...}}, got {turn}")
        if self.few_shot and not self.chat:
            raise ValueError("rollout.few_shot needs rollout.chat: true (turns of a conversation)")
        if self.tool == "none":
            self.unused(("max_tool_calls", "tool_timeout", "tool_unsandboxed", "tool_instructions"),
                        "tool settings, read only with rollout.tool: python")
        if self.engine != "vllm":
            self.unused(("vllm_url",), "read only with rollout.engine: vllm")
        return self
