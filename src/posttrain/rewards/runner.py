"""Scoring completions in worker processes, with our own timeouts.

Reward code is user code (and ``code_tests`` runs model-written programs): it runs in a pool of spawned worker
processes (or, with ``workers=0``, in the training process, without timeouts). A call that exceeds ``timeout``
seconds has its workers killed and replaced, and its completions are counted as failures; no ``signal.alarm``
anywhere (off the main thread it silently scored every answer 0 in verl PR #5635). Completions of one prompt are
always scored in the same call, so group-level rewards (``majority_vote``) see the whole group.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from dataclasses import dataclass, field

from posttrain.core.errors import UserError
from posttrain.rewards import resolve_reward


@dataclass
class Scores:
    total: list[float]  # the weighted sum per completion (failed parts count 0)
    by_reward: dict[str, list[float | None]]
    failed: dict[str, int]  # per reward: completions it raised on, timed out on, or returned None / NaN for
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


_START_SECONDS = 60


def _ready() -> bool:
    return True


def _score(name: str, options: dict, prompts: list, completions: list, columns: dict) -> tuple[list | None, str | None]:
    """Runs in a worker: one reward over one chunk; exceptions come back as text, never as a crash."""
    try:
        values = resolve_reward(name)(prompts, completions, **columns, **options)
        values = list(values)
        if len(values) != len(completions):
            return None, f"{name} returned {len(values)} values for {len(completions)} completions"
        return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values], None
    except Exception as exc:  # noqa: BLE001 - user code: report, never crash the trainer
        return None, f"{name}: {type(exc).__name__}: {exc}"


class RewardRunner:
    """Reward functions in worker processes, plus reward models (``models``: (label, weight, scorer)) in this one,
    on its device."""

    def __init__(self, specs: list[tuple[str, float, dict]], workers: int = 2, timeout: float = 120.0,
                 models: list[tuple[str, float, object]] = ()):
        for name, _, options in specs:
            try:
                preflight = getattr(resolve_reward(name), "preflight", None)  # a reward's own check of its set-up
                if preflight is not None:
                    preflight(**options)
            except (ValueError, RuntimeError) as exc:
                raise UserError(f"rewards: {exc}") from None
        self.specs, self.workers, self.timeout, self.models = specs, workers, timeout, list(models)
        self.pool = None

    def _pool(self):
        if self.pool is None:
            self.pool = multiprocessing.get_context("spawn").Pool(self.workers)
            try:  # a worker that cannot start would be restarted forever, and every call would time out
                self.pool.apply_async(_ready).get(timeout=_START_SECONDS)
            except multiprocessing.TimeoutError:
                self.close()
                raise UserError(
                    f"reward workers did not start within {_START_SECONDS}s. They are spawned processes, which "
                    "import your script again: guard its training code with `if __name__ == \"__main__\":`, "
                    "or set rl.reward_workers: 0 to score in the training process (no timeouts then)") from None
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def _submit(self, *job):
        if self.workers == 0:
            return _Done(_score(*job))
        return self._pool().apply_async(_score, job)

    def score(self, prompts: list, completions: list[str], columns: dict[str, list], group: list[int],
              conversations: list | None = None) -> Scores:
        """``prompts`` as reward functions see them; ``conversations`` as reward models do (chat messages or raw
        text, default ``prompts``)."""
        start = time.perf_counter()
        columns = {**columns, "group": group}
        chunks = _group_chunks(group, max(self.workers, 1))
        by_reward: dict[str, list] = {}
        failed: dict[str, int] = {}
        errors: list[str] = []
        for name, _, options in self.specs:
            jobs = [(lo, hi, self._submit(name, options, prompts[lo:hi], completions[lo:hi],
                                          {k: v[lo:hi] for k, v in columns.items()}))
                    for lo, hi in chunks]
            values: list[float | None] = [None] * len(completions)
            for lo, hi, job in jobs:
                try:
                    part, error = job.get(timeout=max(self.timeout - (time.perf_counter() - start), 1.0))
                except multiprocessing.TimeoutError:  # the rest of this reward's chunks died with the pool
                    errors.append(f"{name}: no answer within {self.timeout:.0f}s (workers killed and restarted)")
                    self.close()
                    break
                if error:
                    errors.append(error)
                if part is not None:
                    values[lo:hi] = part
            by_reward[name] = values
            failed[name] = sum(v is None for v in values)
        for label, _, scorer in self.models:
            values = scorer(conversations if conversations is not None else prompts, completions) if completions else []
            by_reward[label] = [None if math.isnan(v) else v for v in values]
            failed[label] = sum(v is None for v in by_reward[label])
        weighted = [(n, w) for n, w, _ in self.specs] + [(label, w) for label, w, _ in self.models]
        total = [sum(w * (by_reward[n][i] or 0.0) for n, w in weighted) for i in range(len(completions))]
        return Scores(total, by_reward, failed, time.perf_counter() - start, errors)


@dataclass
class _Done:
    """An in-process result with the interface of an ``AsyncResult``."""
    value: tuple

    def get(self, timeout: float | None = None) -> tuple:
        return self.value


def _group_chunks(group: list[int], parts: int) -> list[tuple[int, int]]:
    """About ``parts`` contiguous ranges of roughly equal size that never cut a group (completions of one
    prompt are contiguous)."""
    if not group:
        return []
    size = max(1, math.ceil(len(group) / parts))
    bounds, lo = [], 0
    while lo < len(group):
        hi = min(lo + size, len(group))
        while hi < len(group) and group[hi] == group[hi - 1]:
            hi += 1
        bounds.append((lo, hi))
        lo = hi
    return bounds
