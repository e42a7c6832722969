"""What a store agent may write: events of the clean and DLQ partitions this worker holds now.

Several workers share a consumer group (and a ClickHouse server), and a rebalance moves
partitions between them. The new owner of a partition reads it again from its last commit and
finds its chain heads and stored keys in ClickHouse. That is right only if the old owner writes
nothing more for the partition once the rebalance is under way; otherwise both write the same
events, each after heads the other has not seen yet: repeats in the ledger and a chain with two
rows at one ``chain_seq``.

The worker does not wait for its streams at a rebalance (``stream_wait_empty`` off: an event not
acknowledged is simply read again), so without a fence the old owner did write on:
- the insert in flight on the ClickHouse thread went on after the revocation returned;
- a batch taken before the rebalance, or a retry of one, was written after it.

Faust's own streams skip a message fetched before the last rebalance, by the rule ``current``
applies: flow control is active and the message's ``generation_id`` is the consumer's. A batch
taken by a store agent is checked by that rule before every attempt to write it (``write``), and
the revocation waits for the attempt in flight (``revoked``), whose insert may already be on
its way. So does a worker that stops, before it leaves its group: it cancels its agents first,
and the insert they were waiting for went on after the group had given its partitions away.
What is dropped is not acknowledged: its partition's owner reads it again. Faust's stream
acknowledges what it skips; here that would let a commit pass an event nobody stored.

What follows an insert that landed (its dead letters, rollups and alerts, the acknowledgement)
runs to its end even if the agent awaiting it is cancelled, and the revocation waits for it too
(``landed``): a stopping worker's last commit then passes the batch, and its rollups and alerts
are published, where a cancelled agent used to leave them to be lost (rollups) or raised late
(alerts). It is waited for a bounded time only, as it may retry ClickHouse or Kafka for as
long as they are away; at a rebalance it finishes afterwards.

A worker cut off from the broker but not from ClickHouse learns that its generation is over only
when the broker answers again; past its session timeout the group has given its partitions to
another worker, which writes them. So an attempt also waits, before it begins, until the broker
has confirmed this worker's membership lately (``since_confirmed`` below ``stale_after``, half
the session timeout): the broker then counted it a member at most that long ago, and no other
worker can own its partitions before the rest of the session timeout has passed. It waits
rather than drops: if the broker answers and the generation holds, the batch is written; if a
rebalance comes instead, it is left to the partitions' owner.

What no fence in this process stops: an insert begun while the membership was confirmed that
is still running past the session timeout (the worker froze, or ClickHouse is slow, meanwhile).
ClickHouse has no transaction that a Kafka generation could fence. Such an insert is reported
once it ends: if the broker has not confirmed the membership for the session timeout by then,
the partitions may have moved while it ran and their new owner may have stored the same events,
and the worker says so, naming the check that finds such repeats (``vigil audit verify``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, Future
from functools import partial
from typing import Any, TypeVar

_T = TypeVar("_T")
log = logging.getLogger("vigil.worker")
# how often a write that waits for the broker to confirm this worker's membership looks again
CONFIRM_POLL_SECONDS = 0.1
# and how often it says again that it waits
WAITING_WARNING_SECONDS = 30.0


def _report_unawaited(messages: int, unit: asyncio.Future[Any]) -> None:
    """Log how a write ended whose agent was cancelled while it ran: nobody else sees it."""
    if not unit.cancelled() and unit.exception() is not None:
        log.warning("a write of %d messages failed after its agent had stopped; its batch is "
                    "read again from the last commit: %s", messages, unit.exception())  # fmt: skip


class Moved(Exception):
    """A batch's partitions were revoked before it was written: another worker owns them now."""


class Fence:
    """The rule a store agent's batches are held to, for the Faust ``app`` it runs in."""

    def __init__(
        self,
        app: Any,
        since_confirmed: Callable[[], float],
        stale_after: float,
        session_timeout: float,
    ) -> None:
        """``since_confirmed()``: seconds since the broker last confirmed that this worker is a
        member of its group (a heartbeat answered, or the partitions assigned); a write waits
        while that is ``stale_after`` or more, and warns if it is ``session_timeout`` or more
        when its attempt ends."""
        self._app = app
        self._since_confirmed = since_confirmed
        self._stale_after = stale_after
        self._session_timeout = session_timeout
        # the attempts running or queued on a ClickHouse thread: the thread's own futures, so
        # that one stays here until its thread is done with it even if the task that awaited
        # it was cancelled (a worker that stops cancels its agents first)
        self._writing: set[Future[Any]] = set()
        # each attempt with what follows it once it lands (``landed``), shielded from the
        # cancellation of the task that awaits it
        self._landing: set[asyncio.Future[Any]] = set()

    def _holds(self, event: Any) -> bool:
        return bool(
            self._app.flow_control.is_active()
            and event.message.generation_id == self._app.consumer_generation_id
        )

    async def current(self, batch: Sequence[Any]) -> list[Any]:
        """The events of ``batch`` fetched since the last rebalance, once none is under way."""
        await self._app.flow_control.acquire()  # a rebalance suspends the flow until it is done
        return [event for event in batch if self._holds(event)]

    async def write(
        self,
        batch: Sequence[Any],
        executor: Executor,
        call: Callable[[], _T],
        landed: Callable[[_T], Awaitable[None]] | None = None,
    ) -> _T:
        """Run ``call`` (one attempt to write ``batch``) on ``executor`` if this worker still
        holds every event of ``batch`` and the broker has confirmed its membership lately (it
        waits for that); raise Moved once it does not hold them. If the attempt succeeds,
        ``landed(result)`` follows it, even if the caller is cancelled meanwhile. ``revoked``
        waits for both."""
        await self._confirmed(batch)
        attempt = executor.submit(call)
        self._writing.add(attempt)
        # called on the executor's thread; a set's add, discard and copy are each one step
        # under the GIL
        attempt.add_done_callback(self._writing.discard)
        unit = asyncio.ensure_future(self._land(batch, attempt, landed))
        self._landing.add(unit)
        unit.add_done_callback(self._landing.discard)
        try:
            return await asyncio.shield(unit)
        except asyncio.CancelledError:
            unit.add_done_callback(partial(_report_unawaited, len(batch)))
            raise

    async def _land(
        self,
        batch: Sequence[Any],
        attempt: Future[_T],
        landed: Callable[[_T], Awaitable[None]] | None,
    ) -> _T:
        try:
            result = await asyncio.wrap_future(attempt)
        finally:
            since = self._since_confirmed()
            if attempt.done() and since >= self._session_timeout:
                log.warning("a write of %d messages ended %.0fs after the broker last confirmed "
                            "this worker's group membership, past the session timeout: its "
                            "partitions may have moved while it ran, and their new owner may "
                            "have stored the same events; run `vigil audit verify` to find "
                            "such repeats",
                            len(batch), since)  # fmt: skip
        if landed is not None:
            await landed(result)
        return result

    async def _confirmed(self, batch: Sequence[Any]) -> None:
        """Return once this worker holds every event of ``batch`` and the broker has counted it
        a member of its group within ``stale_after``; raise Moved when it does not hold them."""
        warned = None  # what since_confirmed() was at the last warning
        while True:
            if not all(self._holds(event) for event in batch):
                raise Moved(f"the partitions of {len(batch)} messages moved to another worker")
            since = self._since_confirmed()
            if since < self._stale_after:
                break
            if warned is None or since - warned >= WAITING_WARNING_SECONDS:
                log.warning("the broker has not confirmed this worker's group membership for "
                            "%.0fs: writes wait for it (past the session timeout, another "
                            "worker may own these partitions)", since)  # fmt: skip
                warned = since
            await asyncio.sleep(CONFIRM_POLL_SECONDS)
        if warned is not None:
            log.info("the broker confirmed this worker's membership again; writes go on")

    async def revoked(self, landing_within: float | None = None) -> None:
        """Return once no write attempt is in flight, and what follows those that landed is
        done (given up waiting for after ``landing_within`` seconds, if set): at a rebalance
        (none starts meanwhile, the flow being suspended) and before a stopping worker leaves
        its group. An attempt's outcome is its batch's to handle."""
        while self._writing:
            waiting = [asyncio.wrap_future(attempt) for attempt in list(self._writing)]
            await asyncio.wait(waiting)
            for waited in waiting:  # each failure is its writer's to handle, not this wait's
                if not waited.cancelled():
                    waited.exception()
        if not self._landing:
            return
        _done, pending = await asyncio.wait(list(self._landing), timeout=landing_within)
        if pending:
            log.warning("what follows %d insert(s) that landed (dead letters, rollups, alerts, "
                        "acknowledgements) did not finish within %.0fs; the partitions are "
                        "given up before it does", len(pending), landing_within)  # fmt: skip
