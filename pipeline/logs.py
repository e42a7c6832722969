"""Logging: the clients' repeats held back in the long-running processes (worker, gateway), and
the ClickHouse client's warnings about a server it did not reach left to a one-shot command's error.

While the broker is unreachable, the Kafka clients report every failed connection attempt:
aiokafka (Faust's consumer) and librdkafka (the producer, the raw consumer) together wrote about
80 lines a second, nearly all the same few lines. While a ClickHouse server is, its HTTP client
adds two warnings to each retry the worker logs itself (urllib3 retrying, clickhouse-connect's
"Unexpected Http Driver Exception"), each naming the request's own query id.
``HoldBackRepeats`` lets one line of a kind through every ``every`` seconds; the next one that
passes says how many like it were held back. Lines from other loggers (alerts, retries, the
pipeline's own warnings) pass untouched.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

# the loggers of the Kafka clients: aiokafka's own, librdkafka's (routed here by the ``logger``
# setting of the confluent-kafka clients), and the clients' error callbacks
RDKAFKA_LOGGER = logging.getLogger("vigil.rdkafka")
KAFKA_LOGGERS = ("aiokafka", RDKAFKA_LOGGER.name, "vigil.producer", "vigil.consumer")
# and the ClickHouse HTTP client's
CLIENT_LOGGERS = (*KAFKA_LOGGERS, "urllib3", "clickhouse_connect")
# what tells lines of a kind apart, blanked: numbers, and ids such as a query's UUID
_NUMBERS = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|\d+"
)
_KINDS_KEPT = 1000  # a bound on the kinds remembered; older ones are forgotten past it


class HoldBackRepeats(logging.Filter):
    """Passes a record from ``loggers`` only if no record of its kind (logger, level, message
    with its numbers blanked out) passed in the last ``every`` seconds. Thread-safe."""

    def __init__(
        self,
        loggers: tuple[str, ...] = CLIENT_LOGGERS,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._loggers = loggers
        self._children = tuple(f"{name}." for name in loggers)
        self._every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[tuple[str, int, str], tuple[float, int]] = {}  # -> (passed at, held)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name not in self._loggers and not record.name.startswith(self._children):
            return True
        message = record.getMessage()
        kind = (record.name, record.levelno, _NUMBERS.sub("#", message))
        now = self._clock()
        with self._lock:
            passed, held = self._kinds.get(kind, (-self._every, 0))
            if now - passed < self._every:
                self._kinds[kind] = (passed, held + 1)
                return False
            if len(self._kinds) >= _KINDS_KEPT:
                self._kinds = {k: v for k, v in self._kinds.items() if now - v[0] < self._every}
            self._kinds[kind] = (now, 0)
        if held:
            record.msg = f"{message} (and {held} more like it in the last {now - passed:.0f}s)"
            # no arguments left: an empty tuple, since the worker's formatter (mode's) turns
            # None into (None,) and the line then failed to format, with a traceback in its place
            record.args = ()
        return True


def unreached_server(record: logging.LogRecord) -> bool:
    """Whether ``record`` is one of the ClickHouse HTTP client's warnings about a request that
    did not reach the server: urllib3 retrying it, then clickhouse-connect's "Unexpected Http
    Driver Exception" as it gives up and raises."""
    if record.name.startswith("urllib3."):
        return isinstance(record.msg, str) and record.msg.startswith("Retrying (")
    return record.name.startswith("clickhouse_connect.") and (
        record.msg == "Unexpected Http Driver Exception"
    )


def leave_unreached_to_the_command(logger: logging.Logger | None = None) -> None:
    """Drop ``unreached_server`` records at every handler of ``logger`` (the root logger): for a
    one-shot command, whose own error names the server and the reason ("cannot open ClickHouse
    at http://host:8123: Connection refused"); they were printed, stamped, above it."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(lambda record: not unreached_server(record))


def hold_back_repeats(logger: logging.Logger | None = None) -> None:
    """Install ``HoldBackRepeats`` on every handler of ``logger`` (the root logger)."""
    repeats = HoldBackRepeats()
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(repeats)
