"""PII and secret detectors: a pattern to find candidates and a validator to keep false
positives down (Luhn for cards, mod-97 for IBANs, ``ipaddress`` for IPs, digit counts for
phones). Pure; ``find`` returns non-overlapping findings, longest first where two overlap.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Validator = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class Detector:
    type: str
    pattern: re.Pattern[str]
    validate: Validator | None = None
    group: int = 0  # the capture group that is the sensitive part (0: the whole match)
    hint: str | None = None  # a substring that must be present for the pattern to be worth running


@dataclass(frozen=True, slots=True)
class Finding:
    type: str
    start: int
    end: int


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    if not 13 <= len(digits) <= 19 or not luhn(digits):
        return False
    # issuer prefixes: Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro
    return bool(
        re.match(r"4|5[1-5]|2[2-7]|3[47]|6(?:011|5|4[4-9]|2)|35|3[0689]|5[06789]|6", digits)
    )


_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AT": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21, "CY": 28,
    "CZ": 24, "DE": 22, "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GI": 23,
    "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "KW": 30, "KZ": 20,
    "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18, "NO": 15,
    "PL": 28, "PT": 25, "QA": 29, "RO": 24, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "TR": 26, "UA": 29,
}  # fmt: skip


def iban(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _phone(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    if not 10 <= len(digits) <= 15:
        return False
    # dates and times written with separators are not phone numbers
    return not re.fullmatch(r"\+?\d{4}[-./]\d{2}[-./]\d{2}.*", text.strip())


def _ipv4(text: str) -> bool:
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return not ip.is_unspecified


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return text.count(":") >= 2


def _ssn(text: str) -> bool:
    area, group, serial = text.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _sin(text: str) -> bool:  # Canadian social insurance number
    digits = re.sub(r"\D", "", text)
    return digits[0] not in "08" and luhn(digits)


_B = r"(?<![A-Za-z0-9_])"  # a start boundary that, unlike \b, also works before + and -
_E = r"(?![A-Za-z0-9_])"

DETECTORS: tuple[Detector, ...] = (
    Detector("private_key", re.compile(
        r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )*PRIVATE KEY-----"),
        hint="PRIVATE KEY"),
    Detector("jwt", re.compile(_B + r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{8,}"),
             hint="eyJ"),
    Detector("aws_access_key", re.compile(_B + r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}" + _E)),
    Detector("aws_secret_key", re.compile(
        r"(?i)aws.{0,20}?(?:secret|private).{0,20}?[=:]\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"),
        group=1),
    Detector("github_token", re.compile(
        _B + r"(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})" + _E)),
    Detector("slack_token", re.compile(_B + r"xox[abposr]-[A-Za-z0-9-]{10,}" + _E), hint="xox"),
    Detector("slack_webhook", re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]+"),
             hint="hooks.slack.com"),
    Detector("stripe_key", re.compile(_B + r"(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}" + _E)),
    Detector("anthropic_key", re.compile(_B + r"sk-ant-[A-Za-z0-9_-]{20,}"), hint="sk-ant-"),
    Detector("openai_key", re.compile(
        _B + r"sk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"), hint="sk-"),
    Detector("google_api_key", re.compile(_B + r"AIza[0-9A-Za-z_-]{35}" + _E), hint="AIza"),
    Detector("connection_password", re.compile(
        r"[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/@]{1,64}:([^\s@/]{1,128})@"), group=1, hint="://"),
    Detector("email", re.compile(
        r"[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}" + _E), hint="@"),
    Detector("iban", re.compile(_B + r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?" + _E),
             validate=iban),
    Detector("card", re.compile(_B + r"\d(?:[ -]?\d){12,18}" + _E), validate=_card),
    Detector("us_ssn", re.compile(_B + r"\d{3}-\d{2}-\d{4}" + _E), validate=_ssn),
    Detector("ca_sin", re.compile(_B + r"\d{3}[ -]\d{3}[ -]\d{3}" + _E), validate=_sin),
    Detector("uk_nino", re.compile(
        _B + r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]" + _E)),
    Detector("phone", re.compile(
        r"(?<![\w.+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w-])"
        r"|(?<![\w.+-])\+\d{10,14}(?!\w)"), validate=_phone),
    Detector("ipv4", re.compile(_B + r"(?<!\.)(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)"), validate=_ipv4),
    Detector("ipv6", re.compile(
        r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])"), validate=_ipv6,
        hint=":"),
)  # fmt: skip

SECRET_TYPES = frozenset(
    {"private_key", "jwt", "aws_access_key", "aws_secret_key", "github_token", "slack_token",
     "slack_webhook", "stripe_key", "anthropic_key", "openai_key", "google_api_key",
     "connection_password"}
)  # fmt: skip
PII_TYPES = frozenset(d.type for d in DETECTORS) - SECRET_TYPES


def find(text: str, detectors: Iterable[Detector] = DETECTORS) -> list[Finding]:
    """Every validated finding in ``text``, sorted, without overlaps (earlier detectors and
    longer matches win: a card inside a JWT is part of the JWT)."""
    found: list[Finding] = []
    for det in detectors:
        if det.hint is not None and det.hint not in text:
            continue
        for m in det.pattern.finditer(text):
            start, end = m.span(det.group)
            if start < 0 or (det.validate is not None and not det.validate(m.group(det.group))):
                continue
            found.append(Finding(det.type, start, end))
    if len(found) < 2:
        return found
    found.sort(key=lambda f: (f.start, -(f.end - f.start)))
    kept: list[Finding] = []
    for f in found:
        if kept and f.start < kept[-1].end:
            continue
        kept.append(f)
    return kept
