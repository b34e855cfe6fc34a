"""Record kinds and their validation.

Records arrive as plain dicts; these functions check them and turn them into small typed
objects, raising :class:`DataError` naming the file, the line and the field on any problem.

Text that is trained on can carry weights: a message may have ``"weight": 0.5`` (0 means "do
not train on this turn", as in OpenAI's fine-tuning format), a record may have ``"weight"``
(per-sample), and an assistant ``content`` or a ``completion`` may be a list of segments
``[{"text": "...", "weight": 2.0}, ...]`` for per-token weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from posttrain.core.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Segment:
    text: str
    weight: float = 1.0


@dataclass
class Message:
    role: str
    segments: list[Segment]
    weight: float = 1.0

    @property
    def content(self) -> str:
        return "".join(s.text for s in self.segments)


@dataclass
class SFTExample:
    """Either a conversation (``messages``) or a plain-text ``prompt`` + ``completion``."""

    messages: list[Message] | None = None
    prompt: str | None = None
    completion: list[Segment] = field(default_factory=list)
    weight: float = 1.0


class RecordChecker:
    """Validates the fields of one record; every error names file, location and field."""

    def __init__(self, path: str, where: str, record: dict):
        self.path, self.where, self.record = path, where, record

    def fail(self, field_name: str | None, message: str) -> DataError:
        return DataError(self.path, self.where, field_name, message)

    def require(self, name: str):
        if name not in self.record:
            present = ", ".join(sorted(self.record)) or "none"
            raise self.fail(name, f"missing (fields present: {present})")
        if self.record[name] is None:
            raise self.fail(name, "is null")
        return self.record[name]

    def weight(self, value, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise self.fail(name, f"must be a non-negative number, got {value!r}")
        return float(value)

    def text(self, value, name: str) -> str:
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {type(value).__name__}")
        return value

    def segments(self, value, name: str) -> list[Segment]:
        """A string, or a list of ``{"text", "weight"}`` segments."""
        if isinstance(value, str):
            return [Segment(value)]
        if not isinstance(value, list) or not value:
            raise self.fail(name,
                            f"must be a string or a non-empty list of {{text, weight}} segments, got {value!r:.60}")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict) or "text" not in item:
                raise self.fail(f"{name}[{i}]", "a segment must be an object with 'text' (and optional 'weight')")
            out.append(Segment(self.text(item["text"], f"{name}[{i}].text"),
                               self.weight(item.get("weight", 1.0), f"{name}[{i}].weight")))
        return out

    def messages(self, value, name: str) -> list[Message]:
        if not isinstance(value, list):
            raise self.fail(name, f"must be a list of messages, got {type(value).__name__}")
        if not value:
            raise self.fail(name, "is empty: a conversation needs at least one message")
        out = []
        for i, item in enumerate(value):
            where = f"{name}[{i}]"
            if not isinstance(item, dict):
                raise self.fail(where,
                                f"a message must be an object with 'role' and 'content', got {type(item).__name__}")
            if "role" not in item:
                raise self.fail(f"{where}.role", "missing")
            role = item["role"]
            if role not in ROLES:
                raise self.fail(f"{where}.role", f"unknown role {role!r} (allowed: {', '.join(ROLES)})")
            if "content" not in item or item["content"] is None:
                raise self.fail(f"{where}.content", "missing")
            content = item["content"]
            segments = self.segments(content,
                                     f"{where}.content") if role == "assistant" else [Segment(self.text(content,
                                                                                                        f"{where}.content"))]
            out.append(Message(role, segments, self.weight(item.get("weight", 1.0), f"{where}.weight")))
        return out

    def text_or_messages(self, name: str, role_for_text: str) -> list[Message] | str:
        value = self.require(name)
        if role_for_text == "assistant":
            return self.text_or_messages_value(value, name)
        if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
            return self.messages(value, name)
        return self.text(value, name)

    def text_or_messages_value(self, value, name: str) -> list[Message] | list[Segment]:
        """A completion: assistant messages, or text (possibly as weighted segments)."""
        if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
            return self.messages(value, name)
        return self.segments(value, name)


def parse_sft(path: str, where: str, record: dict) -> SFTExample:
    check = RecordChecker(path, where, record)
    weight = check.weight(record.get("weight", 1.0), "weight")
    if "messages" in record:
        messages = check.messages(record["messages"], "messages")
        if not any(m.role == "assistant" for m in messages):
            raise check.fail("messages", "has no assistant message: there is nothing to train on")
        return SFTExample(messages=messages, weight=weight)
    if "prompt" in record or "completion" in record:
        prompt = check.text_or_messages("prompt", "user")
        completion = check.text_or_messages("completion", "assistant")
        if isinstance(prompt, list) or (completion and isinstance(completion[0], Message)):
            prompt_msgs = prompt if isinstance(prompt, list) else [Message("user", [Segment(prompt)])]
            completion_msgs = completion if isinstance(completion[0], Message) else [Message("assistant", completion)]
            return SFTExample(messages=prompt_msgs + completion_msgs, weight=weight)
        return SFTExample(prompt=prompt, completion=completion, weight=weight)
    if "text" in record:
        return SFTExample(prompt="", completion=check.segments(record["text"], "text"), weight=weight)
    raise check.fail(None,
                     f"not an SFT record: expected 'messages', 'prompt' + 'completion' or 'text' (found "
                     f"{', '.join(sorted(record)) or 'no fields'})")


@dataclass
class PreferenceExample:
    """A prompt with a preferred and a dispreferred completion (and an optional gold one, for TPO)."""

    chosen: SFTExample
    rejected: SFTExample
    gold: SFTExample | None = None


def parse_preference(path: str, where: str, record: dict) -> PreferenceExample:
    """A pair shares its prompt: given apart (``prompt``), or as the turns both transcripts share (as TRL extracts
    an implicit prompt); the replies themselves are assistant (and tool) turns only. Identical replies are refused:
    such a pair has no preference to learn. An empty reply is a reply (HH-RLHF prefers silence to some requests):
    its end-of-turn token is what is trained."""
    check = RecordChecker(path, where, record)
    for name in ("chosen", "rejected"):
        check.require(name)
    prompt = check.text_or_messages("prompt", "user") if "prompt" in record else ""
    names = ["chosen", "rejected"] + [n for n in ("gold", "reference") if n in record][:1]  # TRL calls gold "reference"
    replies = {n: check.text_or_messages(n, "assistant") for n in names}
    if "prompt" not in record and all(isinstance(r[0], Message) for r in replies.values()):
        prompt, replies = _shared_prompt(check, replies)
    for name, reply in replies.items():
        turns = reply if isinstance(reply[0], Message) else [Message("assistant", reply)]
        for i, turn in enumerate(turns):
            if turn.role not in ("assistant", "tool"):
                raise check.fail(f"{name}[{i}]", f"a {turn.role} turn inside the reply: the chosen and rejected "
                                 "transcripts must share every turn before their replies (the prompt)")
    if replies["chosen"] == replies["rejected"]:
        raise check.fail("rejected", "is identical to chosen: the pair has no preference to learn "
                                     "(posttrain data inspect lists every such record)")
    return PreferenceExample(*[_completion_example(check, prompt, reply, n) for n, reply in replies.items()])


def _shared_prompt(check: RecordChecker, replies: dict[str, list[Message]]) -> tuple[list[Message], dict]:
    """Whole transcripts: the turns they share up to the chosen and rejected replies are the prompt."""
    chosen, rejected = replies["chosen"], replies["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    for name, reply in replies.items():
        if reply[:shared] != chosen[:shared]:
            raise check.fail(name, "does not share the turns before the chosen and rejected replies")
    return chosen[:shared], {name: reply[shared:] for name, reply in replies.items()}


def _completion_example(check: RecordChecker, prompt, completion, name: str) -> SFTExample:
    """Prompt turns never carry loss (their assistant turns included); the completion does."""
    conversational = isinstance(prompt, list) or isinstance(completion[0], Message)
    if not conversational:
        return SFTExample(prompt=prompt, completion=completion)
    prompt_msgs = prompt if isinstance(prompt, list) else ([Message("user", [Segment(prompt)])] if prompt else [])
    completion_msgs = completion if isinstance(completion[0], Message) else [Message("assistant", completion)]
    if not any(m.role == "assistant" for m in completion_msgs):
        raise check.fail(name, "has no assistant message")
    return SFTExample(messages=[Message(m.role, m.segments, 0.0) for m in prompt_msgs] + completion_msgs)


def parse_unpaired(path: str, where: str, record: dict) -> list[tuple[SFTExample, bool]]:
    """``{prompt, completion, label}``, or a preference record split into a desirable and an undesirable example."""
    check = RecordChecker(path, where, record)
    if "chosen" in record and "rejected" in record and "label" not in record:
        pair = parse_preference(path, where, record)
        return [(pair.chosen, True), (pair.rejected, False)]
    label = check.require("label")
    if not isinstance(label, bool):
        raise check.fail("label", f"must be true (desirable) or false (undesirable), got {label!r}")
    prompt = check.text_or_messages("prompt", "user") if "prompt" in record else ""
    completion = check.text_or_messages("completion", "assistant")
    return [(_completion_example(check, prompt, completion, "completion"), label)]


@dataclass
class RankedExample:
    responses: list[SFTExample]
    scores: list[float]


def parse_ranked(path: str, where: str, record: dict) -> RankedExample:
    """``{prompt, responses: [...], scores: [...]}``; higher scores are better (binary feedback: 1 / 0)."""
    check = RecordChecker(path, where, record)
    responses, scores = check.require("responses"), check.require("scores")
    if not isinstance(responses, list) or len(responses) < 2:
        raise check.fail("responses", "must be a list of at least two responses")
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise check.fail("scores", f"must be a list of {len(responses)} numbers, one per response")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise check.fail(f"scores[{i}]", f"must be a number, got {score!r}")
    if len(set(scores)) < 2:
        raise check.fail("scores", "all scores are equal: there is nothing to rank")
    prompt = check.text_or_messages("prompt", "user") if "prompt" in record else ""
    examples = []
    for i, response in enumerate(responses):
        name = f"responses[{i}]"
        completion = check.text_or_messages_value(response, name)
        examples.append(_completion_example(check, prompt, completion, name))
    return RankedExample(examples, [float(s) for s in scores])


@dataclass
class RatedExample:
    """Reward-model data: a preference pair (chosen first) or one rated completion; ``ratings`` per completion
    ({attribute: value}, possibly empty); ``margin`` the pair's required reward margin (0 when absent)."""

    completions: list[SFTExample]
    ratings: list[dict[str, float]]
    margin: float = 0.0

    @property
    def is_pair(self) -> bool:
        return len(self.completions) == 2


def parse_rated(path: str, where: str, record: dict, attributes: list[str] = ()) -> RatedExample:
    """``{prompt, chosen, rejected[, margin][, chosen_ratings, rejected_ratings]}`` or, with ``attributes`` (a
    multi-objective reward model), ``{prompt, completion, ratings: {attribute: value}}``."""
    check = RecordChecker(path, where, record)
    if "chosen" in record or "rejected" in record:
        pair = parse_preference(path, where, record)
        margin = record.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise check.fail("margin", f"must be a number, got {margin!r}")
        ratings = [_ratings(check, record.get(f"{side}_ratings"), f"{side}_ratings", attributes)
                   for side in ("chosen", "rejected")]
        return RatedExample([pair.chosen, pair.rejected], ratings, float(margin))
    if not attributes:
        raise check.fail(None, "not a preference pair: a reward model trains on 'chosen' and 'rejected' (rated single "
                         "completions need rm.objectives)")
    ratings = _ratings(check, check.require("ratings"), "ratings", attributes)
    if not ratings:
        raise check.fail("ratings", "rates none of the objectives")
    prompt = check.text_or_messages("prompt", "user") if "prompt" in record else ""
    completion = check.text_or_messages("completion", "assistant")
    return RatedExample([_completion_example(check, prompt, completion, "completion")], [ratings])


def _ratings(check: RecordChecker, value, name: str, attributes) -> dict[str, float]:
    if value is None:
        return {}
    if not attributes:
        raise check.fail(name, "ratings need rm.objectives (the attributes the reward model scores)")
    if not isinstance(value, dict):
        raise check.fail(name, f"must be a mapping {{attribute: number}}, got {type(value).__name__}")
    out = {}
    for key, rating in value.items():
        if key not in attributes:
            raise check.fail(f"{name}.{key}", f"not one of rm.objectives ({', '.join(attributes)})")
        if rating is None:
            continue  # unrated attribute: no regression target
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
            raise check.fail(f"{name}.{key}", f"must be a number, got {rating!r}")
        out[key] = float(rating)
    return out


@dataclass
class StepsExample:
    """Process supervision: a prompt, the solution's steps and a correctness label per step (TRL's stepwise layout)."""

    prompt: str
    steps: list[str]
    labels: list[bool]


def parse_steps(path: str, where: str, record: dict) -> StepsExample:
    """``{prompt, completions: [step, ...], labels: [bool, ...]}``."""
    check = RecordChecker(path, where, record)
    prompt = check.text(record.get("prompt", ""), "prompt")
    steps, labels = check.require("completions"), check.require("labels")
    if not isinstance(steps, list) or not steps:
        raise check.fail("completions", "must be a non-empty list of steps (strings)")
    for i, step in enumerate(steps):
        check.text(step, f"completions[{i}]")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise check.fail("labels", f"must be a list of {len(steps)} booleans, one per step")
    for i, label in enumerate(labels):
        if not isinstance(label, bool):
            raise check.fail(f"labels[{i}]", f"must be true (a correct step) or false, got {label!r}")
    return StepsExample(prompt, list(steps), list(labels))
