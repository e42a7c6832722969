"""Serving an embedded ClickHouse store to other processes.

chDB lets one process open a data path. The owner starts ``OwnerServer`` (loopback HTTP,
a random port, a random token) and writes ``<home>/clickhouse.owner.json`` (mode 0600); other
processes find it with ``find_owner`` and get a ``RemoteStore``. Only read-only queries are
served: the ledger cannot be changed through this door.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Generator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pipeline.prometheus import same_secret
from pipeline.store import (
    DEFAULT_QUERY_BYTES,
    RAW_PIECE_BYTES,
    ClickHouseStore,
    StoreError,
    utf8_query,
)

log = logging.getLogger(__name__)
OWNER_FILE = "clickhouse.owner.json"
_MAX_QUERY_BYTES = 1 << 20
# a served query's result, in ClickHouse's blocks: the owner keeps it in a temporary file (and
# the engine holds the formats it does not stream: PrettyCompact, JSON, CSVWithNames...)
SERVED_RESULT_BYTES = 1 << 30
_CLIENT_SECONDS = 300.0  # at least; a client waits for the lock as well as for its query


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RemoteStore:
    """A read-only Store backed by the owner process's endpoint."""

    def __init__(self, url: str, token: str, pid: int, query_seconds: float = 0.0) -> None:
        self.url = url
        self._token = token
        self.pid = pid
        self._timeout = max(_CLIENT_SECONDS, query_seconds + 60)

    def __repr__(self) -> str:
        return f"RemoteStore({self.url}, owner pid {self.pid})"

    def query_raw(self, sql: str, fmt: str = "PrettyCompact", *, readonly: bool = True) -> bytes:
        if not readonly:
            raise StoreError(
                f"the embedded store is owned by process {self.pid}; only read-only queries "
                "are served to other processes (stop it to write)"
            )
        return b"".join(self.stream_raw(sql, fmt))

    def stream_raw(self, sql: str, fmt: str = "PrettyCompact") -> Generator[bytes, None, None]:
        # the owner answers once the query has ended (at most SERVED_RESULT_BYTES, kept in a
        # temporary file); read here as it comes
        query = urllib.parse.urlencode({"format": fmt})
        request = urllib.request.Request(
            f"{self.url}/query?{query}",
            data=utf8_query(sql).encode(),
            headers={"Authorization": f"Bearer {self._token}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                while piece := response.read(RAW_PIECE_BYTES):
                    yield bytes(piece)
        except urllib.error.HTTPError as exc:
            raise StoreError(exc.read().decode(errors="replace")) from None
        except OSError as exc:
            raise StoreError(
                f"owner process {self.pid} at {self.url} did not answer: {exc}"
            ) from None

    def query_rows(
        self, sql: str, settings: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        if settings:  # only the writer's own queries set any, and writes stay with the owner
            raise StoreError(
                f"the embedded store is owned by process {self.pid}; its endpoint runs queries "
                "with the owner's settings"
            )
        return list(self.stream_rows(sql))

    def stream_rows(self, sql: str) -> Generator[tuple[Any, ...], None, None]:
        # read a line (a row) at a time, so that a long answer is never held as bytes and rows;
        # in JSONEachRow, which the owner's engine writes as it goes (JSONCompactEachRow it
        # writes whole, in memory: 1.2 GB for a trail of 300,000 events)
        held = b""
        answer = self.stream_raw(
            f"{sql} SETTINGS output_format_json_quote_64bit_integers=0, "
            "output_format_json_quote_decimals=0",
            "JSONEachRow",
        )
        width = 0  # the columns of a row: a row read as a dict of fewer had a name twice
        for piece in answer:  # a newline ends a row: JSON writes one inside a string as \n
            *rows, held = (held + piece).split(b"\n")
            for line in filter(None, rows):
                if not width:
                    width = len(json.loads(line, object_pairs_hook=list))
                named = json.loads(line)  # twice as fast as pair by pair
                yield tuple(named.values()) if len(named) == width else _row(line)
        if held:
            yield _row(held)

    def long_query(self) -> tuple[int, Mapping[str, Any]]:
        return (DEFAULT_QUERY_BYTES, {})  # the owner's endpoint takes no settings

    def command(self, sql: str) -> None:
        self.query_raw(sql, readonly=False)

    def insert(
        self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str], dedup_token: str
    ) -> None:
        self.query_raw(f"INSERT INTO {table}", readonly=False)  # raises: writes stay with the owner

    def close(self) -> None:
        return None


class _Object(list[tuple[str, Any]]):
    """A JSON object's pairs, as read: in order, a name given twice kept twice."""


def _row(line: bytes) -> tuple[Any, ...]:
    """The values of a JSONEachRow line, in the order of its columns (two columns of one name,
    as ``SELECT 1, 1`` has, each in its place; a map or named tuple within, a dict)."""
    return tuple(_plain(value) for _, value in json.loads(line, object_pairs_hook=_Object))


def _plain(value: Any) -> Any:
    if isinstance(value, _Object):
        return {name: _plain(v) for name, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def find_owner(home: Path) -> RemoteStore | None:
    """The live owner's store, or None (a stale file from a killed owner is removed)."""
    path = home / OWNER_FILE
    try:
        info = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not _pid_alive(int(info["pid"])):
        path.unlink(missing_ok=True)
        return None
    return RemoteStore(
        info["url"], info["token"], int(info["pid"]), float(info.get("query_seconds", 0))
    )


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("owner endpoint: " + format, *args)

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(200 if self.path == "/ping" else 404, b"ok\n")

    def do_POST(self) -> None:
        if not same_secret(self.headers.get("Authorization", ""), f"Bearer {self.server.token}"):
            self._reply(401, b"missing or wrong owner token\n")
            return
        url = urllib.parse.urlparse(self.path)
        length = self.headers.get("Content-Length") or "0"
        if url.path != "/query" or not length.isdigit() or int(length) > _MAX_QUERY_BYTES:
            # (a length that is no number raised ValueError here; a negative one read to EOF)
            self._reply(404 if url.path != "/query" else 413, b"POST /query with SQL\n")
            return
        fmt = urllib.parse.parse_qs(url.query).get("format", ["PrettyCompact"])[0]
        # bytes that are not UTF-8 are named by the store's check, not a UnicodeDecodeError here
        sql = self.rfile.read(int(length)).decode(errors="surrogateescape")
        server = self.server
        # the answer is kept in a temporary file as the engine gives it, then sent at the
        # reader's pace: held in memory, a trail of 300,000 events grew the worker by 900 MB;
        # streamed to the reader as it came, a slow reader would hold the worker's writes
        with tempfile.TemporaryFile(prefix="vigil-served-") as answer:
            pieces = server.store.stream_raw(sql, fmt, limits=server.limits)
            try:
                for piece in pieces:
                    answer.write(piece)
            except StoreError as exc:
                self._reply(400, f"{exc}{_limit_hint(str(exc), server.limits)}".encode())
                return
            except OSError as exc:  # the temporary file's disk is full
                self._reply(507, f"the owner could not keep the answer: {exc}\n".encode())
                return
            finally:
                pieces.close()  # the store is the writer's again
            self.send_response(200)
            self.send_header("Content-Length", str(answer.tell()))
            self.end_headers()
            answer.seek(0)
            try:
                shutil.copyfileobj(answer, self.wfile, RAW_PIECE_BYTES)
            except OSError as exc:  # the reader left (`vigil sql ... | head`)
                log.debug("owner endpoint: the reader left before the answer ended: %s", exc)


def _limit_hint(message: str, limits: Mapping[str, int]) -> str:
    """What to do when a served query met one of the owner's limits (empty for other errors)."""
    if "(TIMEOUT_EXCEEDED)" in message:
        return (
            f"\nThe worker owning the embedded store serves a query for "
            f"{limits['max_execution_time']} s (VIGIL_SERVED_QUERY_SECONDS) while its own writes "
            "wait for it: narrow the query, raise the setting, or stop the worker to query the "
            "store directly."
        )
    if "(TOO_MANY_ROWS_OR_BYTES)" in message and "Limit for result exceeded" in message:
        return (
            f"\nThe worker owning the embedded store answers at most "
            f"{limits['max_result_bytes']:,} bytes a query: narrow the query "
            "(LIMIT, fewer columns), or stop the worker to query the store directly."
        )
    return ""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: ClickHouseStore, token: str, query_seconds: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.store = store
        self.token = token
        self.query_seconds = min(query_seconds, 2**31 - 1)  # what a socket's timeout can hold
        # a reader's query holds the store, and the worker's inserts behind it: one with no
        # end (`SELECT * FROM system.numbers`) held them, and grew the worker, until it was
        # killed. A query's own SETTINGS clause still wins (the operator's choice).
        self.limits = {
            "max_execution_time": max(1, math.ceil(self.query_seconds)),
            "max_result_bytes": SERVED_RESULT_BYTES,
        }


class OwnerServer:
    """Serve ``store`` to other processes until ``close``. Starting it publishes the owner file."""

    def __init__(self, store: ClickHouseStore, home: Path, query_seconds: float = 60.0) -> None:
        self._server = _Server(store, secrets.token_urlsafe(24), query_seconds)
        self._path = home / OWNER_FILE
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="vigil-owner", daemon=True
        )

    def start(self) -> OwnerServer:
        self._thread.start()
        host, port = self._server.server_address[:2]
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(
                {
                    "pid": os.getpid(),
                    "url": f"http://{host!s}:{port}",
                    "token": self._server.token,
                    "query_seconds": self._server.query_seconds,
                },
                out,
            )
        tmp.replace(self._path)
        return self

    def close(self) -> None:
        self._path.unlink(missing_ok=True)
        self._server.shutdown()
        self._server.server_close()
