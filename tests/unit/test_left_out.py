"""When the raw consumer counts as left out of its group (``batchconsumer.left_out``): missing
from the members of a group that is not rebalancing. The real broker's side of it is in
tests/integration/test_batchconsumer.py."""

from __future__ import annotations

import pytest
from confluent_kafka import ConsumerGroupState

from pipeline.batchconsumer import left_out

ME = "vigil-1-abc"


@pytest.mark.parametrize(
    "state", [ConsumerGroupState.STABLE, ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD,
              ConsumerGroupState.UNKNOWN],
)  # fmt: skip
def test_missing_from_a_group_that_is_not_rebalancing_is_left_out(
    state: ConsumerGroupState,
) -> None:
    assert left_out(state, {"vigil-2-def"}, ME)
    assert left_out(state, set(), ME)


@pytest.mark.parametrize(
    "state", [ConsumerGroupState.PREPARING_REBALANCING, ConsumerGroupState.COMPLETING_REBALANCING]
)
def test_missing_while_the_group_rebalances_is_a_join_in_progress(
    state: ConsumerGroupState,
) -> None:
    assert not left_out(state, {"vigil-2-def"}, ME)
    assert not left_out(state, set(), ME)


@pytest.mark.parametrize("state", list(ConsumerGroupState))
def test_a_member_is_never_left_out(state: ConsumerGroupState) -> None:
    assert not left_out(state, {ME, "vigil-2-def"}, ME)
