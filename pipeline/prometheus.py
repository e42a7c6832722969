"""The Prometheus text exposition format, as the gateway's and the worker's ``/metrics`` serve
it: a metric family's HELP and TYPE lines, then its samples; and the bearer token a scraper
shows when ``VIGIL_METRICS_TOKEN`` is set."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

Sample = tuple[Mapping[str, str], float]


def family(name: str, kind: str, help_text: str, samples: Sequence[Sample]) -> list[str]:
    """The lines of metric family ``name`` (its full name), of ``kind`` (counter, gauge,
    histogram), with ``samples``."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines(name, samples)]


def lines(name: str, samples: Sequence[Sample]) -> list[str]:
    """One line per sample of ``name``: its labels, if any, then its value."""
    out = []
    for labels, value in samples:
        inner = ",".join(f'{key}="{_escaped(text)}"' for key, text in labels.items())
        out.append(f"{name}{{{inner}}} {value}" if inner else f"{name} {value}")
    return out


def _escaped(value: str) -> str:
    """A label value as the format quotes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# the answer (401) to a scraper without the token
SCRAPER_REFUSED = "/metrics: send Authorization: Bearer <VIGIL_METRICS_TOKEN>\n"


def scraper_allowed(authorization: str | None, token: str | None) -> bool:
    """Whether a request with header ``Authorization: authorization`` may read ``/metrics``:
    always when no ``token`` is set, else only as ``Bearer <token>`` (compared in constant
    time)."""
    if token is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and same_secret(given.strip(), token)


def same_secret(given: str, secret: str) -> bool:
    """``given == secret``, in constant time, whatever characters either holds (compare_digest
    refuses a str with a character past ASCII: a header with one was a 500, not a 401)."""
    return hmac.compare_digest(_utf8(given), _utf8(secret))


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")
