"""Reward models: a sequence-classification model's score of a whole conversation, used as a reward.

The reward model reads the conversation in its own chat template (it need not share the policy's
tokenizer), and its score head is applied at the last non-pad token, computed from the attention
mask (never from a pad id that may equal the end-of-turn token). A directory whose score head is
missing is refused: transformers would silently start a random head, and training on random rewards
is the kind of wrong run that looks fine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.core.errors import UserError
from posttrain.data.batching import right_padded
from posttrain.data.encoders import tokenize_steps
from posttrain.data.formats import StepsExample
from posttrain.model.forward import HeadOutputs
from posttrain.model.load import load_tokenizer, not_loadable, refuse_pickle, resolve_model

SCORE_HEADS = ("score", "classifier")  # what transformers' *ForSequenceClassification call their head


def load_reward_model(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) of a reward model directory or hub id; refuses a model without a trained score head."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model(spec)
    refuse_pickle(path, spec)
    tokenizer = load_tokenizer(path, trust_remote_code)
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(path, dtype=dtype,
                                                                       num_labels=1).merge_and_unload()
        missing = []
    else:
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True)
        except OSError as exc:
            raise not_loadable(spec, exc) from None
        missing = [k for k in info["missing_keys"] if k.split(".")[0] in SCORE_HEADS]
    if missing:
        raise UserError(f"{spec} is not a reward model: it has no trained score head ({missing[0]} missing); "
                        "train one with posttrain rm, or give a sequence-classification model")
    if model.config.num_labels != 1 and not getattr(model.config, "reward_weights", None):
        raise UserError(f"{spec}: a reward model gives one score per sequence; this one has {model.config.num_labels} "
                        "labels and no reward_weights in its config.json to combine them (posttrain rm writes them)")
    return model.eval(), tokenizer


def reward_weights(config) -> torch.Tensor | None:
    """A multi-objective reward model's weights over its outputs (``config.reward_weights`` by label), or None."""
    weights = getattr(config, "reward_weights", None)
    if config.num_labels == 1 or not weights:
        return None
    labels = [config.id2label[k] for k in range(config.num_labels)]
    missing = [label for label in labels if label not in weights]
    if missing:
        raise UserError(f"reward model: config.json reward_weights has no weight for {', '.join(missing)}")
    return torch.tensor([float(weights[label]) for label in labels], dtype=torch.float64)


def render(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> str:
    """The text a reward model scores: the conversation with the completion as the assistant's turn (or turns, given
    as messages), in the reward model's chat template; a raw-text prompt is simply continued."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion
    turns = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    messages = [*([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt), *turns]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


class RewardModel:
    """Scores completions in batches on ``device``; ``max_length`` tokens at most (cut on the left, so the end of
    the answer, where a decoder's score is read, is always seen)."""

    def __init__(self, spec: str, device="cpu", batch_size: int = 16, max_length: int = 2048,
                 trust_remote_code: bool = False,
                 dtype: torch.dtype = torch.float32, normalize: bool = False):
        self.model, self.tokenizer = load_reward_model(spec, dtype, trust_remote_code=trust_remote_code)
        self.model.to(device)
        self.read = HeadOutputs(self.model)  # the same reading as in training: last token, or the model's own pooling
        self.weights = reward_weights(self.model.config)
        self.shift, self.scale = 0.0, 1.0
        if normalize:  # (r - mean) / std with the statistics posttrain rm saved
            config = self.model.config
            if not getattr(config, "reward_std", None):
                raise UserError(f"{spec}: normalize needs reward_mean and reward_std in config.json (posttrain rm "
                                f"saves them)")
            self.shift, self.scale = config.reward_mean, config.reward_std
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        texts = [render(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for lo in range(0, len(texts), self.batch_size):
            scores += self.score_texts(texts[lo : lo + self.batch_size])
        return scores

    def score_texts(self, texts: list[str]) -> list[float]:
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][-self.max_length:] for t in texts]
        input_ids, mask, ends = right_padded(ids, self.tokenizer.pad_token_id)
        width = input_ids.shape[1]
        positions = torch.arange(width).expand_as(input_ids)
        last = torch.arange(len(ids)) * width + ends  # flat positions: where a decoder classifier's head reads
        scores = self.read(*(t.to(self.device) for t in (input_ids, positions, mask, last))).double().cpu()
        rewards = scores @ self.weights if self.weights is not None else scores.squeeze(-1)
        return ((rewards - self.shift) / self.scale).tolist()


AGGREGATES = {"min": min, "last": lambda scores: scores[-1], "mean": lambda scores: sum(scores) / len(scores),
              "prod": lambda scores: float(torch.tensor(scores, dtype=torch.float64).prod())}


def plain_text(prompt: str | list[dict]) -> str:
    """A process reward model reads raw text: a conversation's turns, one per line."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


class ProcessRewardModel:
    """Scores the steps of solutions with a process reward model (a 2-class token classifier, ``posttrain prm``):
    a step's score is P(correct) at its separator; a completion is split into steps at the separator and scored
    by ``aggregate`` (min, last, mean or prod) of its steps."""

    def __init__(self, spec: str, device="cpu", batch_size: int = 16, aggregate: str = "min",
                 trust_remote_code: bool = False,
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForTokenClassification

        if aggregate not in AGGREGATES:
            raise UserError(f"aggregate: one of {', '.join(AGGREGATES)}, not {aggregate!r}")
        path = resolve_model(spec)
        try:
            self.model, info = AutoModelForTokenClassification.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True)
        except OSError as exc:
            raise not_loadable(spec, exc) from None
        missing = [k for k in info["missing_keys"] if k.split(".")[0] in SCORE_HEADS]
        if missing or self.model.config.num_labels != 2:
            raise UserError(f"{spec} is not a process reward model (a 2-class token classifier with a trained head); "
                            "train one with posttrain prm")
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.separator = getattr(self.model.config, "step_separator", "\n")
        self.model.to(device).eval()
        self.device, self.batch_size, self.aggregate = device, batch_size, AGGREGATES[aggregate]

    @torch.no_grad()
    def step_scores(self, prompts: list, solutions: list[list[str]]) -> list[list[float]]:
        out: list[list[float]] = []
        for lo in range(0, len(prompts), self.batch_size):
            rows = [tokenize_steps(StepsExample(plain_text(p), steps, [True] * len(steps)), self.tokenizer,
                                   self.separator)
                    for p, steps in zip(prompts[lo : lo + self.batch_size], solutions[lo : lo + self.batch_size])]
            input_ids, mask, _ = right_padded([ids for ids, _, _ in rows], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            correct = logits.double().softmax(-1)[..., 1].cpu()
            out += [correct[r, positions].tolist() for r, (_, positions, _) in enumerate(rows)]
        return out

    def split(self, completion: str) -> list[str]:
        steps = [step for step in completion.split(self.separator) if step.strip()]
        return steps or [completion]

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        return [self.aggregate(scores) for scores in self.step_scores(prompts, [self.split(c) for c in completions])]


def load_scorer(spec: str, device="cpu", trust_remote_code: bool = False, **options):
    """A reward model or a process reward model, told apart by the architecture its config names; ``options`` go to
    its class (batch_size, dtype; max_length and normalize for a reward model, aggregate for a PRM)."""
    import json

    config = Path(resolve_model(spec)) / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") or [] if config.exists() else []
    if any(a.endswith("ForTokenClassification") for a in architectures):
        kind = ProcessRewardModel
    else:
        kind = RewardModel
    try:
        return kind(spec, device, trust_remote_code=trust_remote_code, **options)
    except TypeError as exc:
        raise UserError(f"{spec}: {kind.__name__} options: {exc}") from None
