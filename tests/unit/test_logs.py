"""The Kafka and ClickHouse clients' repeated lines are held back; every other line passes. The
ClickHouse client's lines about a server it did not reach are told from the rest."""

from __future__ import annotations

import logging

from mode.utils.logging import ExtensionFormatter

from pipeline.logs import HoldBackRepeats, unreached_server
from tests.conftest import Clock


def _record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_one_line_of_a_kind_passes_per_window_and_the_next_counts_the_held_ones() -> None:
    clock = Clock()
    repeats = HoldBackRepeats(every=30.0, clock=clock)
    line = "Unable connect to node with id %s: Connect call failed ('127.0.0.1', %s)"
    assert repeats.filter(_record("aiokafka.conn", line, 1, 40001))
    for port in range(40002, 40012):  # the numbers differ, the kind is the same
        clock.now += 2
        assert not repeats.filter(_record("aiokafka.conn", line, 1, port))
    clock.now += 11  # 31 s after the line that passed
    record = _record("aiokafka.conn", line, 1, 40099)
    assert repeats.filter(record)
    assert record.getMessage() == (
        "Unable connect to node with id 1: Connect call failed ('127.0.0.1', 40099) "
        "(and 10 more like it in the last 31s)"
    )
    clock.now += 1
    assert not repeats.filter(_record("aiokafka.conn", line, 1, 40100))


def test_the_line_that_counts_the_held_ones_formats_with_the_workers_formatter() -> None:
    clock = Clock()
    repeats = HoldBackRepeats(every=30.0, clock=clock)
    assert repeats.filter(_record("vigil.producer", "kafka: %s", "100% down"))
    assert not repeats.filter(_record("vigil.producer", "kafka: %s", "100% down"))
    clock.now += 31
    record = _record("vigil.producer", "kafka: %s", "100% down")
    assert repeats.filter(record)
    text = ExtensionFormatter(fmt="%(message)s").format(record)  # what Faust's worker logs with
    assert text.endswith("kafka: 100% down (and 1 more like it in the last 31s)")


def test_kinds_are_told_apart_by_logger_level_and_words() -> None:
    repeats = HoldBackRepeats(clock=Clock())
    assert repeats.filter(_record("vigil.rdkafka", "%s [%s] %s", "FAIL", "rdkafka#producer-1", "x"))
    assert repeats.filter(_record("vigil.rdkafka", "%s [%s] %s", "FAIL", "rdkafka#consumer-2", "x"))
    assert repeats.filter(_record("vigil.producer", "kafka: %s", "down", level=logging.WARNING))
    assert repeats.filter(_record("vigil.producer", "kafka: %s", "down", level=logging.ERROR))
    assert repeats.filter(_record("vigil.consumer", "kafka consumer: %s", "all brokers down"))
    assert not repeats.filter(_record("vigil.consumer", "kafka consumer: %s", "all brokers down"))


def test_lines_of_other_loggers_always_pass_unchanged() -> None:
    repeats = HoldBackRepeats(clock=Clock())
    for _ in range(3):
        record = _record("vigil.worker", "ledger: insert of %d rows failed", 500)
        assert repeats.filter(record)
        assert record.getMessage() == "ledger: insert of 500 rows failed"
    # a logger whose name merely starts like a Kafka client's is not one of its children
    assert repeats.filter(_record("aiokafkaish", "x")) and repeats.filter(
        _record("aiokafkaish", "x")
    )


def test_the_clickhouse_clients_lines_of_a_kind_are_held_back_whatever_their_query_id() -> None:
    repeats = HoldBackRepeats(clock=Clock())
    line = (
        "Retrying (Retry(total=0)) after connection broken by 'NewConnectionError': /?query_id=%s"
    )
    ids = ("53066c27-70af-4397-959c-3d1734383a68", "b83915aa-281f-4c2e-9d1e-0a3c5e7f9b12")
    assert repeats.filter(_record("urllib3.connectionpool", line, ids[0], level=logging.WARNING))
    assert not repeats.filter(
        _record("urllib3.connectionpool", line, ids[1], level=logging.WARNING)
    )
    driver = "clickhouse_connect.driver._backend.http_sync"
    assert repeats.filter(_record(driver, "Unexpected Http Driver Exception"))
    assert not repeats.filter(_record(driver, "Unexpected Http Driver Exception"))


def test_only_the_clients_lines_about_an_unreached_server_are_left_to_the_command() -> None:
    def record(name: str, msg: str) -> logging.LogRecord:
        return _record(name, msg, level=logging.WARNING)

    assert unreached_server(record("urllib3.connectionpool", "Retrying (%r) after %r: %s"))
    assert unreached_server(
        record("clickhouse_connect.driver._backend.http_sync", "Unexpected Http Driver Exception")
    )
    # the client's other warnings, and lines like them from other loggers, are kept
    assert not unreached_server(record("clickhouse_connect.driver", "Dropping setting %s"))
    assert not unreached_server(record("urllib3.connectionpool", "Connection pool is full"))
    assert not unreached_server(record("vigil.worker", "Retrying (the store) in 2s"))
    assert not unreached_server(record("vigil.store", "Unexpected Http Driver Exception"))
