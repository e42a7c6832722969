from __future__ import annotations

import random

import pytest

from pipeline.projection import NotEnoughData, project


def test_large_volumes_use_the_normal_approximation() -> None:
    costs = [0.10, 0.20, 0.30, 0.40, 0.50] * 20
    p = project(costs, 10_000)
    assert p.based_on_units == 100
    assert p.total_expected == pytest.approx(3000.0)
    assert p.per_unit_p50 == pytest.approx(0.30) and p.per_unit_p95 == pytest.approx(0.50)
    assert p.total_p50 == pytest.approx(3000.0)
    assert 3000.0 < p.total_p95 < 3000.0 + 1.7 * 100 * 0.15  # sqrt(10,000) x sd(0.142)


def test_small_volumes_are_bootstrapped_reproducibly() -> None:
    rng = random.Random(3)
    costs = [rng.lognormvariate(-2, 1) for _ in range(200)]
    a, b = project(costs, 5, seed=1), project(costs, 5, seed=1)
    assert a == b
    assert a.total_p50 < a.total_expected < a.total_p95  # a right-skewed cost distribution


def test_too_little_data_is_said_not_guessed() -> None:
    with pytest.raises(NotEnoughData, match="only 3 unit"):
        project([1.0, 2.0, 3.0], 10)
    with pytest.raises(ValueError, match="must not be negative"):
        project([1.0] * 10, -1)
    assert project([1.0] * 10, 0).total_p95 == 0
