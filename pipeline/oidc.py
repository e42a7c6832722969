"""OAUTHBEARER tokens for aiokafka (under Faust) from an OpenID Connect provider, got as
librdkafka gets its own with ``sasl.oauthbearer.method=oidc``: a POST to the token endpoint
with the client's id and secret (HTTP Basic) and ``grant_type=client_credentials``, the
token kept and asked for again once 80% of its lifetime has passed.

Neither the secret nor a token is ever in a message, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from http.client import HTTPException
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode
from urllib.request import Request, urlopen

from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import KafkaConnectionError

from pipeline.kafkaconn import OidcClient

REFRESH_AT = 0.8  # of a token's lifetime, as librdkafka refreshes its own
TIMEOUT_SECONDS = 10.0
DEFAULT_LIFETIME_SECONDS = 300.0  # a token that says neither expires_in nor exp
RETRY_SECONDS = 2.0  # a provider that failed is asked again no sooner
log = logging.getLogger("vigil.oidc")


class OidcError(Exception):
    """The token endpoint could not be reached, refused the client, or answered no token."""


def fetch_token(client: OidcClient, timeout: float = TIMEOUT_SECONDS) -> tuple[str, float]:
    """A new access token for ``client`` and its lifetime in seconds. Raises OidcError naming
    the endpoint, the client and what went wrong."""
    form = {"grant_type": "client_credentials"}
    if client.scope is not None:
        form["scope"] = client.scope
    # RFC 6749 2.3.1: the id and secret form-encoded before they are joined
    pair = f"{quote(client.client_id, safe='')}:{quote(client.client_secret, safe='')}"
    request = Request(
        client.token_url,
        data=urlencode(form).encode(),
        headers={
            "Authorization": "Basic " + base64.b64encode(pair.encode()).decode(),
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "User-Agent": "vigil",
        },
    )
    where = f"the token endpoint {client.token_url} (client {client.client_id})"
    context = None
    if client.token_url.startswith("https:"):
        cafile = None if client.ca_location is None else str(client.ca_location)
        context = ssl.create_default_context(cafile=cafile)
    try:
        with urlopen(request, timeout=timeout, context=context) as reply:
            answer = json.loads(reply.read())
    except HTTPError as exc:
        raise OidcError(f"{where} refused a token: HTTP {exc.code}{_oauth_error(exc)}") from None
    except (URLError, OSError, HTTPException) as exc:  # HTTPException: a reply cut short
        reason = exc.reason if isinstance(exc, URLError) else exc
        raise OidcError(f"cannot reach {where}: {str(reason) or type(reason).__name__}") from None
    except ValueError:
        raise OidcError(f"{where} answered something that is not JSON") from None
    token = answer.get("access_token") if isinstance(answer, dict) else None
    if not isinstance(token, str) or not token:
        raise OidcError(f"{where} answered without an access_token")
    return token, _lifetime(answer, token)


def _oauth_error(exc: HTTPError) -> str:
    """The OAuth error code of a refusal (RFC 6749 5.2: ``invalid_client``...), if it says one;
    not its description, which a provider may fill with what it was sent."""
    try:
        said = json.loads(exc.read())
    except (ValueError, OSError):
        return ""
    code = said.get("error") if isinstance(said, dict) else None
    return f" ({code})" if isinstance(code, str) and code.isprintable() and len(code) < 64 else ""


def claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, read, not verified (the cluster verifies it); {} for a token that
    is not one."""
    try:
        payload = token.split(".")[1]
        said = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return said if isinstance(said, dict) else {}


def _lifetime(answer: dict[str, Any], token: str) -> float:
    """Seconds the token is good for: the answer's ``expires_in``, else the JWT's ``exp``."""
    expires_in = answer.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        return float(expires_in)
    try:
        return max(float(claims(token)["exp"]) - time.time(), 0.0)
    except (KeyError, TypeError, ValueError):
        return DEFAULT_LIFETIME_SECONDS


class OidcTokens(AbstractTokenProvider):  # type: ignore[misc]  # aiokafka has no types
    """aiokafka's ``sasl_oauth_token_provider``: one token shared by every connection, asked
    for again once ``REFRESH_AT`` of its lifetime has passed. The request runs on a thread, as
    aiokafka calls from the event loop of Faust's consumer thread.

    A provider that cannot give one (down, or refusing) is not the worker's end: the token
    held is given while it lasts (as librdkafka does), the provider is asked again at most
    every ``RETRY_SECONDS``, and meanwhile aiokafka is told its connection failed
    (``KafkaConnectionError``), which it retries; any other error from here it took for a
    crash, and Faust stopped the worker."""

    def __init__(self, client: OidcClient, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = self._expires_at = 0.0
        self._failed: OidcError | None = None  # the last request's, until ``_retry_at``
        self._retry_at = 0.0

    def __repr__(self) -> str:
        return f"OidcTokens({self.client!r})"

    def extensions(self) -> dict[str, str]:
        """What aiokafka sends with each token beside it (librdkafka's are its config's)."""
        return dict(self.client.extensions)

    async def token(self) -> str:
        try:
            return await asyncio.to_thread(self.current)
        except OidcError as exc:
            raise KafkaConnectionError(str(exc)) from None

    def current(self) -> str:
        """The token held, or a new one if there is none or it is due. Raises OidcError when
        there is none to give."""
        with self._lock:
            now = self._clock()
            if self._token is not None and now < self._renew_at:
                return self._token
            if self._failed is None or now >= self._retry_at:
                try:
                    token, lifetime = fetch_token(self.client)
                except OidcError as exc:
                    self._failed, self._retry_at = exc, now + RETRY_SECONDS
                    if self._token is not None and now < self._expires_at:
                        log.warning("%s; the token held lasts %.0f s more",
                                    exc, self._expires_at - now)  # fmt: skip
                else:
                    self._token, self._failed = token, None
                    self._renew_at = now + lifetime * REFRESH_AT
                    self._expires_at = now + lifetime
                    return token
            if self._token is not None and now < self._expires_at:
                return self._token
            assert self._failed is not None
            raise OidcError(str(self._failed))
