"""Chat templates, loss masks and truncation: records become token ids plus per-token weights.

A token's weight says how much predicting *that* token counts in the loss: 0 for prompt
tokens (and for assistant turns with ``weight: 0``), 1 for ordinary targets, anything else
for weighted tokens or samples. Masks are found by rendering the conversation prefix by
prefix, so they follow whatever chat template the tokenizer (or the recipe) uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from posttrain.core.errors import UserError
from posttrain.data.formats import Message, Segment, SFTExample

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATE_PRESETS = {"chatml": CHATML}


def template_text(template: str | None) -> str | None:
    """A recipe's ``data.chat_template`` as Jinja: a preset's text, or the string itself (None: the tokenizer's)."""
    return TEMPLATE_PRESETS.get(template, template) if template else None


@dataclass
class TokenizedExample:
    input_ids: np.ndarray  # int64 [T]
    weights: np.ndarray  # float32 [T]; weights[0] is always 0 (nothing predicts the first token)
    truncated: bool = False
    index: int = -1  # position in its dataset, where a task needs to look up precomputed values

    @property
    def num_targets(self) -> int:
        return int((self.weights > 0).sum())


def completion_example(prompt: list[int], completion: list[int], weights=1.0, index: int = -1) -> TokenizedExample:
    """``prompt + completion`` trained on the completion only (``weights``: one value, or one per completion token)."""
    example_weights = np.zeros(len(prompt) + len(completion), np.float32)
    example_weights[len(prompt):] = weights
    return TokenizedExample(np.array(prompt + completion, dtype=np.int64), example_weights, index=index)


class ChatFormatter:
    """Renders conversations with one chat template and finds the character spans of assistant turns."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = template_text(template)
        if self.template is None and not getattr(tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat template: set data.chat_template (e.g. 'chatml' or a Jinja "
                            "string)")

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        plain = [{"role": m.role, "content": m.content} for m in messages]
        return self.tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.template
        )

    def char_weights(self, messages: list[Message], assistant_only: bool) -> tuple[str, np.ndarray]:
        """The rendered text and a weight per character (assistant content and its end-of-turn marker)."""
        text = self.render(messages)
        weights = np.zeros(len(text), np.float32) if assistant_only else np.ones(len(text), np.float32)
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (text.startswith(through) and through.startswith(prefix)):
                raise UserError(
                    "the chat template does not render conversations prefix by prefix, so assistant turns cannot be "
                    "located; set data.chat_template to a template that does (e.g. 'chatml')"
                )
            start, end = len(prefix), len(through.rstrip())
            weights[start:end] = message.weight
            if through[start:].startswith(message.content):
                _paint_segments(weights, start, message.segments, message.weight)
            elif len({s.weight for s in message.segments}) > 1:
                raise UserError("the chat template rewrites assistant content, so per-segment weights cannot be placed")
        return text, weights


def _paint_segments(weights: np.ndarray, start: int, segments: list[Segment], scale: float) -> None:
    for segment in segments:
        weights[start : start + len(segment.text)] = scale * segment.weight
        start += len(segment.text)


def tokenize_sft(
    example: SFTExample,
    tokenizer,
    formatter: ChatFormatter | None,
    max_length: int,
    truncation: str = "right",
    assistant_only: bool = True,
) -> TokenizedExample | None:
    """Token ids and per-token weights for one example; ``None`` when it must be dropped."""
    if example.messages is not None:
        if formatter is None:
            raise UserError("conversational data needs a chat template")
        text, char_w = formatter.char_weights(example.messages, assistant_only)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], np.int64)
        weights = _token_weights(encoded["offset_mapping"], char_w)
    else:
        ids, weights = _tokenize_plain(example, tokenizer, assistant_only)
    weights[0] = 0.0
    weights *= example.weight
    truncated = len(ids) > max_length
    if truncated:
        if truncation == "drop":
            return None
        window = slice(None, max_length) if truncation == "right" else slice(len(ids) - max_length, None)
        ids, weights = ids[window], weights[window].copy()
        weights[0] = 0.0
    if not (weights > 0).any():
        return None
    return TokenizedExample(ids, weights, truncated)


def _token_weights(offsets, char_weights: np.ndarray) -> np.ndarray:
    starts = np.asarray([start for start, end in offsets], np.int64)
    empty = np.asarray([end <= start for start, end in offsets])
    weights = char_weights[np.minimum(starts, len(char_weights) - 1)].copy()
    weights[empty] = 0.0
    return weights


def _tokenize_plain(example: SFTExample, tokenizer, assistant_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Raw-text prompt + completion (no chat template), with EOS appended as in TRL."""
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"] if example.prompt else []
    if not example.prompt and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        prompt_ids = [tokenizer.bos_token_id]
    completion_text = "".join(s.text for s in example.completion)
    char_w = np.zeros(len(completion_text), np.float32)
    _paint_segments(char_w, 0, example.completion, 1.0)
    encoded = tokenizer(completion_text, add_special_tokens=False, return_offsets_mapping=True)
    completion_w = _token_weights(encoded["offset_mapping"], char_w) if completion_text else np.zeros(0, np.float32)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eos_w = [example.completion[-1].weight] if eos else []
    ids = np.asarray(list(prompt_ids) + list(encoded["input_ids"]) + eos, np.int64)
    prompt_w = np.zeros(len(prompt_ids), np.float32) if assistant_only else np.ones(len(prompt_ids), np.float32)
    weights = np.concatenate([prompt_w, completion_w, np.asarray(eos_w, np.float32)])
    return ids, weights


class ExampleTokenizer:
    """Tokenizes parsed examples with the recipe's data settings; the chat formatter is built on first need,
    so plain-text data works with tokenizers that have no chat template. Holds only the settings it reads (they
    key the tokenized-data cache, see :mod:`posttrain.data.store`)."""

    def __init__(self, tokenizer, data_cfg, assistant_only: bool = True):
        self.tokenizer, self.assistant_only = tokenizer, assistant_only
        self.max_length, self.truncation, self.chat_template = (
            data_cfg.max_length,
            data_cfg.truncation,
            data_cfg.chat_template,
        )
        self._formatter: ChatFormatter | None = None

    def __call__(self, example: SFTExample) -> TokenizedExample | None:
        if example.messages is not None and self._formatter is None:
            self._formatter = ChatFormatter(self.tokenizer, self.chat_template)
        return tokenize_sft(example, self.tokenizer, self._formatter, self.max_length, self.truncation,
                            self.assistant_only)
