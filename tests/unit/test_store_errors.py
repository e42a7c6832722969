"""How a ClickHouse server that cannot be reached is reported: the reason, not the client's
wrapping of it."""

from __future__ import annotations

import socket

import pytest

from pipeline.store import StoreError, connect, why


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once it is closed


def test_a_server_refusing_connections_is_named_with_the_reason_alone() -> None:
    port = _closed_port()
    with pytest.raises(StoreError) as caught:
        connect(f"http://vigil:pw-s3cret@127.0.0.1:{port}")
    # it was "... Error HTTPConnectionPool(host=...): Max retries exceeded with url:
    # /?query_id=... (Caused by NewConnectionError(...))" and the attempt's URL after it
    assert str(caught.value) == f"cannot open ClickHouse at http://vigil:***@127.0.0.1:{port}: " \
        "Connection refused"  # fmt: skip


def _raised(outer: str, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError(outer) from exc
    except RuntimeError as wrapped:
        return wrapped


def test_the_inner_reason_is_kept_alone_only_where_the_message_quotes_it() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    assert why(_raised("pool: Max retries (Caused by [Errno 111] Connection refused)", refused)) \
        == "Connection refused"  # fmt: skip
    # an OSError under an error whose message does not quote its reason: the message, whole
    locked = _raised("the store at /x is locked by process 42", FileNotFoundError(2, "No such"))
    assert why(locked) == "the store at /x is locked by process 42"
    assert why(ValueError("plain")) == "plain"
    looped = RuntimeError("a cycle")
    looped.__context__ = RuntimeError("back")
    looped.__context__.__context__ = looped
    assert why(looped) == "a cycle"
