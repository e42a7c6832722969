"""Ports for the services the tests, the demo and the benchmarks start."""

from __future__ import annotations

import socket

from pipeline.services import _ephemeral_ports, free_port


def test_free_ports_are_outside_the_range_outgoing_connections_take() -> None:
    low, high = _ephemeral_ports()
    for _ in range(50):
        port = free_port(2)
        assert not low <= port <= high and not low <= port + 1 <= high, (port, low, high)


def test_every_port_of_a_run_is_free() -> None:
    port = free_port(3)
    sockets = []
    try:
        for p in range(port, port + 3):
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", p))  # raises if free_port handed out a taken port
            s.listen()
    finally:
        for s in sockets:
            s.close()
