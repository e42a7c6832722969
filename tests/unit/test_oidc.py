"""Vigil's OAUTHBEARER tokens for aiokafka, from a token endpoint on 127.0.0.1 (the tests'
``TokenIssuer``): kept and shared, asked for again when due, and every failure named without
the secret."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest
from aiokafka.errors import KafkaConnectionError

from pipeline.kafkaconn import OidcClient
from pipeline.oidc import (
    DEFAULT_LIFETIME_SECONDS,
    RETRY_SECONDS,
    OidcError,
    OidcTokens,
    _lifetime,
    fetch_token,
)
from pipeline.services import free_port
from tests.oidc_issuer import TokenIssuer

SECRET = "s3cr:et%20 with/odd+chars"  # sent form-encoded (RFC 6749 2.3.1), read back as is


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenIssuer]:
    clients = {"vigil": SECRET, "no-sub": SECRET}
    folder = tmp_path_factory.mktemp("oidc")
    with TokenIssuer(folder, clients, lifetime=600, without_sub=frozenset({"no-sub"})) as issuer:
        yield issuer


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "==="))
    return claims


def test_a_token_is_kept_and_asked_for_again_at_80_percent_of_its_life(
    issuer: TokenIssuer,
) -> None:
    now = [1000.0]
    tokens = OidcTokens(OidcClient(issuer.url, "vigil", SECRET, scope="kafka"), lambda: now[0])
    before = len(issuer.issued)
    first = asyncio.run(tokens.token())
    assert _claims(first)["sub"] == "vigil"
    now[0] += 479  # 600 s tokens: renewed from 480 s on
    assert tokens.current() == first
    assert issuer.issued[before:] == [("vigil", "vigil")]  # asked once, as "vigil"
    now[0] += 1
    assert _claims(tokens.current())["sub"] == "vigil"
    assert len(issuer.issued) == before + 2  # (the same second's token may be the same JWT)


def test_a_provider_down_is_waited_out_on_the_token_held_then_a_connection_error(
    issuer: TokenIssuer,
) -> None:
    """A renewal the provider fails keeps the token held until it expires, asking again at
    most every RETRY_SECONDS; with none left, aiokafka is told its connection failed (which it
    retries), not an error it takes for a crash."""
    now = [1000.0]
    tokens = OidcTokens(OidcClient(issuer.url, "vigil", SECRET), lambda: now[0])
    held = tokens.current()
    before = len(issuer.issued)
    issuer.down = True
    try:
        now[0] += 500  # due (480 s), not expired (600 s)
        assert tokens.current() == held
        now[0] += RETRY_SECONDS / 2
        assert tokens.current() == held  # not asked again yet
        now[0] += 100  # expired
        with pytest.raises(KafkaConnectionError, match=r"refused a token: HTTP 503"):
            asyncio.run(tokens.token())
        with pytest.raises(OidcError):
            tokens.current()  # the same failure, within RETRY_SECONDS: not asked
    finally:
        issuer.down = False
    assert issuer.down_answers == 2  # at 500 s and at 600 s, not at the calls between
    assert len(issuer.issued) == before  # nothing issued while down
    now[0] += RETRY_SECONDS
    assert _claims(tokens.current())["sub"] == "vigil"  # back: a new token
    assert len(issuer.issued) == before + 1


def test_a_refused_or_unreached_endpoint_is_named_without_the_secret(
    issuer: TokenIssuer,
) -> None:
    with pytest.raises(OidcError) as refused:
        fetch_token(OidcClient(issuer.url, "vigil", "not-" + SECRET))
    assert str(refused.value) == (
        f"the token endpoint {issuer.url} (client vigil) refused a token: HTTP 401 (invalid_client)"
    )
    assert issuer.refused[-1] == "vigil"

    nowhere = f"http://127.0.0.1:{free_port()}/token"
    with pytest.raises(OidcError) as unreached:
        fetch_token(OidcClient(nowhere, "vigil", SECRET), timeout=5)
    said = str(unreached.value)
    assert said.startswith(f"cannot reach the token endpoint {nowhere} (client vigil): ")
    assert "refused" in said.lower() and SECRET not in said


def test_a_tokens_lifetime_is_expires_in_else_its_exp_claim() -> None:
    def jwt(claims: dict[str, object]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"e30.{body}.c2ln"

    assert _lifetime({"expires_in": 90}, "opaque") == 90.0
    assert 3590 < _lifetime({}, jwt({"exp": int(time.time()) + 3600})) <= 3600
    assert _lifetime({"expires_in": True}, "opaque") == DEFAULT_LIFETIME_SECONDS
    assert _lifetime({}, "opaque") == DEFAULT_LIFETIME_SECONDS
    assert _lifetime({}, jwt({"sub": "x"})) == DEFAULT_LIFETIME_SECONDS


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        # a misconfigured proxy's 200
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", "answered without an access_token"),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\n<html>", "answered something that is not JSON"),
        # cut short: http.client's IncompleteRead, not an OSError, once escaped to aiokafka
        (b"HTTP/1.0 200 OK\r\nContent-Length: 900\r\n\r\n{\"access", "cannot reach"),
        (b"", "cannot reach"),  # closed without a word: RemoteDisconnected
        (b"SMTP ready\r\n", "cannot reach"),  # not HTTP: BadStatusLine, not an OSError either
    ],
)  # fmt: skip
def test_an_answer_that_is_no_token_is_named(reply: bytes, says: str) -> None:
    """Whatever the endpoint answers, an OidcError (which aiokafka is told as a connection
    failure), naming the client, not the secret."""

    class Answer(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.wfile.write(reply)
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/token"
    try:
        with pytest.raises(OidcError) as failed:
            fetch_token(OidcClient(url, "c", SECRET), timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert "(client c)" in str(failed.value) and says in str(failed.value)
    assert SECRET not in str(failed.value)


def test_vigil_check_names_the_tokens_sub_or_says_it_names_none(issuer: TokenIssuer) -> None:
    """The principal ``vigil check`` names for a token is its ``sub``; a token without one is
    said to name none (the cluster's own rules then name the principal), and a refusal fails
    without the secret."""
    from pipeline.check import FAIL, OK, _token

    found, sub = _token(OidcClient(issuer.url, "vigil", SECRET), 10)
    assert (found.status, sub) == (OK, "vigil") and found.detail.endswith("for sub vigil")
    found, sub = _token(OidcClient(issuer.url, "no-sub", SECRET), 10)
    assert (found.status, sub) == (OK, None)
    assert found.detail.endswith("it names no sub: the cluster's rules name it"), found.detail
    found, sub = _token(OidcClient(issuer.url, "vigil", "not-the-secret"), 10)
    assert (found.status, sub) == (FAIL, None) and "not-the-secret" not in found.detail
