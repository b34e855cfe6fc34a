"""Intervals for evaluation metrics, so that every number comes with n and a 95% interval.

- Proportions of 0/1 outcomes: the Wilson score interval (Wilson, 1927), well behaved at 0 / n and n / n.
- Means, ratios of sums (token-mean loss over records) and anything else: the percentile bootstrap over examples
  (Efron & Tibshirani, 1993), with a fixed seed so a report is reproducible.
- A model against a baseline on the same examples: the paired bootstrap of the difference (both metrics are
  recomputed on the same resampled examples), which is far tighter than two separate intervals.
- pass@k from n >= k samples: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054
RESAMPLES = 10_000


@dataclass
class Estimate:
    """A metric with its 95% interval over ``n`` examples, and how the interval was computed."""

    value: float
    low: float
    high: float
    n: int
    interval: str

    def as_dict(self) -> dict:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n})"


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exactly 0 (1) where rounding would leave a crumb
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def proportion(outcomes: Sequence[float]) -> Estimate:
    """The share of successes: Wilson for 0/1 outcomes, the bootstrap when some count half (ties)."""
    values = np.asarray(outcomes, dtype=np.float64)
    if np.isin(values, (0.0, 1.0)).all():
        low, high = wilson_interval(int(values.sum()), len(values))
        return Estimate(float(values.mean()) if len(values) else float("nan"), low, high, len(values), "wilson")
    return mean(values)


def mean(values: Sequence[float], seed: int = 0) -> Estimate:
    """The mean with a percentile-bootstrap interval."""
    return ratio(values, None, seed)


def ratio(numerators: Sequence[float], denominators: Sequence[float] | None, seed: int = 0) -> Estimate:
    """``sum(numerators) / sum(denominators)`` (a plain mean without denominators), bootstrapped over examples:
    e.g. the token-mean loss of records of different lengths, resampling records, not tokens."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, dtype=np.float64)
    if len(num) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, "bootstrap")
    value = num.sum() / den.sum()
    low, high = _percentiles(lambda idx: num[idx].sum(1) / den[idx].sum(1), len(num), seed)
    return Estimate(float(value), low, high, len(num), "bootstrap")


def paired_difference(a: Sequence[float], b: Sequence[float], denominators: Sequence[float] | None = None,
                      seed: int = 0) -> Estimate:
    """``metric(a) - metric(b)`` on the same examples (metric: the mean, or the ratio of sums over
    ``denominators``), with a paired-bootstrap interval: both sides resampled with the same indices."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired examples differ in number: {len(a)} vs {len(b)}")
    den = np.ones_like(a) if denominators is None else np.asarray(denominators, dtype=np.float64)
    diff = a - b
    value = diff.sum() / den.sum() if len(a) else float("nan")
    if len(a) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, "paired bootstrap")
    low, high = _percentiles(lambda idx: diff[idx].sum(1) / den[idx].sum(1), len(a), seed)
    return Estimate(float(value), low, high, len(a), "paired bootstrap")


def statistic_interval(statistic, n: int, seed: int = 0, resamples: int = 1_000) -> tuple[float, float]:
    """A percentile-bootstrap interval for any ``statistic(indices) -> float`` of n examples (for statistics that
    are not sums, e.g. distinct-n over a corpus; fewer resamples, as each one costs a Python call)."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def _percentiles(statistic, n: int, seed: int, resamples: int = RESAMPLES, chunk: int = 1_000) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of a vectorized ``statistic([chunk, n] indices) -> [chunk]``."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([statistic(rng.integers(0, n, (min(chunk, resamples - i), n)))
                             for i in range(0, resamples, chunk)])
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021, "Evaluating Large Language Models
    Trained on Code"): 1 - C(n-c, k) / C(n, k), computed as a product so large n does not overflow."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per question, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))
