"""When the certificates Vigil presents or trusts expire, read from their PEM files.

The standard library's ``ssl`` loads certificates but says nothing of a file's dates, so this
reads each certificate's validity from its DER encoding (RFC 5280: Certificate ->
tbsCertificate -> validity -> notAfter) with a reader of ASN.1's tag-length-value, which is
all the walk needs.
"""

from __future__ import annotations

import base64
import logging
import re
from datetime import UTC, datetime
from pathlib import Path

from pipeline.settings import Settings

log = logging.getLogger("vigil.certs")

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
_SEQUENCE, _UTC_TIME, _GENERALIZED_TIME, _VERSION = 0x30, 0x17, 0x18, 0xA0


class CertificateError(ValueError):
    """A file that holds no certificate, or one that does not decode."""


def expiries(path: Path) -> list[datetime]:
    """When each certificate in PEM file ``path`` expires (its notAfter), in file order.
    Raises CertificateError naming the file."""
    try:
        blocks = _PEM.findall(path.read_bytes())
    except OSError as exc:
        raise CertificateError(f"{path}: {exc.strerror or exc}") from None
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
    """The certificate files ``role`` presents or trusts, by the variable that names them."""
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
            found = expiries(path)
            at = max(found) if name.endswith("_CA_LOCATION") else min(found)
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
