from __future__ import annotations

import pytest

from pipeline.config import parse_config
from pipeline.ratelimit import RateLimit, TokenBuckets, retry_after
from pipeline.settings import ConfigError
from tests.conftest import Clock


def test_a_tenant_sends_its_burst_then_its_rate_and_others_are_not_held_back() -> None:
    clock = Clock()
    buckets = TokenBuckets({"acme": RateLimit(10, 20)}, clock)
    assert buckets.take("acme", 15) == 0.0
    assert buckets.take("acme", 10) == pytest.approx(0.5)  # 5 left, 5 more at 10/s
    assert buckets.take("acme", 5) == 0.0  # a refused request took nothing
    assert buckets.take("acme", 1) == pytest.approx(0.1)
    assert buckets.take("globex", 10_000) == 0.0  # no limit
    clock.now += 1.0
    assert buckets.take("acme", 10) == 0.0
    clock.now += 100.0  # the bucket fills to its burst, no more
    assert buckets.take("acme", 20) == 0.0 and buckets.take("acme", 1) > 0


def test_a_request_larger_than_the_burst_passes_a_full_bucket_and_leaves_a_debt() -> None:
    clock = Clock()
    buckets = TokenBuckets({"acme": RateLimit(10, 20)}, clock)
    assert buckets.take("acme", 50) == 0.0  # never refused for its size alone
    assert buckets.take("acme", 1) == pytest.approx(3.1)  # 30 owed, then the one
    clock.now += 3.0  # the debt paid
    assert buckets.take("acme", 50) == pytest.approx(2.0)  # needs a full bucket: 20 of 0
    clock.now += 2.0
    assert buckets.take("acme", 50) == 0.0
    assert buckets.take("acme", 0) == 0.0  # an empty request takes nothing


def test_limits_read_again_carry_each_tenants_tokens_over() -> None:
    """SIGHUP's policy: a tenant that spent its burst does not get a fresh one; a lower burst
    caps what it holds; a tenant newly limited starts full, one no longer limited is free."""
    clock = Clock()
    buckets = TokenBuckets({"acme": RateLimit(10, 20), "globex": RateLimit(1, 100)}, clock)
    assert buckets.take("acme", 20) == 0.0 and buckets.take("globex", 40) == 0.0
    again = buckets.with_limits(
        {"acme": RateLimit(10, 20), "globex": RateLimit(1, 50), "slow": RateLimit(1, 5)}
    )
    assert again.take("acme", 1) == pytest.approx(0.1)  # spent, as before the reading
    assert again.take("globex", 50) == 0.0  # of the 60 it held, 50, its new burst
    assert again.take("globex", 1) == pytest.approx(1.0)
    assert again.take("slow", 5) == 0.0 and again.take("slow", 1) == pytest.approx(1.0)
    assert buckets.with_limits({}).take("acme", 1_000) == 0.0


def test_tokens_given_back_when_kafka_did_not_take_the_request() -> None:
    clock = Clock()
    buckets = TokenBuckets({"acme": RateLimit(1, 5)}, clock)
    assert buckets.take("acme", 5) == 0.0
    buckets.give_back("acme", 5)
    assert buckets.take("acme", 5) == 0.0
    buckets.give_back("globex", 5)  # no limit: nothing to give back


def test_rate_limits_from_vigil_yaml() -> None:
    config = parse_config({"tenants": {
        "acme": {"rate_limit": {"events_per_second": 2000, "burst": 20000}},
        "globex": {"rate_limit": {"events_per_second": 50}},
        "initech": {},
    }}, {})  # fmt: skip
    assert config.rate_limits == {"acme": RateLimit(2000, 20000), "globex": RateLimit(50, 50)}
    for spec, says in (
        ({"events_per_second": 0}, r"tenants.acme.rate_limit.events_per_second: expected a pos"),
        ({"burst": 5}, r"tenants.acme.rate_limit.events_per_second: expected a positive number, "
                       r"got None"),
        ({"events_per_second": 5, "burst": "lots"}, r"rate_limit.burst: expected a positive"),
        ({"events_per_second": 5, "per": "minute"}, r"tenants.acme.rate_limit.per: unknown"),
        (100, r"tenants.acme.rate_limit: expected \{events_per_second"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=says):
            parse_config({"tenants": {"acme": {"rate_limit": spec}}}, {})


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert [retry_after(s) for s in (0.01, 1.0, 1.2, 7.9)] == ["1", "1", "2", "8"]
