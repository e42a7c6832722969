"""Ports for the services the tests, the demo and the benchmarks start."""

from __future__ import annotations

import random
import socket

import pytest

from pipeline.services import _ephemeral_ports, free_port


def test_free_ports_are_outside_the_range_outgoing_connections_take() -> None:
    low, high = _ephemeral_ports()
    for _ in range(50):
        port = free_port(2)
        assert not low <= port <= high and not low <= port + 1 <= high, (port, low, high)


def test_a_run_whose_second_port_is_taken_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = free_port(3)
    other = free_port(2)
    offered = iter([taken, other])
    monkeypatch.setattr(random.SystemRandom, "randrange", lambda self, a, b: next(offered))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken + 1))
        squatter.listen()
        assert free_port(2) == other
