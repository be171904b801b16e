"""The statistics every benchmark uses: medians, percentiles and summaries of timing samples, block medians, the
spread that marks a disturbed run, and the bootstrap interval of a two-sample statistic.

Contract:

- `percentile(values, q, method="linear")`: numpy's q-th percentile (0-100); None for no values. `linear`
  interpolates between the two nearest ranks (R's type 7, the same definition as
  `statistics.quantiles(..., method="inclusive")`); `lower` is the sorted value at floor(q / 100 * (n - 1)).
- `median(values)`, `ms(seconds)`: milliseconds rounded to 3 decimals, as every result stores them.
- `summary(samples, tail=95)`: `median_ms`, `p<tail>_ms`, `min_ms`, `max_ms` of millisecond samples, rounded to
  3 decimals; a lone sample is its own percentile.
- `block_medians(samples, blocks)`: medians of consecutive parts, to show drift within a run.
- `bootstrap_interval(a, b, statistic, ...)`: the percentile interval of `statistic(a, b)` by
  `scipy.stats.bootstrap`, each sample resampled on its own (not paired: two servers' requests are independent
  samples), drawn from numpy's Generator seeded with `seed`, so a rerun on the same samples gives the same
  interval.
- `DISTURBED_SPREAD`: slowest / fastest block (or round) of one series above this marks the run disturbed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

DISTURBED_SPREAD = 1.25  # slowest / fastest block of a series that did the same work: above this the machine was busy
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def percentile(values: Iterable[float], q: float, *, method: str = "linear") -> float | None:
    """The q-th percentile (0-100) of `values` by numpy (`method`: linear or lower); None for no values."""
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        return None
    return float(np.percentile(data, q, method=method))


def median(values: Iterable[float]) -> float:
    """The median, rounded to 3 decimals."""
    return round(statistics.median(values), 3)


def ms(seconds: float) -> float:
    """Seconds as milliseconds, rounded to 3 decimals."""
    return round(seconds * 1000.0, 3)


def summary(samples: Sequence[float], *, tail: int = 95) -> dict[str, float]:
    """Median, the `tail` percentile (linear), min and max of millisecond samples, rounded to 3 decimals."""
    high = percentile(samples, tail) if len(samples) > 1 else samples[0]
    return {"median_ms": round(statistics.median(samples), 3), f"p{tail}_ms": round(high, 3),
            "min_ms": round(min(samples), 3), "max_ms": round(max(samples), 3)}


def block_medians(samples: Sequence[float], blocks: int = 4) -> list[float]:
    """Medians of `samples` cut into `blocks` consecutive parts (fewer when there are fewer samples)."""
    blocks = max(1, min(blocks, len(samples)))
    size = len(samples) / blocks
    return [round(statistics.median(samples[round(i * size):round((i + 1) * size)]), 3) for i in range(blocks)]


def spread(values: Sequence[float]) -> float:
    """Largest / smallest of positive values: how far one series' blocks or rounds disagree."""
    return max(values) / min(values)


def bootstrap_interval(a: Sequence[float], b: Sequence[float],
                       statistic: Callable[[np.ndarray, np.ndarray, int], Any], *,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The `confidence` percentile interval of `statistic(a, b, axis)` (vectorized over `axis`) by resampling
    `a` and `b` independently, `resamples` times, from a Generator seeded with `seed`. `statistic` must not
    change when every value of a sample is repeated (medians, means)."""
    from scipy.stats import bootstrap

    # scipy wants two observations per sample; every resample of a lone value is that value, and so is every
    # resample of the value given twice (for statistics of medians, as here).
    samples = tuple(np.asarray(list(x) * 2 if len(x) == 1 else x, dtype=float) for x in (a, b))
    result = bootstrap(samples, statistic, n_resamples=resamples,
                       vectorized=True, paired=False, method="percentile", confidence_level=confidence,
                       rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return float(low), float(high)


def median_ratio_pct(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """(median(a) / median(b) - 1) * 100 along `axis`: how much slower `a` is, in percent."""
    return (np.median(a, axis=axis) / np.median(b, axis=axis) - 1.0) * 100.0


def median_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """median(a) - median(b) along `axis`."""
    return np.median(a, axis=axis) - np.median(b, axis=axis)
