"""Generators of realistic PII and secrets (valid checksums) and of look-alikes that are not
PII. Used by the property tests and by the labelled corpus in ``make bench``."""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Callable
from datetime import datetime

from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.detectors import luhn
from pipeline.events import Interaction, event_to_avro
from pipeline.workload import generate

Gen = Callable[[random.Random], str]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _alnum(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def email(rng: random.Random) -> str:
    user = rng.choice(["jane.doe", "j.smith+billing", "ops_team", "m.garcia", "li.wei7"])
    return f"{user}{rng.randint(1, 999)}@{rng.choice(['acme.example', 'mail.globex.co.uk', 'initech.io'])}"


def phone(rng: random.Random) -> str:
    return rng.choice([
        f"+1 ({rng.randint(201, 989)}) {rng.randint(200, 999)}-{_digits(rng, 4)}",
        f"+44 20 {_digits(rng, 4)} {_digits(rng, 4)}",
        f"+49 30 {_digits(rng, 8)}",
        f"({rng.randint(201, 989)}) {rng.randint(200, 999)}-{_digits(rng, 4)}",
        f"{rng.randint(201, 989)}-{rng.randint(200, 999)}-{_digits(rng, 4)}",
        f"+33 6 {_digits(rng, 2)} {_digits(rng, 2)} {_digits(rng, 2)} {_digits(rng, 2)}",
        f"+91{rng.randint(6, 9)}{_digits(rng, 9)}",
    ])  # fmt: skip


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + _digits(rng, length - len(prefix) - 1)
    for check in string.digits:
        if luhn(body + check):
            return body + check
    raise AssertionError("unreachable")


def card(rng: random.Random) -> str:
    prefix, length = rng.choice(
        [("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16)]
    )
    number = _luhn_complete(prefix, length, rng)
    sep = rng.choice(["", " ", "-"])
    if length == 15:
        return sep.join([number[:4], number[4:10], number[10:]])
    return sep.join(number[i : i + 4] for i in range(0, 16, 4))


def iban(rng: random.Random) -> str:
    country, bban_len = rng.choice([("GB", 18), ("DE", 18), ("FR", 23), ("NL", 14), ("ES", 20)])
    if country == "GB":
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + _digits(rng, 14)
    elif country == "NL":
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + _digits(rng, 10)
    else:
        bban = _digits(rng, bban_len)
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(numeric) % 97
    compact = f"{country}{check:02d}{bban}"
    return (
        " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))
        if rng.random() < 0.5
        else compact
    )


def us_ssn(rng: random.Random) -> str:
    return f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def ca_sin(rng: random.Random) -> str:
    number = _luhn_complete(str(rng.randint(1, 7)), 9, rng)
    return f"{number[:3]}-{number[3:6]}-{number[6:]}"


def uk_nino(rng: random.Random) -> str:
    return f"{rng.choice('ABCEGHJKLMNPRSTWXYZ')}{rng.choice('ABCEGHJKLMNPRSTWXYZ')}{_digits(rng, 6)}{rng.choice('ABCD')}"


def ipv4(rng: random.Random) -> str:
    return ".".join(str(rng.randint(1, 254)) for _ in range(4))


def ipv6(rng: random.Random) -> str:
    groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
    return rng.choice(
        [":".join(groups), f"2001:db8::{groups[0]}:{groups[1]}", f"fe80::{groups[2]}"]
    )


def aws_access_key(rng: random.Random) -> str:
    return rng.choice(["AKIA", "ASIA"]) + _alnum(rng, 16, string.ascii_uppercase + string.digits)


def aws_secret_key(rng: random.Random) -> str:
    return "aws_secret_access_key = " + _alnum(rng, 40, string.ascii_letters + string.digits + "/+")


def github_token(rng: random.Random) -> str:
    return (
        rng.choice(["ghp_", "gho_", "ghs_"]) + _alnum(rng, 36)
        if rng.random() < 0.7
        else "github_pat_" + _alnum(rng, 60)
    )


def slack_token(rng: random.Random) -> str:
    return f"xoxb-{_digits(rng, 11)}-{_digits(rng, 12)}-{_alnum(rng, 24)}"


def stripe_key(rng: random.Random) -> str:
    return f"sk_live_{_alnum(rng, 24)}"


def openai_key(rng: random.Random) -> str:
    return rng.choice(["sk-", "sk-proj-"]) + _alnum(
        rng, 48, string.ascii_letters + string.digits + "_-"
    )


def anthropic_key(rng: random.Random) -> str:
    return "sk-ant-api03-" + _alnum(rng, 80, string.ascii_letters + string.digits + "_-")


def google_api_key(rng: random.Random) -> str:
    return "AIza" + _alnum(rng, 35, string.ascii_letters + string.digits + "_-")


def jwt(rng: random.Random) -> str:
    return (
        "eyJhbGciOiJIUzI1NiJ9.eyJ"
        + _alnum(rng, 40, string.ascii_letters + string.digits + "_-")
        + "."
        + _alnum(rng, 43, string.ascii_letters + string.digits + "_-")
    )


def private_key(rng: random.Random) -> str:
    body = "\n".join(_alnum(rng, 64, string.ascii_letters + string.digits + "+/") for _ in range(4))
    kind = rng.choice(["RSA ", "EC ", "OPENSSH ", ""])
    return f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n-----END {kind}PRIVATE KEY-----"


def connection_password(rng: random.Random) -> str:
    return f"{rng.choice(['postgres', 'mysql', 'mongodb+srv', 'redis'])}://app_user:{_alnum(rng, 14)}@db.internal:5432/main"


#: type -> generator; the *secret value* each planted string must lose is given by SENSITIVE_PART
GENERATORS: dict[str, Gen] = {
    "email": email, "phone": phone, "card": card, "iban": iban, "us_ssn": us_ssn, "ca_sin": ca_sin,
    "uk_nino": uk_nino, "ipv4": ipv4, "ipv6": ipv6, "aws_access_key": aws_access_key,
    "aws_secret_key": aws_secret_key, "github_token": github_token, "slack_token": slack_token,
    "stripe_key": stripe_key, "openai_key": openai_key, "anthropic_key": anthropic_key,
    "google_api_key": google_api_key, "jwt": jwt, "private_key": private_key,
    "connection_password": connection_password,
}  # fmt: skip


def sensitive_part(kind: str, planted: str) -> str:
    """The part of a planted string that must not survive (a connection string keeps its
    scheme and host; only the password is secret)."""
    if kind == "connection_password":
        return planted.split(":", 2)[2].split("@", 1)[0]
    if kind == "aws_secret_key":
        return planted.rsplit(" ", 1)[1]
    return planted


# --- look-alikes that must come through untouched --------------------------------------


def lookalike(rng: random.Random) -> str:
    makers: list[Callable[[], str]] = [
        lambda: f"order ORD-{rng.randint(2019, 2026)}-{rng.randint(10000, 99999)}",
        lambda: f"invoice #{_digits(rng, 8)}",
        lambda: "123e4567-e89b-12d3-a456-" + _alnum(rng, 12, "0123456789abcdef"),
        lambda: f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:07Z",
        lambda: f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:33",
        lambda: f"price ${rng.randint(1, 9)},{rng.randint(100, 999)}.{rng.randint(10, 99)}",
        lambda: f"EUR {rng.randint(10, 99999)}.{rng.randint(10, 99)}",
        lambda: f"version {rng.randint(1, 4)}.{rng.randint(0, 20)}.{rng.randint(0, 30)}",
        lambda: f"v{rng.randint(1, 3)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}-rc{rng.randint(1, 5)}",
        lambda: rng.choice(["gpt-4o-2024-08-06", "claude-3-5-sonnet-20241022", "gemini-1.5-pro-002",
                            "meta.llama3-1-70b-instruct-v1:0", "mistral-large-2407", "text-embedding-3-large"]),
        lambda: f"trace {_alnum(rng, 32, '0123456789abcdef')}",
        lambda: f"sha256:{_alnum(rng, 64, '0123456789abcdef')}",
        lambda: f"tracking number 1Z{_alnum(rng, 16, string.ascii_uppercase + string.digits)}",
        lambda: f"{rng.randint(2, 40)} items at {rng.randint(1, 99)}.{rng.randint(0, 99):02d} each",
        lambda: f"ticket T-{rng.randint(100, 99999)} escalated to tier {rng.randint(1, 3)}",
        lambda: f"latency {rng.randint(10, 9999)} ms, p99 {rng.randint(1000, 30000)} ms",
        lambda: f"at 14:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} UTC",
        lambda: rng.choice(["The refund was issued on Monday after review.",
                            "Please summarise the attached contract in three bullet points.",
                            "Customer asked about the premium plan; no changes made.",
                            "Claim approved: water damage covered under section 4.2."]),
        lambda: f"account {rng.randint(10**6, 10**7)}",
        lambda: f"sk-{rng.randint(1, 9)} skew factor",
        lambda: f"ratio 1:{rng.randint(2, 20)}",
    ]  # fmt: skip
    return rng.choice(makers)()


def raw_workload(registry: Registry, now: datetime) -> list[bytes]:
    """Wire bytes of the demo workload's kinds, and of interactions whose texts and attributes
    hold PII and secrets (two in three) or look-alikes, with and without a price in the
    catalog: every field that redact and enrich touch."""
    events = generate(400, now, seed=11, bad_fraction=0.0).events
    rng = random.Random(3)
    for i, base in enumerate(events[:120]):
        secret = openai_key(rng)
        events.append(
            dataclasses.replace(
                base,
                event_id=f"pii-{i}",
                kind="interaction",
                body=Interaction(
                    "openai",
                    "gpt-4o" if i % 2 else "unpriced-model",
                    input_tokens=1200 + i,
                    output_tokens=300,
                    latency_ms=812.5,
                    input_text=f"mail {email(rng)}, card {card(rng)}" if i % 3 else lookalike(rng),
                    output_text=f"call {phone(rng)} from {ipv4(rng)}" if i % 3 else "done",
                ),
                attributes={"note": f"key {secret}" if i % 3 else "none", "n": str(i)},
            )
        )
    return [registry.encode(EVENT_SCHEMA, event_to_avro(e)) for e in events]


# Texts made to be slow to redact: (a piece, how many findings each repeat of it makes). Each
# was quadratic in its length before 2026-12-05 (1 MiB took from 17 s to hours): the regex
# engine ran an unbounded repeat to the end of a stretch from every start inside it, or each
# finding was compared with every one before it.
SLOW_TEXTS: dict[str, tuple[str, int]] = {
    "a run of JWT headers": ("eyJ", 0),
    "a run of JWT headers after dashes": ("-eyJ", 0),
    "private key BEGIN lines and no END line": ("-----BEGIN PRIVATE KEY-----\nMIIE", 0),
    "RSA private key BEGIN lines and no END line": ("-----BEGIN RSA PRIVATE KEY-----x", 0),
    "addresses": ("a@b.co ", 1),
    "IP addresses": ("10.0.0.1 ", 1),
    "short JWTs": ("eyJabcdef.eyJabcdef.abcdefgh ", 1),
    "Slack webhooks": ("https://hooks.slack.com/services/T0 ", 1),
}
