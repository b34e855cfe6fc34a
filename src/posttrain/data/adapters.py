"""Map known public dataset layouts onto posttrain's record formats."""

from __future__ import annotations

import re
from collections.abc import Callable

from posttrain.core.errors import DataError

_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k(record: dict) -> dict:
    """GSM8K ``question`` / ``answer`` -> a conversational prompt / completion plus the final ``answer``.

    The calculator annotations (``<<48/2=24>>``) are removed; the ``#### 72`` line stays, so a
    trained model states its final answer in a form :func:`extract_answer` reads reliably.
    """
    solution = _CALCULATOR.sub("", record["answer"])
    final = solution.rsplit("####", 1)[-1].strip().replace(",", "")
    return {
        "prompt": [{"role": "user", "content": record["question"]}],
        "completion": [{"role": "assistant", "content": solution}],
        "answer": final,
    }


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_messages(transcript: str) -> list[dict]:
    """Split an HH-RLHF ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcript into messages."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("not an HH-RLHF transcript (expected '\\n\\nHuman: ' first)")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[role], "content": text} for role, text in zip(parts[1::2], parts[2::2])]


def hh_rlhf(record: dict) -> dict:
    """HH-RLHF ``chosen`` / ``rejected`` transcripts -> shared prompt turns + the two final replies."""
    chosen, rejected = hh_messages(record["chosen"]), hh_messages(record["rejected"])
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("both transcripts must end with an Assistant turn")
    if any(m["role"] != "assistant" for m in chosen[shared:] + rejected[shared:]):
        raise ValueError("the chosen and rejected transcripts differ before their last Assistant reply: a pair "
                         "must share its prompt")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


ADAPTERS: dict[str, Callable[[dict], dict]] = {"gsm8k": gsm8k, "hh_rlhf": hh_rlhf}


def detect_adapter(record: dict) -> str:
    if "question" in record and "answer" in record and not {"prompt", "messages"} & record.keys():
        return "gsm8k"
    if isinstance(record.get("chosen"), str) and "prompt" not in record and record["chosen"].startswith("\n\nHuman:"):
        return "hh_rlhf"
    return "none"


def adapt(name: str, record: dict, path: str, where: str) -> dict:
    if name == "auto":
        name = detect_adapter(record)
    if name == "none":
        return record
    try:
        return ADAPTERS[name](record)
    except KeyError as exc:
        raise DataError(path, where, str(exc.args[0]), f"missing (needed by the {name} adapter)") from None
    except (ValueError, AttributeError, TypeError) as exc:
        raise DataError(path, where, None, f"{name} adapter: {exc}") from None
