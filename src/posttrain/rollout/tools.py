"""Multi-turn rollouts with a Python tool.

The model calls the tool by writing ``<python>CODE</python>``: generation stops at the closing tag, the code
runs in the sandbox of the code rewards (no network, private filesystem, time and memory limits), and its
printed output (or the error's last line) enters the context as ``<output>...</output>``; generation then goes
on, up to ``max_calls`` calls and the token budget. Tool output tokens are context, not actions: they carry no
sampler log-prob and no loss (``Completion.mask``), while the rewards see the whole trajectory as text.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from posttrain.core.sandbox import Limits, run_python
from posttrain.rollout.backend import Completion, SamplingSettings

OPEN, CLOSE = "<python>", "</python>"
INSTRUCTIONS = (
    "You can run Python code: write it between <python> and </python>, and its printed output will be shown to you "
    "between <output> and </output>. For example: <python>print(1234 * 5678)</python>\n<output>\n7006652\n</output>\n"
    "Then give the final answer."
)
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE) + r"\s*$", re.DOTALL)


def tool_call(text: str) -> str | None:
    """The code of the tool call a turn ends with, if it ends with one."""
    match = _CALL.search(text)
    return match.group(1) if match else None


def run_tool(code: str, limits: Limits, allow_unsandboxed: bool = False, max_chars: int = 400) -> tuple[str, bool]:
    """The tool's answer to ``code`` (what it printed, or the error's last line) and whether it ran cleanly."""
    result = run_python(code, limits, allow_unsandboxed)
    if result.timed_out:
        return f"Error: no result within {limits.wall_seconds:g} s", False
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return (lines[-1] if lines else f"Error: exit code {result.returncode}")[:max_chars], False
    return result.stdout.strip()[:max_chars], True


class ToolUse:
    """Wraps a generation backend: each completion may call the Python tool between turns."""

    def __init__(self, backend, tokenizer, max_calls: int = 2, limits: Limits = Limits(wall_seconds=5.0, cpu_seconds=5,
                 memory_mb=512), allow_unsandboxed: bool = False, workers: int = 4):
        self.backend, self.tokenizer, self.max_calls = backend, tokenizer, max_calls
        self.limits, self.allow_unsandboxed, self.workers = limits, allow_unsandboxed, workers
        self.stats = backend.stats
        self.calls = self.errors = 0

    def sync(self, model) -> None:
        self.backend.sync(model)

    def generate(self, prompts: list[list[int]], seeds: list[int], settings: SamplingSettings) -> list[Completion]:
        """One trajectory per (prompt, seed): model turns and tool outputs, ``settings.max_new_tokens`` tokens in
        all."""
        states = [{"tokens": [], "mask": [], "logps": [], "calls": 0, "truncated": False} for _ in prompts]
        active = list(range(len(prompts)))
        turn = 0
        while active:
            budgets: dict[int, list[int]] = {}
            for i in active:  # one generate call per remaining budget
                budgets.setdefault(settings.max_new_tokens - len(states[i]["tokens"]), []).append(i)
            ended: list[int] = []
            calls: list[tuple[int, str]] = []
            for budget, members in budgets.items():
                turn_settings = replace(settings, max_new_tokens=budget, stop=tuple(settings.stop) + (CLOSE,))
                outs = self.backend.generate([prompts[i] + states[i]["tokens"] for i in members],
                                             [(seeds[i] * 1_000_003 + turn) % 2**62 for i in members], turn_settings)
                for i, out in zip(members, outs):
                    state = states[i]
                    state["tokens"] += out.token_ids
                    state["mask"] += [1] * len(out.token_ids)
                    state["logps"] += out.sampler_logps
                    code = tool_call(out.text) if state["calls"] < self.max_calls and not out.truncated else None
                    if code is None:
                        state["truncated"] = out.truncated
                        ended.append(i)
                    else:
                        calls.append((i, code))
            with ThreadPoolExecutor(self.workers) as pool:
                answers = list(pool.map(lambda call: run_tool(call[1], self.limits, self.allow_unsandboxed), calls))
            for (i, _), (answer, ok) in zip(calls, answers):
                state = states[i]
                state["calls"] += 1
                self.calls += 1
                self.errors += not ok
                room = settings.max_new_tokens - len(state["tokens"])
                ids = self.tokenizer(f"\n<output>\n{answer}\n</output>\n", add_special_tokens=False)["input_ids"][:room]
                state["tokens"] += ids
                state["mask"] += [0] * len(ids)
                if len(state["tokens"]) >= settings.max_new_tokens:
                    state["truncated"] = True
                    ended.append(i)
            active = [i for i in active if i not in set(ended)]
            turn += 1
        return [Completion(s["tokens"], s["logps"], s["truncated"],
                           self.tokenizer.decode(s["tokens"], skip_special_tokens=True),
                           mask=s["mask"], tool_calls=s["calls"]) for s in states]
