"""Cost known before the start: what N more units of work will cost, from the per-unit costs
observed so far. Pure.

The total of N units is a sum of N draws from the observed per-unit distribution. For small N
it is bootstrapped (seeded, so a projection is reproducible); from 30 units on, the central
limit theorem gives it directly: mean N x m, spread sqrt(N) x s.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

_Z95 = 1.6448536269514722  # one-sided 95%
_BOOTSTRAP_BELOW = 30
_RESAMPLES = 4000


class NotEnoughData(ValueError):
    """Too few observed units to project from; the message says how many there are."""


@dataclass(frozen=True)
class Projection:
    based_on_units: int
    units: int
    per_unit_mean: float
    per_unit_p50: float
    per_unit_p95: float
    total_expected: float
    total_p50: float
    total_p95: float


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def project(
    per_unit_costs: Sequence[float], units: int, *, seed: int = 0, minimum: int = 5
) -> Projection:
    """Project the cost of ``units`` more units. Raises NotEnoughData below ``minimum``
    observed units, ValueError for a negative ``units``."""
    if units < 0:
        raise ValueError(f"units: {units} must not be negative")
    if len(per_unit_costs) < minimum:
        raise NotEnoughData(
            f"only {len(per_unit_costs)} unit(s) observed; at least {minimum} are needed to project"
        )
    costs = sorted(float(c) for c in per_unit_costs)
    mean = statistics.fmean(costs)
    sd = statistics.stdev(costs) if len(costs) > 1 else 0.0
    if units == 0:
        total_p50 = total_p95 = 0.0
    elif units < _BOOTSTRAP_BELOW:
        rng = random.Random(seed)
        totals = sorted(sum(rng.choices(costs, k=units)) for _ in range(_RESAMPLES))
        total_p50, total_p95 = _quantile(totals, 0.5), _quantile(totals, 0.95)
    else:
        total_p50 = units * mean
        total_p95 = units * mean + _Z95 * math.sqrt(units) * sd
    return Projection(
        based_on_units=len(costs),
        units=units,
        per_unit_mean=mean,
        per_unit_p50=_quantile(costs, 0.5),
        per_unit_p95=_quantile(costs, 0.95),
        total_expected=units * mean,
        total_p50=total_p50,
        total_p95=total_p95,
    )
