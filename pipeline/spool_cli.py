"""``vigil spool show|send FOLDER``: what an SDK spool holds (``connectors.spool``), and sending
it from the command line: for a host whose agent is gone, or will not start again soon, with
events the broker never took. Sending is what an emitter on the folder does (each segment's
records produced again, then the segment deleted), signed in as the ``VIGIL_KAFKA_*`` settings
say, to their raw topic."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from connectors.spool import Segment, survey
from pipeline.settings import ConfigError, Settings, seconds_argument

# how long a message sent again may wait for the broker before it is spooled again
SEND_MESSAGE_TIMEOUT_MS = 30_000


def _folder(text: str) -> Path:
    folder = Path(text)
    if not folder.is_dir():
        raise ConfigError(f"{text}: no such spool folder")
    return folder


def _state(segment: Segment) -> str:
    if segment.held:
        return "held by a running process (writing or sending it)"
    return "waiting" if segment.whole else "waiting; does not read to its end"


def cmd_spool_show(args: argparse.Namespace, settings: Settings) -> int:
    """Each segment with its size, records and state; the totals on stderr."""
    segments, corrupt = survey(_folder(args.folder))
    print(f"{'segment':<44}  {'bytes':>12}  {'records':>8}  state")
    for s in segments:
        records = "?" if s.records is None else f"{s.records:,}"
        print(f"{s.name:<44}  {s.size:>12,}  {records:>8}  {_state(s)}")
    for path in corrupt:
        print(f"{path.name:<44}  {path.stat().st_size:>12,}  {'':>8}  set aside: damaged")
    print(_totals(segments, corrupt), file=sys.stderr)
    return 0


def _totals(segments: list[Segment], corrupt: list[Path]) -> str:
    waiting = [s for s in segments if not s.held]
    events = (
        f"{sum(s.records or 0 for s in waiting):,} event(s)"
        if all(s.records is not None for s in waiting)
        else "events"
    )
    return (
        f"{events} waiting in {len(waiting)} segment(s), {sum(s.size for s in waiting):,} "
        f"bytes; {len(segments) - len(waiting)} held by a running process; {len(corrupt)} set "
        "aside as .corrupt"
    )


def cmd_spool_send(args: argparse.Namespace, settings: Settings) -> int:
    """Send what the folder holds that no running process holds, until it is sent or
    ``--timeout`` passes; progress on stderr. Exit 1 if some is still waiting, or was set
    aside as damaged."""
    from connectors.sdk import DeliveryError, Emitter
    from pipeline.progress import Every

    folder = _folder(args.folder)
    emitter = Emitter.from_settings(
        settings,
        spool=folder,
        resend_seconds=None,  # sent here, on this thread
        config={"message.timeout.ms": SEND_MESSAGE_TIMEOUT_MS},
    )
    deadline = time.monotonic() + args.timeout
    every = Every(settings.progress_seconds)
    while True:
        emitter.send_spooled()
        segments, corrupt = survey(folder, read=False)  # cheap: names and locks
        waiting = [s for s in segments if not s.held]
        if not waiting or time.monotonic() >= deadline:
            break
        if every.due():
            print(f"vigil spool send: {emitter.delivered:,} sent; {_totals(segments, corrupt)}",
                  file=sys.stderr, flush=True)  # fmt: skip
        time.sleep(1.0)  # the broker does not answer yet, or what failed again waits
    try:
        emitter.close(timeout=SEND_MESSAGE_TIMEOUT_MS / 1000)
        failed = ""
    except DeliveryError as exc:
        failed = f"; {exc}"
    segments, corrupt = survey(folder)
    left = [s for s in segments if not s.held]
    print(f"{emitter.delivered:,} event(s) sent to {settings.topics.raw} at {settings.kafka}; "
          f"{_totals(segments, corrupt)}{failed}", file=sys.stderr)  # fmt: skip
    if left:
        print(f"the broker did not take them all within {args.timeout:g} s: run it again",
              file=sys.stderr)  # fmt: skip
    return 1 if left or corrupt or failed else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    spool = sub.add_parser("spool", help="an SDK spool folder: what it holds, and sending it")
    spool_sub = spool.add_subparsers(dest="action", required=True)
    show = spool_sub.add_parser("show", help="each segment, its events and state")
    show.add_argument("folder", help="the spool folder (the Emitter's spool=)")
    show.set_defaults(func=cmd_spool_show)
    send = spool_sub.add_parser("send", help="send what it holds to the raw topic")
    send.add_argument("folder", help="the spool folder (the Emitter's spool=)")
    send.add_argument("--timeout", type=seconds_argument, default=300.0,
                      help="give up after this many seconds (default 300)")  # fmt: skip
    send.set_defaults(func=cmd_spool_send)
