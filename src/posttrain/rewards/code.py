"""``code_tests``: run the completion's program against the record's tests, in the sandbox."""

from __future__ import annotations

import re

from posttrain.core.sandbox import Limits, require_isolation, run_python

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(completion: str) -> str:
    """The last fenced python block of the completion, else the whole completion."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def code_tests(prompts, completions, tests, wall_seconds: float = 10.0, cpu_seconds: int = 10, memory_mb: int = 1024,
               allow_unsandboxed: bool = False, **_) -> list[float | None]:
    """1 if the program passes every line of the record's ``tests`` (Python statements, typically asserts) run
    after it in one sandboxed process (:mod:`posttrain.core.sandbox`), else 0; None where a record has no tests."""
    limits = Limits(wall_seconds=wall_seconds, cpu_seconds=cpu_seconds, memory_mb=memory_mb)
    scores: list[float | None] = []
    for completion, lines in zip(completions, tests):
        if not lines:
            scores.append(None)
            continue
        program = extract_program(completion) + "\n\n" + "\n".join(lines if isinstance(lines, list) else [lines]) + "\n"
        scores.append(float(run_python(program, limits, allow_unsandboxed).ok))
    return scores


def _preflight(allow_unsandboxed: bool = False, **_) -> None:
    """Refuse before training, not at the first reward, where the sandbox cannot isolate programs."""
    if not allow_unsandboxed:
        require_isolation("code_tests", "the reward's option allow_unsandboxed: true")


code_tests.preflight = _preflight
