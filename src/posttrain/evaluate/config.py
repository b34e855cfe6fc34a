"""Settings of the evaluation tasks, shared by ``posttrain eval`` flags and a recipe's ``evals:``."""

from __future__ import annotations

from pydantic import Field

from posttrain.core.config import Section


class EvalOptions(Section):
    """Settings shared by the tasks (each reads the ones it needs); the CLI flags and a recipe's ``evals``."""

    limit: int | None = Field(200, gt=0, description="evaluate the first N records (None: all)")
    max_length: int = Field(1024, gt=1, description="perplexity / preference_accuracy: tokens per example")
    max_new_tokens: int = Field(256, gt=0, description="generation length limit")
    samples: int = Field(1, gt=0, description="generations per prompt for length / diversity / refusal_rate "
                         "(1: greedy; more: sampled at temperature)")
    k: list[int] = Field(default_factory=list, description="answer_accuracy: pass@k and maj@k for these k (sampled)")
    temperature: float = Field(0.8, gt=0, description="temperature of sampled generations")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of sampled generations")
    seed: int = Field(0, description="seed of sampled generations (a sample is a function of prompt, seed, index)")
    reference: str | None = Field(None, description="preference_accuracy: a reference model for the implicit "
                                  "reward (default: the mean log-prob margin)")
    judge: str | None = Field(None, description="win_rate: a reward model / run or a reward function name")
    llm_judge: str | None = Field(None, description="win_rate: a causal LM asked which reply is better, both orders")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm_eval: lm-evaluation-harness task names")
    batch_size: int = Field(64, gt=0,
                            description="generation batch size (decoding one token for many rows costs little more "
                                        "than for few on a CPU)")
