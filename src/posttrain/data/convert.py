"""``posttrain data convert FILE --to sft|preference|unpaired --out FILE``: between posttrain's record formats,
and from the GSM8K and HH-RLHF layouts (adapted first, as training adapts them).

What each conversion keeps, in the conventions of the papers that use them:

- to ``sft``: SFT records as they are; a pair's chosen reply ("SFT on the preferred responses", the usual first
  stage before DPO); an unpaired record only when it is desirable; a ranking's best-scored response.
- to ``preference``: pairs as they are; a ranking's best vs worst response; unpaired records of the
  same prompt paired desirable with undesirable, in file order (prompts without both are skipped).
- to ``unpaired``: a pair's two replies as one desirable and one undesirable record (KTO's split of paired data);
  an SFT record as desirable; a ranking's best and worst.

A record that cannot be converted is counted and skipped with its reason; a malformed one stops the conversion
with its file, line and field. Every written record is validated by the target format's parser. Other fields
(e.g. GSM8K's ``answer``) are kept.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from posttrain.core.errors import DataError, UserError
from posttrain.data.adapters import adapt
from posttrain.data.formats import parse_preference, parse_ranked, parse_sft, parse_unpaired
from posttrain.data.inspect import detect_format
from posttrain.data.load import read_records

TARGETS = ("sft", "preference", "unpaired")
PARSERS = {"sft": parse_sft, "preference": parse_preference, "unpaired": parse_unpaired}
SHAPE_KEYS = {"prompt", "completion", "messages", "chosen", "rejected", "responses", "scores", "label", "text"}


def _extra(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in SHAPE_KEYS}


def _prompt_completion(record: dict) -> tuple[object, object]:
    """(prompt, completion) of an SFT record: ``messages`` split before the last assistant turn."""
    if "messages" in record:
        messages = record["messages"]
        last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                   default=None)
        if last is None:
            raise ValueError("has no assistant message")
        return messages[:last], messages[last:last + 1]
    if "text" in record:
        return "", record["text"]
    return record.get("prompt", ""), record["completion"]


def _ranked_ends(record: dict) -> tuple[object, object]:
    """(best, worst) responses of a ranking (its parser has refused rankings whose scores are all equal)."""
    scores = record["scores"]
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    return record["responses"][best], record["responses"][worst]


def convert_record(record: dict, source: str, target: str) -> tuple[list[dict], str | None]:
    """(converted records, why it was skipped or None)."""
    prompt, extra = record.get("prompt", ""), _extra(record)
    if target == "sft":
        if source == "sft":
            return [record], None
        if source == "preference":
            return [{"prompt": prompt, "completion": record["chosen"], **extra}], None
        if source == "unpaired":
            return ([{"prompt": prompt, "completion": record["completion"], **extra}], None) if record["label"] \
                else ([], "undesirable completion")
        return [{"prompt": prompt, "completion": _ranked_ends(record)[0], **extra}], None
    if target == "unpaired":
        if source == "unpaired":
            return [record], None
        if source == "sft":
            sft_prompt, completion = _prompt_completion(record)
            return [{"prompt": sft_prompt, "completion": completion, "label": True, **extra}], None
        pair = (record["chosen"], record["rejected"]) if source == "preference" else _ranked_ends(record)
        return [{"prompt": prompt, "completion": pair[0], "label": True, **extra},
                {"prompt": prompt, "completion": pair[1], "label": False, **extra}], None
    if source == "preference":
        return [record], None
    if source == "ranked":
        best, worst = _ranked_ends(record)
        return [{"prompt": prompt, "chosen": best, "rejected": worst, **extra}], None
    raise UserError("data convert: SFT records have one completion and a pair needs two; sample pairs from a model "
                    "instead (posttrain online-dpo, or generate and score)")


def _pair_unpaired(records: list[tuple[str, dict]]) -> tuple[list[dict], Counter]:
    """Desirable and undesirable completions of the same prompt, paired in file order."""
    by_prompt: dict[str, dict[bool, list[dict]]] = {}
    for _, record in records:
        key = json.dumps(record.get("prompt", ""), sort_keys=True)
        by_prompt.setdefault(key, {True: [], False: []})[bool(record["label"])].append(record)
    out, skipped = [], Counter()
    for sides in by_prompt.values():
        pairs = min(len(sides[True]), len(sides[False]))
        for good, bad in zip(sides[True], sides[False]):
            out.append({"prompt": good.get("prompt", ""), "chosen": good["completion"], "rejected": bad["completion"],
                        **_extra(good)})
        leftover = len(sides[True]) + len(sides[False]) - 2 * pairs
        if leftover:
            skipped["no completion of the other label for the same prompt"] += leftover
    return out, skipped


def convert_file(path: str, target: str, out: str, limit: int | None = None) -> dict:
    if target not in TARGETS:
        raise UserError(f"data convert: --to must be one of {', '.join(TARGETS)}")
    written, skipped, sources, unpaired = [], Counter(), Counter(), []
    for where, raw in read_records(path, limit):
        record = adapt("auto", raw, path, where)
        source = detect_format(record)
        PARSERS.get(source, parse_ranked)(path, where, record)  # malformed input stops here, named
        sources[source] += 1
        if target == "preference" and source == "unpaired":
            unpaired.append((where, record))
            continue
        try:
            converted, why = convert_record(record, source, target)
        except ValueError as exc:
            raise DataError(path, where, "messages", str(exc)) from None
        if why:
            skipped[why] += 1
        written += [(where, r) for r in converted]
    if unpaired:
        paired, more = _pair_unpaired(unpaired)
        written += [(f"pair {i + 1}", r) for i, r in enumerate(paired)]
        skipped.update(more)
    for where, record in written:
        PARSERS[target](out, where, record)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in written))
    return {"read": sum(sources.values()), "formats": dict(sources), "written": len(written), "skipped": dict(skipped)}
