"""What every loss registry shares.

A loss is a plain function: its parameters without a default are its inputs (tensors), the ones
with a default are its hyperparameters, and those defaults are the paper's. So the signature is
the one place that says which settings a loss reads (``beta`` included: a loss that has no
temperature does not list it) and what they default to, for the checks and for ``--help``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from posttrain.core.errors import UserError


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable
    defaults: dict[str, Any]  # hyperparameter -> the paper's default
    needs: frozenset[str] = field(default_factory=frozenset)  # inputs besides the policy's: reference, gold, ...
    reward: str = "ratio"  # what the loss compares, logged as rewards/*: ratio | logps | mean_logps

    @property
    def needs_reference(self) -> bool:
        return "reference" in self.needs

    def options(self, beta: float | None, settings: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments this loss reads out of a shared settings dict (unset ones keep their default)."""
        chosen = {k: v for k, v in settings.items() if k in self.defaults and v is not None}
        if beta is not None and "beta" in self.defaults:
            chosen["beta"] = beta
        return chosen

    def beta(self, given: float | None) -> float | None:
        return None if "beta" not in self.defaults else (given if given is not None else self.defaults["beta"])


class Registry(dict):
    """``name -> LossSpec`` for one family of losses (pairwise, unpaired, ranking)."""

    def __init__(self, family: str, key: str = "loss.name", settings: str = "loss"):
        super().__init__()
        self.family, self.key, self.settings = family, key, settings

    def register(self, name: str, needs: Iterable[str] = (), reward: str = "ratio"):
        def wrap(fn):
            if name in self:
                raise ValueError(f"{self.family} loss {name!r} registered twice")
            params = inspect.signature(fn).parameters.values()
            defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
            self[name] = LossSpec(name, fn, defaults, frozenset(needs), reward)
            return fn

        return wrap

    def alias(self, alias: str, name: str) -> None:
        spec = self[name]
        self[alias] = LossSpec(alias, spec.fn, spec.defaults, spec.needs, spec.reward)

    def check(self, names: list[str], settings: Iterable[str]) -> list[LossSpec]:
        """Unknown losses and settings that no chosen loss reads are errors, never silently ignored."""
        for name in names:
            if name not in self:
                raise UserError(f"{self.key}: unknown {self.family} loss {name!r} (known: {', '.join(sorted(self))})")
        specs = [self[n] for n in names]
        unused = set(settings) - {key for spec in specs for key in spec.defaults}
        if unused:
            readers = {key: [n for n, s in self.items() if key in s.defaults] for key in sorted(unused)}
            detail = "; ".join(f"{key} is read by {', '.join(r) or 'no loss'}" for key, r in readers.items())
            raise UserError(f"{self.settings}: {', '.join(sorted(unused))} not used by {', '.join(names)} ({detail})")
        return specs

    def describe(self) -> list[str]:
        """One line per loss with its hyperparameters and their defaults, for ``--help``."""
        width = max(len(name) for name in self)
        return [f"  {name:{width}s}  " + (" ".join(f"{k}={v}" for k, v in spec.defaults.items()) or "(no settings)")
                for name, spec in sorted(self.items())]
