"""Score a data file with a reward model or a process reward model: one score per completion, whatever the layout.

Layouts: preference pairs ``{prompt, chosen, rejected}``, lists ``{prompt, responses: [...]}``, single completions
``{prompt, completion}`` and stepwise solutions ``{prompt, completions: [step, ...]}``. Each output record is the
input record plus its scores (``chosen_score`` / ``rejected_score``, ``scores``, ``score``, and ``step_scores`` for a
process reward model on stepwise data).
"""

from __future__ import annotations

from tqdm.auto import tqdm

from posttrain.core.errors import DataError
from posttrain.evaluate.stats import wilson_interval
from posttrain.rewards.model import ProcessRewardModel


def score_items(record: dict, path: str, where: str) -> tuple[str, list]:
    """(layout, completions to score) of one record, each checked: text or messages (steps: a list of texts)."""
    def checked(value, name: str, steps: bool = False):
        messages = isinstance(value,
                              list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)
        texts = isinstance(value, list) and value and all(isinstance(t, str) for t in value)
        if not (texts if steps else isinstance(value, str) or messages):
            expected = "a non-empty list of step texts" if steps else "a text or a list of {role, content} messages"
            raise DataError(path, where, name, f"must be {expected}")
        return value

    if "chosen" in record and "rejected" in record:
        return "pair", [checked(record["chosen"], "chosen"), checked(record["rejected"], "rejected")]
    if isinstance(record.get("responses"), list):
        return "list", [checked(r, f"responses[{i}]") for i, r in enumerate(record["responses"])]
    if isinstance(record.get("completions"), list):
        return "steps", [checked(record["completions"], "completions", steps=True)]
    if "completion" in record:
        return "single", [checked(record["completion"], "completion")]
    raise DataError(path, where, None, "nothing to score: expected chosen + rejected, responses, completions (steps) "
                    f"or completion (found {', '.join(sorted(record)) or 'no fields'})")


def score_records(scorer, records: list[tuple[str, str, dict]], batch_size: int = 16,
                  progress: bool = False) -> list[dict]:
    """Each record with its scores added. ``scorer`` is a ``RewardModel`` or a ``ProcessRewardModel``
    (``posttrain.rewards.model.load_scorer``)."""
    process = isinstance(scorer, ProcessRewardModel)
    flat: list[tuple[object, object]] = []  # (prompt, completion): text, assistant messages, or a list of steps
    layouts = []
    for path, where, record in records:
        layout, completions = score_items(record, path, where)
        layouts.append(layout)
        for completion in completions:
            if process and layout != "steps":
                completion = scorer.split(_text(completion))  # a process reward model scores steps
            elif not process and layout == "steps":
                completion = "\n".join(completion)  # an outcome reward model scores the whole solution
            flat.append((record.get("prompt", ""), completion))
    scores: list = []
    bar = tqdm(total=len(flat), desc="scoring", unit="completion", disable=not progress)
    for lo in range(0, len(flat), batch_size):
        prompts, completions = zip(*flat[lo : lo + batch_size])
        if process:
            scores += scorer.step_scores(list(prompts), list(completions))
        else:
            scores += scorer(list(prompts), list(completions))
        bar.update(len(prompts))
    bar.close()
    out: list[dict] = []
    position = 0
    for (_, _, record), layout in zip(records, layouts):
        count = 2 if layout == "pair" else (len(record["responses"]) if layout == "list" else 1)
        mine, position = scores[position : position + count], position + count
        values = [scorer.aggregate(s) for s in mine] if process else mine
        scored = dict(record)
        if layout == "pair":
            scored["chosen_score"], scored["rejected_score"] = values
        elif layout == "list":
            scored["scores"] = values
        else:
            scored["score"] = values[0]
        if process and layout == "steps":
            scored["step_scores"] = mine[0]
        out.append(scored)
    return out


def _text(completion) -> str:
    """Assistant messages as plain text, for process reward models (which read raw text)."""
    return completion if isinstance(completion, str) else "\n".join(m["content"] for m in completion)


def summarize(scored: list[dict]) -> list[str]:
    """Lines for the terminal: counts, pairwise accuracy with a Wilson interval (ties count as wrong), mean scores."""
    lines = [f"scored {len(scored)} records"]
    pairs = [r for r in scored if "chosen_score" in r]
    if pairs:
        right = sum(r["chosen_score"] > r["rejected_score"] for r in pairs)
        low, high = wilson_interval(right, len(pairs))
        margin = sum(r["chosen_score"] - r["rejected_score"] for r in pairs) / len(pairs)
        lines.append(f"pairs: accuracy {right / len(pairs):.1%} (95% CI {low:.1%}-{high:.1%}, n={len(pairs)}), "
                     f"mean margin {margin:.3f}")
    labeled = [(s, label) for r in scored if "step_scores" in r and isinstance(r.get("labels"), list)
               for s, label in zip(r["step_scores"], r["labels"])]
    if labeled:
        right = sum((s > 0.5) == bool(label) for s, label in labeled)
        low, high = wilson_interval(right, len(labeled))
        lines.append(f"steps: accuracy {right / len(labeled):.1%} (95% CI {low:.1%}-{high:.1%}, n={len(labeled)}) at "
                     f"P(correct) > 0.5")
    singles = [r["score"] for r in scored if "score" in r]
    if singles:
        lines.append(f"completions: mean score {sum(singles) / len(singles):.3f} (n={len(singles)})")
    return lines
