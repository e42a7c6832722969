"""``vigil dlq list|replay``: what was rejected and why, and a second chance for what a
configuration change has since made acceptable.

Replay re-runs each dead letter's payload through the same stages as the worker (validate,
redact, enrich) under today's settings and vigil.yaml. Those that pass are published again to
the raw topic, with their original key, and the worker stores them as it stores anything. A
replay is idempotent: the ledger keeps each event_id once, so replaying twice stores once. The
dead letters themselves stay in ``vigil.dlq``, the history of what was refused. Replay reads
them a page at a time (``replayable_pages``), oldest first, and only those there when it began.
Only payloads that came from Kafka can be replayed (stage ``validate`` or ``ledger``). The
gateway keeps a description of what it rejected, not bytes to resend.

Payloads in the DLQ had their PII overwritten with ``*`` before they were stored. A replayed
event carries those asterisks, never the original values. A letter whose payload was withheld
(a tenant's custom pattern ran out of time scrubbing it: ``dlq.scrubbed``) keeps none; replay
reads its message again from where the validator read it, while that topic keeps it, and runs
it through today's redaction like any other (``Origins``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeline.settings import Settings, config_option, count_argument
from pipeline.store import LIST_FORMATS, Store, options_filter, sql_literal, unheld

if TYPE_CHECKING:
    from confluent_kafka import Consumer

REPLAYABLE_STAGES = ("validate", "ledger")
_REPLAYABLE = f"stage IN ({', '.join(sql_literal(s) for s in REPLAYABLE_STAGES)})"
# Replay reads, checks and publishes this many dead letters at a time, so its memory stays
# bounded however many it selects: a bad deploy that rejects every event for an hour leaves
# millions, of up to 256 KiB each (dlq.MAX_KEPT_PAYLOAD). Pages run along the table's sort key.
REPLAY_PAGE = 5_000
REPLAY_PAGE_BYTES = 64 * 1024 * 1024
# How long an event replay publishes may wait for the broker's acknowledgement; it counts as
# not published after that. At the end, replay waits a little longer than that, at most, so
# that every event has been acknowledged or has failed, and none is left in the producer.
REPLAY_FLUSH_SECONDS = 60.0


def _where(args: argparse.Namespace) -> str:
    return options_filter(("received_at", args.since), reason_code=args.reason,
                          tenant_hint=args.tenant)  # fmt: skip


def _unheld(store: Store, args: argparse.Namespace) -> list[str]:
    """What --reason and --tenant name that no dead letter has (``store.unheld``)."""
    return unheld(store, "vigil.dlq", "dead letter", reason_code=args.reason,
                  tenant_hint=args.tenant)  # fmt: skip


def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.store import open_store

    sql = (
        "SELECT received_at, stage, reason_code, tenant_hint, origin_topic, origin_partition, "
        "origin_offset, payload_bytes, reason FROM vigil.dlq "
        f"WHERE {_where(args)} ORDER BY received_at DESC LIMIT {int(args.limit)}"
    )
    store = open_store(settings)
    try:
        out = store.query_raw(sql, LIST_FORMATS[args.format])
        counts = store.query_rows(
            f"SELECT reason_code, count() FROM vigil.dlq WHERE {_where(args)} GROUP BY 1 "
            "ORDER BY 2 DESC"
        )
        missing = _unheld(store, args) if not counts else []
    finally:
        store.close()
    sys.stdout.buffer.write(out)
    total = sum(int(n) for _, n in counts)
    summary = ", ".join(f"{code} {int(n):,}" for code, n in counts)
    print(f"{total:,} dead letter(s)" + (f": {summary}" if summary else ""), file=sys.stderr)
    for sentence in missing:
        print(f"vigil dlq list: {sentence}", file=sys.stderr)
    return 0


def replayable_pages(
    store: Store, where: str, page_size: int = REPLAY_PAGE, page_bytes: int = REPLAY_PAGE_BYTES
) -> Iterator[list[tuple[Any, ...]]]:
    """The replayable dead letters matching ``where`` (a SQL condition), oldest first, in pages
    of at most ``page_size`` letters and, unless one letter alone is larger, ``page_bytes`` of
    payloads: (dlq_id, stage, origin_key, payload in base64, origin topic, partition, offset,
    whether the payload was withheld: ``dlq.scrubbed``).
    Only those stored before the first page was read: what the worker stores meanwhile waits
    for the next replay, whenever it was received (a letter can be stored long after it was
    rejected, with the worker's backlog). Each page starts after the last letter of the one
    before in the table's order, (received_at, dlq_id), so none is read twice or missed
    whatever the page size, however many share a received_at."""
    from pipeline.dlq import WITHHELD

    selected = f"({where}) AND {_REPLAYABLE}"
    newest = store.query_rows(
        f"SELECT toUnixTimestamp64Milli(max(stored_at)) FROM vigil.dlq WHERE {selected}"
    )[0][0]
    selected += f" AND stored_at <= fromUnixTimestamp64Milli({int(newest)}, 'UTC')"

    def place(dlq_id: str, ms: int) -> str:
        return f"(fromUnixTimestamp64Milli({int(ms)}, 'UTC'), {sql_literal(str(dlq_id))})"

    after = ""
    while True:
        # first where the page ends, from the sizes alone; then its letters
        sizes = store.query_rows(
            "SELECT dlq_id, toUnixTimestamp64Milli(received_at), payload_bytes FROM vigil.dlq "
            f"WHERE {selected}{after} ORDER BY received_at, dlq_id LIMIT {int(page_size)}"
        )
        if not sizes:
            return
        end, weight = 0, 0
        while end < len(sizes) and (end == 0 or weight + int(sizes[end][2]) <= page_bytes):
            weight += int(sizes[end][2])
            end += 1
        last = place(sizes[end - 1][0], sizes[end - 1][1])
        yield store.query_rows(
            "SELECT dlq_id, stage, origin_key, base64Encode(payload), origin_topic, "
            f"origin_partition, origin_offset, position(reason, {sql_literal(WITHHELD)}) > 0 "
            f"FROM vigil.dlq WHERE {selected}{after} "
            f"AND (received_at, dlq_id) <= {last} ORDER BY received_at, dlq_id"
        )
        if len(sizes) < page_size and end == len(sizes):
            return
        after = f" AND (received_at, dlq_id) > {last}"


# how long replay waits for the broker to give back one message a withheld letter names
REREAD_SECONDS = 10.0
# what the broker says of an offset its log no longer holds (deleted by retention: before the
# log's start; a topic made again: past its end)
_GONE = ("_AUTO_OFFSET_RESET", "OFFSET_OUT_OF_RANGE", "_PARTITION_EOF")


class Origins:
    """Messages read again from the topic, partition and offset a dead letter names: the
    payloads withheld from letters (``dlq.scrubbed``). One consumer, assigned to each place in
    turn: it joins no group and commits nothing (the group id is the worker's, which the
    principal may use); created at the first read, closed by ``close``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._consumer: Consumer | None = None

    def read(self, topic: str, partition: int, offset: int) -> tuple[bytes | None, bytes] | None:
        """The key and value of the message at ``offset``, or None where the topic keeps it no
        longer (its retention deleted it). Raises TimeoutError when the broker did not give it
        in REREAD_SECONDS."""
        from confluent_kafka import Consumer, TopicPartition

        from pipeline.logs import RDKAFKA_LOGGER

        if self._consumer is None:
            self._consumer = Consumer({
                **self._settings.kafka.config(), "group.id": self._settings.consumer_group,
                "enable.auto.commit": False, "auto.offset.reset": "error",
                "enable.partition.eof": True, "logger": RDKAFKA_LOGGER,
            })  # fmt: skip
        self._consumer.assign([TopicPartition(topic, partition, offset)])
        try:
            deadline = time.monotonic() + REREAD_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                message = self._consumer.poll(min(left, 1.0))
                if message is None:
                    continue
                if (error := message.error()) is not None:
                    if error.name() in _GONE:
                        return None
                    continue  # the broker out of reach a while, say: librdkafka tries again
                if message.offset() != offset:
                    return None  # that offset is no longer in the log (compacted)
                return message.key(), message.value() or b""
            raise TimeoutError(f"{topic} partition {partition} did not give offset {offset} in "
                               f"{REREAD_SECONDS:g} s")  # fmt: skip
        finally:
            self._consumer.unassign()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 when every selected dead letter was replayed or is still rightly rejected (or its
    withheld payload is no longer kept: ``payload_gone``), 1 when some of those that pass could
    not be published, or some withheld payloads not read again (a replay can simply be run
    again)."""
    from connectors.sdk import DeliveryError, Emitter
    from pipeline.codec import Registry
    from pipeline.config import load_config
    from pipeline.enrich import enrich
    from pipeline.events import InvalidEvent
    from pipeline.rows import Origin
    from pipeline.store import open_store
    from pipeline.validate import route

    config = load_config(settings.config_path, os.environ)
    registry = Registry.load()
    now = datetime.now(UTC)
    # an event not acknowledged in time fails, rather than waiting in the producer's queue
    timeout = {"message.timeout.ms": int(REPLAY_FLUSH_SECONDS * 1000)}
    emitter = None
    if not args.dry_run:
        emitter = Emitter.from_settings(settings, config=timeout)
    selected = passing = unread = 0
    missing: list[str] = []
    still: Counter[str] = Counter()
    origins = Origins(settings)
    store = open_store(settings)
    try:
        total, skipped = (int(n) for n in store.query_rows(
            f"SELECT countIf({_REPLAYABLE}), countIf(NOT {_REPLAYABLE}) "
            f"FROM vigil.dlq WHERE {_where(args)}"
        )[0])  # fmt: skip
        if not total and not skipped:
            missing = _unheld(store, args)
        for page in replayable_pages(store, _where(args), args.page_size):
            for _id, stage, key_b64, payload_b64, topic, partition, offset, withheld in page:
                key = base64.b64decode(key_b64) if key_b64 else None
                payload = base64.b64decode(payload_b64)
                if withheld and not payload and stage == "validate":
                    try:
                        message = origins.read(str(topic), int(partition), int(offset))
                    except TimeoutError as exc:
                        print(f"dlq replay: a withheld payload was not read again: {exc}",
                              file=sys.stderr)  # fmt: skip
                        unread += 1
                        continue
                    if message is None:  # the topic's retention deleted it
                        still["payload_gone"] += 1
                        continue
                    key, payload = message
                try:
                    # the ledger rejects a whole EventBatch it cannot read (an older ledger
                    # during an upgrade would): its events are replayed one by one
                    events = registry.events_in(payload) if stage == "ledger" else [payload]
                except InvalidEvent as exc:
                    still[exc.code] += 1
                    continue
                for event in events:
                    routed = route(
                        event, key, Origin(str(topic), int(partition), int(offset)), registry,
                        settings.limits, now, config.policy_for,
                        lambda e: enrich(e, config.catalog, config.agents),
                    )  # fmt: skip
                    if routed.target != "clean":
                        still[routed.reason_code or "unknown"] += 1
                        continue
                    passing += 1
                    if emitter is not None:
                        emitter.emit_raw(key, event)
            selected += len(page)
            if selected < total:
                print(f"dlq replay: {selected:,} of {total:,} dead letters read, {passing:,} "
                      "events pass", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        store.close()
        origins.close()
        # what was queued is published even when reading stopped part way
        undelivered = 0
        if emitter is not None:
            # what is still in flight then is given up and counted with what failed
            with suppress(DeliveryError):
                emitter.close(REPLAY_FLUSH_SECONDS + 5)
            undelivered = emitter.failed
    verb = "would replay" if args.dry_run else "replayed"
    print(json.dumps({
        "selected": selected, verb.replace(" ", "_"): passing - undelivered,
        "still_rejected": dict(still), "not_replayable": skipped,
    }))  # fmt: skip
    print(
        f"{selected:,} replayable dead letter(s): {verb} {passing - undelivered:,} to "
        f"{settings.topics.raw} (idempotent: an event already stored stays stored once); "
        f"{sum(still.values()):,} still rejected"
        + (f" ({', '.join(f'{k} {n}' for k, n in still.most_common())})" if still else "")
        + (f"; {skipped:,} from the gateway cannot be replayed" if skipped else ""),
        file=sys.stderr,
    )
    for sentence in missing:
        print(f"vigil dlq replay: {sentence}", file=sys.stderr)
    if undelivered:
        print(f"vigil: error: {undelivered:,} of {passing:,} events that pass were not published "
              f"to {settings.topics.raw}; run the replay again", file=sys.stderr)  # fmt: skip
    if unread:
        print(f"vigil: error: {unread:,} withheld payload(s) were not read again from Kafka; run "
              "the replay again", file=sys.stderr)  # fmt: skip
    return 1 if undelivered or unread else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dlq = sub.add_parser("dlq", help="the dead-letter queue: list it, replay what now passes")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    ls = dlq_sub.add_parser("list", help="rejected inputs with their reasons, newest first")
    rp = dlq_sub.add_parser("replay", help="re-ingest the dead letters that pass today's config")
    for p in (ls, rp):
        p.add_argument("--reason", help="only this reason_code (e.g. timestamp_past)")
        p.add_argument("--since", help="only those received from this date (YYYY-MM-DD)")
        p.add_argument("--tenant", help="only this tenant (from the message key)")
    ls.add_argument("--limit", type=count_argument, default=50, help="at most this many (50)")
    ls.add_argument("--format", choices=list(LIST_FORMATS), default="table",
                    help="how to print them (table)")  # fmt: skip
    ls.set_defaults(func=cmd_dlq_list)
    rp.add_argument("--dry-run", action="store_true", help="count, do not publish")
    rp.add_argument(
        "--page-size", type=count_argument, default=REPLAY_PAGE,
        help=f"dead letters read and published at a time (default {REPLAY_PAGE:,})",
    )  # fmt: skip
    config_option(rp, "the policies the dead letters are checked against")
    rp.set_defaults(func=cmd_dlq_replay)
