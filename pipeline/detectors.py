"""PII and secret detectors: a pattern to find candidates and a validator to keep false
positives down (Luhn for cards, mod-97 for IBANs, octet and group rules for IPs, digit counts for
phones). Pure; ``find`` returns non-overlapping findings, longest first where two overlap.
"""

from __future__ import annotations

import copy
import functools
import re
import re._parser as re_parser  # type: ignore[import-not-found]  # no stub; stable since 3.11
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any, NamedTuple

import regex

from pipeline.hscache import compiled

Validator = Callable[[str], bool]
Match = re.Match[str] | regex.Match[str]

# How long a tenant's custom patterns may run on one event's texts, together, in the process's
# CPU time (``Deadline``). Their time on a text made for them may grow with the square of its
# length, or faster, where the built-in detectors' is linear: ``[a-z]+@corp`` on letters
# followed by no "@corp" took Python's engine 0.2 s on 20,000 of them, 1.1 s on 40,000 (some
# nine minutes on a megabyte). Past this the event goes to the DLQ (``PatternTimeout``)
# instead of holding every event behind it.
CUSTOM_PATTERN_SECONDS = 1.0


class PatternTimeout(Exception):
    """A custom pattern ran past the time its event had for custom patterns. Names the pattern,
    never the text."""


class Deadline:
    """When the custom patterns' time on one event's texts (``CUSTOM_PATTERN_SECONDS``) ends;
    it starts at the first custom pattern run. Their time is the process's CPU time, every
    thread's: the regex module times a search by it (``timeout=``), and so the time between
    searches is counted alike. A pause of the process (stopped, or its machine starved) takes
    none of it; counted on the wall clock between an event's texts, a pause longer than the
    whole time sent the event to the DLQ at its next text."""

    def __init__(self, seconds: float = CUSTOM_PATTERN_SECONDS) -> None:
        self.seconds = seconds
        self._at: float | None = None

    def left(self) -> float:
        if self._at is None:
            self._at = time.process_time() + self.seconds
        return max(self._at - time.process_time(), 0.0)


@dataclass(frozen=True, slots=True)
class Detector:
    type: str
    # a built-in detector's is Python's; a custom one's (a tenant's, from vigil.yaml) is the
    # regex module's, which ``find`` stops at a ``Deadline`` (``custom_detector``)
    pattern: re.Pattern[str] | regex.Pattern[str]
    validate: Validator | None = None
    group: int = 0  # the capture group that is the sensitive part (0: the whole match)
    # characters that may not touch the match on either side. Checked here rather than with
    # look-behind in the pattern: a pattern that starts with a look-behind cannot use the regex
    # engine's fast scan for its first character, which made detection ten times slower.
    fence: str = ""
    right_fence: str | None = None  # when the right side differs (a sentence may end in ".")
    # for patterns too costly for the prefilter, or too wide to start the exact pattern close
    # to the match: a prefix of every match (its end bounds where a match starts); the exact
    # pattern then runs from there
    anchor: str | None = None
    # for patterns whose prefilter matches far more than they accept: a pattern that every
    # accepted match contains (the exact pattern runs from its first end minus the exact
    # pattern's widest match)
    contains: str | None = None
    # a literal every match holds: where the rest of the text lacks it, the exact pattern
    # stops rather than trying every remaining position (patterns that start with a
    # character class cost some 25 ns per character)
    needs: str = ""
    # for patterns with an unbounded repeat, which the regex engine runs to the end of a
    # stretch again from every start inside it, failing each time (a text of "eyJ" repeated,
    # 200,000 characters, took 6 s for jwt; 1 MiB would take minutes): where a match may begin
    # (``lead``), and how much of the text a failed attempt from there rules out for every
    # other start (``fails_through``, matched from the lead: the attempt failed for a reason all
    # of them share; None: the rest of the text). ``find`` then tries each lead once.
    lead: re.Pattern[str] | None = None
    fails_through: re.Pattern[str] | None = None


def custom_detector(name: str, pattern: str) -> Detector:
    """A tenant's detector of type ``name``, its pattern compiled with the regex module (which
    reads Python's syntax), so that ``find`` can stop it at a deadline. Raises re.error or
    regex.error for a pattern either refuses."""
    re.compile(pattern)  # what Python's engine refuses, the prefilter's parser does too
    return Detector(name, regex.compile(pattern))


class Finding(NamedTuple):  # a tuple: built once per finding on the hot path
    type: str
    start: int
    end: int


_DOUBLED = str.maketrans("0123456789", "0246813579")  # 2d, minus 9 when over 9


def luhn(digits: str) -> bool:
    backwards = digits[::-1]
    odd = sum(map(int, backwards[0::2]))
    even = sum(map(int, backwards[1::2].translate(_DOUBLED)))
    return (odd + even) % 10 == 0


# issuer prefixes: Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro
_ISSUER = re.compile(r"4|5[1-5]|2[2-7]|3[47]|6(?:011|5|4[4-9]|2)|35|3[0689]|5[06789]|6")


def _card(text: str) -> bool:
    digits = text.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn(digits) and _ISSUER.match(digits) is not None


_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AT": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21, "CY": 28,
    "CZ": 24, "DE": 22, "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GI": 23,
    "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "KW": 30, "KZ": 20,
    "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18, "NO": 15,
    "PL": 28, "PT": 25, "QA": 29, "RO": 24, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "TR": 26, "UA": 29,
}  # fmt: skip


_BASE36 = str.maketrans({c: str(int(c, 36)) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"})


def iban(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int(rearranged.translate(_BASE36)) % 97 == 1


_NON_DIGIT = re.compile(r"\D")
_DATE = re.compile(r"\+?\d{4}[-./]\d{2}[-./]\d{2}.*")


def _phone(text: str) -> bool:
    digits = _NON_DIGIT.sub("", text)
    # dates and times written with separators are not phone numbers
    return 10 <= len(digits) <= 15 and _DATE.fullmatch(text.strip()) is None


def _ipv4(text: str) -> bool:  # four dotted decimals (the pattern), as ipaddress reads them
    octets = text.split(".")
    if not text.isascii() or any(int(o) > 255 or (len(o) > 1 and o[0] == "0") for o in octets):
        return False  # out of range, or a leading zero (ambiguous: octal to some parsers)
    return text != "0.0.0.0"


def _ipv6(text: str) -> bool:
    # inet_pton reads what ipaddress.IPv6Address reads for the pattern's strings (hex groups
    # and colons; checked on 250,000 random ones) at a tenth of the cost
    try:
        socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        return False
    return text.count(":") >= 2


def _ssn(text: str) -> bool:
    area, group, serial = text.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _sin(text: str) -> bool:  # Canadian social insurance number
    digits = _NON_DIGIT.sub("", text)
    return digits[0] not in "08" and luhn(digits)


_W = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"

DETECTORS: tuple[Detector, ...] = (
    Detector(
        "private_key",
        re.compile(
            # the body is read a run of non-dashes at a time (the END line can only start at a
            # dash): the same lazy match as [\s\S]*?, without trying END at every character
            r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----(?:[^-]++|-)*?-----END (?:[A-Z]+ )*PRIVATE KEY-----"
        ),
        anchor=r"-----BEGIN [A-Z ]{0,30}PRIVATE KEY-----",
        # the body takes anything, so a key's BEGIN line with no END line after it has none
        # after any later BEGIN line either
        lead=re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----"),
    ),
    Detector(
        "jwt",
        re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{8,}"),
        fence=_W,
        anchor=r"eyJ[A-Za-z0-9_-]{5}",
        # the header runs to the end of its run of base64url characters from any start in it,
        # and what follows that end decides for all of them (a later start only has less room)
        lead=re.compile("eyJ"),
        fails_through=re.compile(r"[A-Za-z0-9_-]*"),
    ),
    Detector("aws_access_key", re.compile(r"A(?:KIA|SIA|BIA|CCA)[A-Z0-9]{16}"), fence=_W),
    Detector(
        "aws_secret_key",
        re.compile(
            r"(?i)aws.{0,20}?(?:secret|private).{0,20}?[=:]\s{0,4}[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"
        ),
        group=1,
    ),
    Detector(
        "github_token",
        re.compile(r"gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"),
        fence=_W,
    ),
    Detector("slack_token", re.compile(r"xox[abposr]-[A-Za-z0-9-]{10,250}"), fence=_W),
    Detector(
        "slack_webhook", re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{1,200}")
    ),
    Detector("stripe_key", re.compile(r"[spr]k_(?:live|test)_[A-Za-z0-9]{16,250}"), fence=_W),
    Detector("anthropic_key", re.compile(r"sk-ant-[A-Za-z0-9_-]{20,300}"), fence=_W),
    Detector(
        "openai_key",
        re.compile(r"sk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,300}"),
        fence=_W,
    ),
    Detector("google_api_key", re.compile(r"AIza[0-9A-Za-z_-]{35}"), fence=_W),
    Detector(
        "connection_password",
        re.compile(r"[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/@]{1,64}:([^\s@/]{1,128})@"),
        group=1,
        anchor=r"[A-Za-z][A-Za-z0-9+.-]{1,20}://",  # the scheme: matches start at most 24 back
        needs="://",
    ),
    Detector(
        "email",
        re.compile(
            r"[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9_])"
        ),
        anchor=r"[A-Za-z0-9._%+-]{1,64}@",  # the local part: matches start at most 65 back
        needs="@",
    ),
    Detector(
        "iban",
        re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?"),
        validate=iban,
        fence=_W,
    ),
    Detector("card", re.compile(r"\d(?:[ -]?\d){12,18}"), validate=_card, fence=_W),
    Detector("us_ssn", re.compile(r"\d{3}-\d{2}-\d{4}"), validate=_ssn, fence=_W + "-"),
    Detector("ca_sin", re.compile(r"\d{3}[ -]\d{3}[ -]\d{3}"), validate=_sin, fence=_W + "-"),
    Detector(
        "uk_nino",
        re.compile(r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]"),
        fence=_W,
    ),
    Detector(
        "phone",
        re.compile(r"\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){1,6}"),
        validate=_phone,
        fence=_W + ".+-",
        right_fence=_W,
    ),  # international
    Detector(
        "phone",
        re.compile(r"(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"),
        validate=_phone,
        fence=_W + ".+-",
        right_fence=_W,
    ),  # North American
    Detector(
        "ipv4",
        re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\.?\d)"),
        validate=_ipv4,
        fence=_W + ".",
        right_fence=_W,
    ),
    Detector(
        "ipv6",
        re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])"),
        validate=_ipv6,
        # a valid address either has eight groups or a "::"; times such as 14:56:27 have neither
        contains=r"::|(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}",
        needs=":",
    ),
)

SECRET_TYPES = frozenset(
    {"private_key", "jwt", "aws_access_key", "aws_secret_key", "github_token", "slack_token",
     "slack_webhook", "stripe_key", "anthropic_key", "openai_key", "google_api_key",
     "connection_password"}
)  # fmt: skip
PII_TYPES = frozenset(d.type for d in DETECTORS) - SECRET_TYPES


_LOOKAROUND = re.compile(r"\(\?<?[!=][^()]*(?:\([^()]*\)[^()]*)*\)")


def prefilter_pattern(pattern: str) -> tuple[bytes, bool]:
    """A detector's pattern for the prefilter: look-arounds dropped (the prefilter may only
    match more than the detector, never less), ``(?i)`` turned into a flag."""
    caseless = pattern.startswith("(?i)")
    return _LOOKAROUND.sub("", pattern.removeprefix("(?i)")).encode(), caseless


# what to do about a pattern ``backtracks`` finds
BACKTRACK_ADVICE = (
    "bound its outer repeat ({1,20}), or let the repeated part match a stretch of text one way "
    "only ((a+)+ is a+)"
)


def backtracks(pattern: str) -> bool:
    """Whether ``pattern`` repeats without bound something that holds a repeat of varying
    count, such as ``(a+)+b`` or ``(a{1,20})+b``: Python's regex engine may then take time
    exponential in a text's length to find that a stretch does not match, trying every way of
    sharing it out between the repeats (``(a+)+b`` took 0.4 s over 22 characters, four times
    more for each two more). A repeat of fixed count (``(\\d{3}-)+``) or of at most one
    (``(x?y)+``) inside is not counted; possessive repeats and atomic groups, which do not
    backtrack, Hyperscan refuses."""

    def nested(items: Sequence[tuple[object, Any]], inside: bool) -> bool:
        for op, value in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT"):
                low, high, body = value
                if inside and high > 1 and low != high:
                    return True
                if nested(body, inside or high == re_parser.MAXREPEAT):
                    return True
                continue
            parts = [value[3]] if name == "SUBPATTERN" else value[1] if name == "BRANCH" else []
            if any(nested(part, inside) for part in parts):
                return True
        return False

    return nested(re_parser.parse(pattern), False)


def prefilter_refuses(detectors: Sequence[Detector]) -> tuple[int | None, str] | None:
    """Which of ``detectors`` (a policy's custom ones) the prefilter cannot take, by its index
    (None where it takes each alone but not all together), and why; None when it takes them.
    They are compiled together, once for every use (``custom_prefilter``), and one by one only
    when that fails, to name the one."""
    import hyperscan

    def why(exc: Exception) -> str:
        if "empty" in str(exc):
            return "it matches where there is nothing (it must match at least one character)"
        return f"{str(exc).rstrip('.')} (patterns are scanned with Hyperscan first)"

    try:
        custom_prefilter(tuple(detectors))
        return None
    except hyperscan.error as exc:
        together = exc
    for i, detector in enumerate(detectors):
        try:
            Prefilter((detector,))
        except hyperscan.error as exc:
            return i, why(exc)
    return None, why(together)


class Prefilter:
    """Detectors' patterns in one Hyperscan database: one pass over the text says which
    detectors can match and from where, so the exact Python patterns run only there.
    Python's regex engine scans at some 30-40 MB/s per pattern; twenty patterns in a row
    were the whole cost of redaction.

    Each pattern reports once per scan (``HS_FLAG_SINGLEMATCH``): its first match, the one that
    ends first. Any other match ends no earlier and is at most the pattern's widest match long,
    so every exact match starts at or after ``end - widest``: the exact pattern runs from there.
    Reporting every match instead cost a Python callback per end position (a 40-character
    token matched forty times), which was most of the time.

    Patterns are compiled to read UTF-8 as characters, with Unicode's classes
    (``HS_FLAG_UTF8``, ``HS_FLAG_UCP``), as Python's engine reads a text: read as bytes, ``\\w``,
    ``\\d`` and ``.`` took no letter, digit or character outside ASCII, and ``{n}`` counted
    bytes, so ``\\w+@corp`` was said not to match in "josé@corp", and the value was left in the
    text.

    ``followed_by``: a prefilter whose detectors come after these, scanned as a database of
    its own. A tenant's custom patterns go before the built-in detectors' prefilter this way,
    so a policy compiles only its own patterns: compiled into one database with the built-ins
    (whose Unicode classes are most of the work) each took some 0.3 s and a megabyte; alone,
    milliseconds (docs/benchmarks.md)."""

    def __init__(self, detectors: Sequence[Detector]) -> None:
        import hyperscan

        self._hs = hyperscan
        self._own = own = tuple(detectors)
        self._then: Prefilter | None = None
        self.detectors: tuple[Detector, ...] = own
        patterns, flags = [], []
        # how far back from the first reported end a match may start (None: anywhere)
        self._reach: list[int | None] = []
        for det in own:
            pattern, caseless = prefilter_pattern(det.contains or det.anchor or det.pattern.pattern)
            spans = det.pattern.pattern if det.contains else pattern.decode()
            widest = re_parser.parse(spans).getwidth()[1]
            self._reach.append(widest if widest < 20_000 else None)
            patterns.append(pattern)
            flag = hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_UTF8 | hyperscan.HS_FLAG_UCP
            flags.append(flag | hyperscan.HS_FLAG_CASELESS if caseless else flag)
        # whether a scan of several texts joined by newlines may stand for a scan of each
        self._joinable = self._own_joinable = not any(
            _asserts_an_edge(p.decode()) for p in patterns
        )
        self._db = compiled(patterns, flags, hyperscan.HS_MODE_BLOCK)  # or kept from before
        self._scratch = threading.local()

    def followed_by(self, then: Prefilter) -> Prefilter:
        """This prefilter with ``then``'s detectors after its own (and after those it is
        followed by already), scanned as a database of their own; neither is compiled again."""
        chained = copy.copy(self)
        chained._then = then if self._then is None else self._then.followed_by(then)
        chained.detectors = self._own + chained._then.detectors
        chained._joinable = self._own_joinable and chained._then._joinable
        return chained

    def starts(self, text: str) -> dict[int, int]:
        """Detector index -> the earliest position of ``text`` where it may match; detectors
        absent cannot match. 0 when the text is not ASCII (Hyperscan reports byte offsets)."""
        # valid UTF-8, which a database of UTF-8 patterns must be given: a lone surrogate (JSON
        # can carry one to ``vigil redact``) becomes "?", one character as it was
        data = text.encode("utf-8", "replace")
        return self._starts(data, len(data) == len(text))

    def _starts(self, data: bytes, ascii_only: bool) -> dict[int, int]:
        """``starts`` of the text ``data`` encodes: this database's detectors, then ``then``'s."""
        reach = self._reach
        starts: dict[int, int] = {}

        def on_match(index: int, _start: int, end: int, _flags: int, _ctx: object) -> None:
            back = reach[index]
            start = 0 if back is None or not ascii_only else end - back
            starts[index] = start if start > 0 else 0

        try:
            scratch = self._scratch.value
        except AttributeError:  # the first scan in this thread
            scratch = self._scratch.value = self._hs.Scratch(self._db)
        # positional: the binding parses keywords at a third of the cost of a short scan
        self._db.scan(data, on_match, 0, None, scratch)
        if self._then is not None:
            shift = len(reach)
            for index, start in self._then._starts(data, ascii_only).items():
                starts[index + shift] = start
        return starts

    def may_match(self, texts: Sequence[str]) -> bool:
        """Whether any detector may match in any of ``texts``: False only if none can.

        One scan of them all, joined by newlines: a pattern matching in one text matches in
        them joined, since only an assertion can tell a newline from a text's edge, and
        look-arounds are not in the prefilter. Of the assertions left, ``\\b`` and ``\\B``
        see a newline and a text's edge alike, as a non-word character. A prefilter with a
        pattern asserting the start or the end of the text (``^``, ``$``, ``\\A``, ``\\Z``:
        only a custom one might) scans each text on its own."""
        if self._joinable:
            return bool(self.starts("\n".join(texts)))
        return any(self.starts(text) for text in texts)


_EDGES = frozenset(
    {
        re_parser.AT_BEGINNING,
        re_parser.AT_BEGINNING_STRING,
        re_parser.AT_END,
        re_parser.AT_END_STRING,
    }
)


def _asserts_an_edge(pattern: str) -> bool:
    """Whether ``pattern`` holds ``^``, ``$``, ``\\A`` or ``\\Z`` anywhere."""

    def walk(node: object) -> bool:
        if isinstance(node, re_parser.SubPattern):
            return any((op is re_parser.AT and av in _EDGES) or walk(av) for op, av in node)
        if isinstance(node, tuple | list):
            return any(walk(item) for item in node)
        return False

    return walk(re_parser.parse(pattern))


@functools.lru_cache(maxsize=64)
def custom_prefilter(detectors: tuple[Detector, ...]) -> Prefilter:
    """The prefilter of custom ``detectors`` alone, compiled once for every use: vigil.yaml's
    check of a policy's patterns (``prefilter_refuses``), the policy's prefilter and the dead
    letters' (``redact.scrub_policy``). Each compiled them anew: start-up with ten policies of
    twenty patterns took 9 s, 5 of them compiling the same patterns again. Raises
    hyperscan.error."""
    return Prefilter(detectors)


_DEFAULT_PREFILTER: Prefilter | None = None


def default_prefilter() -> Prefilter:
    """The prefilter of the built-in detectors, compiled on first use (about a second)."""
    global _DEFAULT_PREFILTER
    if _DEFAULT_PREFILTER is None:
        _DEFAULT_PREFILTER = Prefilter(DETECTORS)
    return _DEFAULT_PREFILTER


_LAST_SEPARATOR = re.compile(r".*[ )-]", re.DOTALL)  # greedy: up to the last separator


def _accepted_end(det: Detector, text: str, start: int, end: int) -> int:
    """Where an accepted finding from ``start`` ends, or -1. A greedy pattern may swallow a
    neighbour (a card followed by a year, an IBAN followed by a word) and a regex does not
    backtrack into a validator or a fence, so whole trailing groups are cut until it fits."""
    right = det.fence if det.right_fence is None else det.right_fence
    while end > start:
        fenced = end < len(text) and text[end] in right
        if not fenced and (det.validate is None or det.validate(text[start:end])):
            return end
        if det.validate is None:
            return -1
        last = _LAST_SEPARATOR.match(text, start, end)
        cut = last.end() - 1 if last else -1
        if cut <= start:
            return -1
        end = cut
    return -1


def find(
    text: str, prefilter: Prefilter | None = None, deadline: Deadline | None = None
) -> list[Finding]:
    """Every validated finding in ``text``, sorted by position, without overlaps: where two
    overlap the detector listed first wins (secrets before PII, so a password in a connection
    string is a password, and a card number inside a JWT is part of the JWT). Custom detectors
    run until ``deadline`` (one of CUSTOM_PATTERN_SECONDS from their first run if None); past it
    PatternTimeout is raised."""
    prefilter = prefilter or default_prefilter()
    starts = prefilter.starts(text)
    if not starts:
        return []
    found: list[Finding] = []  # by start; none overlap
    length = len(text)
    for index in sorted(starts) if len(starts) > 1 else starts:
        det = prefilter.detectors[index]
        fence, right, needs = det.fence, det.right_fence, det.needs
        search: Callable[[str, int], Match | None]
        if isinstance(det.pattern, regex.Pattern):  # a custom detector's
            deadline = deadline or Deadline()
            search = partial(_search_until, det.type, det.pattern, deadline)
        elif det.lead is None:
            search = det.pattern.search
        else:
            search = partial(_search_by_leads, det)
        pos = starts[index]
        kept: list[Finding] = []  # this detector's, by start (each search begins past the last)
        earlier = 0  # the first of ``found`` that ends past the last start kept or passed over
        while not needs or text.find(needs, pos) >= 0:
            m = search(text, pos)
            if m is None:
                break
            pos = m.end() if m.end() > m.start() else m.end() + 1  # a custom pattern may match ""
            start, end = m.span(det.group)
            if start < 0 or (start > 0 and text[start - 1] in fence):
                continue
            if det.validate or (end < length and text[end] in (fence if right is None else right)):
                end = _accepted_end(det, text, start, end)  # only when there is something to check
                if end < 0:
                    continue
            # one step through ``found`` over all of this detector's findings, not a pass over
            # it for each: 28,571 addresses in a text took 16 s comparing every pair
            while earlier < len(found) and found[earlier].end <= start:
                earlier += 1
            if earlier < len(found) and found[earlier].start < end:
                continue  # an earlier detector's finding overlaps it
            kept.append(Finding(det.type, start, end))
        if kept:
            found = sorted((*found, *kept), key=_START) if found else kept  # two sorted runs
    return found


_START = itemgetter(1)


def _search_until(
    name: str, pattern: regex.Pattern[str], deadline: Deadline, text: str, pos: int
) -> Match | None:
    """The custom detector ``name``'s ``pattern.search(text, pos)``, stopped at ``deadline``."""
    try:
        return pattern.search(text, pos, timeout=deadline.left())
    except TimeoutError:
        raise PatternTimeout(
            f"the custom pattern {name!r} ran past its {deadline.seconds:g} s, on a text of "
            f"{len(text):,} characters"
        ) from None


def _search_by_leads(det: Detector, text: str, pos: int) -> Match | None:
    """``det.pattern.search(text, pos)``, trying the pattern once at each of its leads
    (``Detector.lead``), and not at those a failed attempt rules out (``fails_through``)."""
    assert det.lead is not None
    while (lead := det.lead.search(text, pos)) is not None:
        begin = lead.start()
        if (m := det.pattern.match(text, begin)) is not None:
            return m
        if det.fails_through is None:
            return None
        ruled_out = det.fails_through.match(text, begin)
        pos = max(ruled_out.end() if ruled_out else begin, begin + 1)
    return None
