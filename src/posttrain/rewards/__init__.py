"""Reward functions for learning from the model's own samples.

``REWARDS`` maps a name to a function ``f(prompts, completions, **columns) -> list[float | None]``:
``prompts`` and ``completions`` are strings, and every dataset column of the records (``answer``,
``tests``, ...) arrives as a keyword argument holding one value per completion; so does ``group``,
the index of the prompt each completion answers (completions of one prompt share it). A recipe names
registered functions or ``module:function`` for its own, each with a weight and keyword options.
None (or NaN) means "could not score": it is counted and logged, and scores 0 in the weighted sum.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from posttrain.rewards.builtin import format_reward, length, majority_vote, math_answer
from posttrain.rewards.code import code_tests

REWARDS: dict[str, Callable] = {
    "math_answer": math_answer,
    "format": format_reward,
    "length": length,
    "majority_vote": majority_vote,
    "code_tests": code_tests,
}


def resolve_reward(name: str) -> Callable:
    """A registered reward, or ``module:function`` imported by name (so worker processes can import it too)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module, attr = name.split(":", 1)
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"reward {name!r}: cannot import it ({exc})") from None
    raise ValueError(f"unknown reward {name!r} (registered: {', '.join(sorted(REWARDS))}; or module:function)")
