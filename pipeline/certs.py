"""When the certificates Vigil presents or trusts expire, read from their PEM files; and the
certificate a server of Vigil's presents, read again when it is renewed (``ServedCertificate``).

The standard library's ``ssl`` loads certificates but says nothing of a file's dates, so this
reads each certificate's validity from its DER encoding (RFC 5280: Certificate ->
tbsCertificate -> validity -> notAfter) with a reader of ASN.1's tag-length-value, which is
all the walk needs.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pipeline.prometheus import family
from pipeline.settings import ServerTLS, Settings

log = logging.getLogger("vigil.certs")

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
_SEQUENCE, _UTC_TIME, _GENERALIZED_TIME, _VERSION = 0x30, 0x17, 0x18, 0xA0


class CertificateError(ValueError):
    """A file that holds no certificate, or one that does not decode."""


def expiries(path: Path) -> list[datetime]:
    """When each certificate in PEM file ``path`` expires (its notAfter), in file order.
    Raises CertificateError naming the file."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{path}: {exc.strerror or exc}") from None
    return expiries_in(pem, path)


def expiries_in(pem: bytes, path: Path) -> list[datetime]:
    """``expiries`` of ``pem``, the contents of file ``path``."""
    blocks = _PEM.findall(pem)
    if not blocks:
        raise CertificateError(f"{path}: no PEM certificate in it")
    out = []
    for i, block in enumerate(blocks, start=1):
        try:
            out.append(_not_after(base64.b64decode(b"".join(block.split()), validate=True)))
        except (ValueError, IndexError) as exc:
            raise CertificateError(f"{path}: certificate {i} does not decode ({exc})") from None
    return out


def _not_after(der: bytes) -> datetime:
    certificate = _inside(der, 0, _SEQUENCE)
    tbs = _inside(der, certificate, _SEQUENCE)
    at = tbs
    if der[at] == _VERSION:
        at = _after(der, at)
    for _ in range(3):  # serialNumber, signature, issuer
        at = _after(der, at)
    validity = _inside(der, at, _SEQUENCE)
    not_after = _after(der, validity)  # past notBefore
    tag, start, end = _tlv(der, not_after)
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ: 1950-2049 (RFC 5280 4.1.2.5.1)
        moment = datetime.strptime(text, "%y%m%d%H%M%SZ")
        if moment.year >= 2050:
            moment = moment.replace(year=moment.year - 100)
    elif tag == _GENERALIZED_TIME:
        moment = datetime.strptime(text, "%Y%m%d%H%M%SZ")
    else:
        raise ValueError(f"notAfter has tag {tag:#x}, not a time")
    return moment.replace(tzinfo=UTC)


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """The tag at ``at``, and where its value starts and ends."""
    tag, length, at = der[at], der[at + 1], at + 2
    if length & 0x80:  # long form: the next (length & 0x7F) bytes
        count = length & 0x7F
        length, at = int.from_bytes(der[at : at + count], "big"), at + count
    if at + length > len(der):
        raise ValueError("a length runs past the end")
    return tag, at, at + length


def _inside(der: bytes, at: int, tag: int) -> int:
    """Where the value of the element at ``at``, which must have ``tag``, starts."""
    found, start, _end = _tlv(der, at)
    if found != tag:
        raise ValueError(f"tag {found:#x} where {tag:#x} was expected")
    return start


def _after(der: bytes, at: int) -> int:
    """Where the element after the one at ``at`` starts."""
    return _tlv(der, at)[2]


WARN_DAYS = 30  # a certificate that expires this soon is worth a warning


def files_of(settings: Settings, role: str) -> dict[str, Path]:
    """The certificate files ``role`` presents or trusts, by the variable that names them; for
    role "kafka", the Kafka clients' alone."""
    security = settings.kafka.security
    files = {"VIGIL_KAFKA_SSL_CA_LOCATION": security.ca_location,
             "VIGIL_KAFKA_SSL_CERT_LOCATION": security.cert_location}  # fmt: skip
    if role == "gateway" and settings.gateway.tls is not None:
        files["VIGIL_GATEWAY_TLS_CERT_LOCATION"] = settings.gateway.tls.cert
    if role == "worker" and settings.worker_tls is not None:
        files["VIGIL_WORKER_TLS_CERT_LOCATION"] = settings.worker_tls.cert
    return {name: path for name, path in files.items() if path is not None}


def standings(settings: Settings, role: str, now: datetime) -> list[tuple[str, str]]:
    """How each certificate file ``role`` presents or trusts stands at ``now``: ("ok" | "soon"
    (within WARN_DAYS) | "expired" | "unreadable", what to say of it). A chain presented is as
    good as its first certificate to expire; a file of CAs trusted, as its last (a bundle may
    keep an old CA beside its successor)."""
    out = []
    for name, path in files_of(settings, role).items():
        try:
            at = _expiry(name, path)
        except CertificateError as exc:
            out.append(("unreadable", f"{name}: {exc}"))
            continue
        days = (at - now).total_seconds() / 86400
        if days < 0:
            out.append(("expired", f"{name}: {path} expired on {at:%Y-%m-%d %H:%M} UTC"))
        elif days < WARN_DAYS:
            out.append(("soon", f"{name}: {path} expires in {days:.0f} day(s), "
                                f"{at:%Y-%m-%d %H:%M} UTC"))  # fmt: skip
        else:
            out.append(("ok", f"{name}: {path} until {at:%Y-%m-%d}"))
    return out


def say_expiring(settings: Settings, role: str) -> None:
    """Log, at start, each certificate of ``role``'s that has expired (ERROR: its TLS
    handshakes fail) or expires within WARN_DAYS (WARNING)."""
    for standing, text in standings(settings, role, datetime.now(UTC)):
        if standing == "soon":
            log.warning("certificate %s", text)
        elif standing != "ok":
            log.error("certificate %s", text)


def _expiry(name: str, path: Path) -> datetime:
    """When the certificate file ``path`` (variable ``name``) stops being good: a chain presented
    as its first certificate to expire, a file of CAs trusted as its last."""
    found = expiries(path)
    return max(found) if name.endswith("_CA_LOCATION") else min(found)


def kafka_expiries(settings: Settings) -> dict[str, datetime]:
    """When the certificates the Kafka clients present and trust expire, by variable, read now:
    the clients read them at start, and keep them until the process restarts. A file that does
    not decode is left out (``say_expiring`` says it)."""
    out = {}
    for name, path in files_of(settings, "kafka").items():
        try:
            out[name] = _expiry(name, path)
        except CertificateError:
            continue
    return out


def expiry_family(
    prefix: str, kafka: Mapping[str, datetime], served: ServedCertificate | None
) -> list[str]:
    """``/metrics``' family of when each certificate a process presents or trusts expires, by
    variable: Kafka's as at start (``kafka_expiries``), the one it serves as renewed."""
    at = dict(kafka)
    if served is not None and served.current.until is not None:
        at[served.name] = served.current.until
    if not at:
        return []
    return family(f"{prefix}_certificate_expiry_timestamp_seconds", "gauge",
                  "When each certificate the process presents or trusts expires (Unix time), by "
                  "the variable naming its file: the one it serves as renewed (read again as its "
                  "files change), Kafka's as its clients loaded them at start.",
                  [({"variable": name}, moment.timestamp())
                   for name, moment in sorted(at.items())])  # fmt: skip


CHECK_SECONDS = 1.0  # a server looks at its certificate's files at most this often
SETTLE_SECONDS = 10.0  # files that do not load are said once they have stayed so this long


@dataclass(frozen=True)
class Loaded:
    """A certificate chain and its key as read from their files, and the TLS context serving
    them. ``until``: when the first of the chain's certificates expires (None where it does not
    decode, which OpenSSL may still have taken)."""

    context: ssl.SSLContext
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    until: datetime | None


# each file's (device, inode, mtime, size), or None where it cannot be looked at
_Files = tuple[tuple[int, int, int, int] | None, ...]


class ServedCertificate:
    """The certificate a server of Vigil's presents (``ServerTLS``), read again when its files
    change, so that a renewal is served without a restart: cert-manager and certbot write new
    files over the old, Kubernetes swaps a mounted secret's at once. The files are looked at as
    a client connects, no more often than every CHECK_SECONDS; a connection keeps the
    certificate it was given. Files that do not load (a key that does not match the certificate,
    as between certbot's swap of one and of the other) leave the served certificate as it is,
    and are said at ERROR once they have stayed so for SETTLE_SECONDS. ``name`` is the variable
    naming the certificate's file, for what is logged. Raises OSError (ssl.SSLError among them)
    when the files do not load at construction."""

    def __init__(
        self, tls: ServerTLS, name: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tls = tls
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()  # the worker's endpoint hands each connection a thread
        self._files = _files(tls)
        self.current = _load(tls)
        self._checked = clock()
        self._failing: tuple[_Files, float] | None = None  # files that did not load, since when
        self._context = self.current.context
        self._context.sni_callback = self._chosen

    def context(self) -> ssl.SSLContext:
        """The context to serve with: each connection is given the latest certificate loaded."""
        return self._context

    def refresh(self) -> None:
        """Load the files again if they changed since they were last loaded (or found not to
        load), looking at them no more often than every CHECK_SECONDS."""
        now = self._clock()
        if now - self._checked < CHECK_SECONDS:
            return
        with self._lock:
            if now - self._checked < CHECK_SECONDS:
                return
            self._checked = now
            files = _files(self.tls)
            if files == self._files:
                return
            try:
                loaded = _load(self.tls)
            except OSError as exc:  # ssl.SSLError is one
                self._not_loaded(files, now, exc)
                return
            if _files(self.tls) != files:  # written while they were read: read at the next look
                return
            self._files, self._failing, before = files, None, self.current
            self.current = loaded
            _say_renewed(self.name, self.tls.cert, loaded.until, before.until)

    def _not_loaded(self, files: _Files, now: float, exc: OSError) -> None:
        if self._failing is None or self._failing[0] != files:
            self._failing = (files, now)  # perhaps half written: looked at again
        elif now - self._failing[1] >= SETTLE_SECONDS:
            self._files = files  # said once, until they change again
            until = self.current.until
            served = f", until {until:%Y-%m-%d %H:%M} UTC" if until else ""
            log.error("%s: %s and %s changed but do not load (%s): still serving the "
                      "certificate loaded before%s", self.name, self.tls.cert, self.tls.key,
                      _reason(exc), served)  # fmt: skip

    def _chosen(self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
                _context: ssl.SSLContext) -> None:  # fmt: skip
        """OpenSSL's callback as a client's hello arrives (with or without a server name): the
        connection is handed the latest certificate."""
        self.refresh()
        if connection.context is not self.current.context:
            connection.context = self.current.context


def _files(tls: ServerTLS) -> _Files:
    out: list[tuple[int, int, int, int] | None] = []
    for path in (tls.cert, tls.key):
        try:
            found = os.stat(path)  # through links: a mounted secret's swap changes the inode
        except OSError:
            out.append(None)
            continue
        out.append((found.st_dev, found.st_ino, found.st_mtime_ns, found.st_size))
    return tuple(out)


def _load(tls: ServerTLS) -> Loaded:
    cert_pem, key_pem = tls.cert.read_bytes(), tls.key.read_bytes()
    context = tls.context()
    try:
        until: datetime | None = min(expiries_in(cert_pem, tls.cert))
    except CertificateError:
        until = None
    return Loaded(context, cert_pem, key_pem, until)


def _reason(exc: OSError) -> str:
    """What went wrong, without a path (the message names the files) or a key's bytes."""
    if isinstance(exc, ssl.SSLError):  # KEY_VALUES_MISMATCH; none for a file OpenSSL cannot read
        return (exc.reason or "not PEM that OpenSSL reads").lower().replace("_", " ")
    return exc.strerror or type(exc).__name__


def _say_renewed(name: str, path: Path, until: datetime | None, before: datetime | None) -> None:
    was = f"; the one before until {before:%Y-%m-%d %H:%M} UTC" if before else ""
    if until is None:
        log.warning("%s: serving the renewed certificate %s, whose expiry does not decode%s",
                    name, path, was)  # fmt: skip
        return
    days = (until - datetime.now(UTC)).total_seconds() / 86400
    level = logging.ERROR if days < 0 else logging.WARNING if days < WARN_DAYS else logging.INFO
    log.log(level, "%s: serving the renewed certificate %s, until %s UTC%s", name, path,
            f"{until:%Y-%m-%d %H:%M}", was)  # fmt: skip
