"""Dead letters: a rejected input kept whole, with why it was rejected and where it came from.

Pure. The record is the vigil.DeadLetter Avro schema; ``dlq_id`` is derived from the origin so
that re-processing the same input after a crash stores it once.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any

from pipeline.detectors import PatternTimeout
from pipeline.events import InvalidEvent
from pipeline.redact import DEFAULT_POLICY, Policy, scrub_bytes, scrub_text
from pipeline.rows import Origin

_KEY = re.compile(rb"^([^/\x00]{1,128})/")
MAX_KEPT_PAYLOAD = 256 * 1024
# a message key is a tenant and an agent; one longer than this is kept as its head, so that a
# dead letter (and the DLQ message, keyed as its input was) fits in a Kafka message however
# long the key was: a 600 KB key made a dead letter over the producer's limit, and the worker
# that could not publish it stopped, at each restart
MAX_KEPT_KEY = 1024
# what a dead letter's message takes besides its payload: its key twice (in the letter and as
# the message's), its reason (2,000 characters and the notes on what was kept, at most 4 bytes
# each in UTF-8), its other fields and the message's framing, with room to spare
LETTER_FRAMING = 16 * 1024
# the most bytes a dead letter's message takes
MAX_LETTER_BYTES = MAX_KEPT_PAYLOAD + LETTER_FRAMING


def kept_payload(dlq_bytes: int | None) -> int:
    """How many bytes of its input a dead letter keeps, so that its message fits in a DLQ
    whose messages take ``dlq_bytes`` at most (its max.message.bytes; None where the cluster
    does not say): MAX_KEPT_PAYLOAD, or less for a smaller DLQ. A letter the DLQ refused was
    sent again for ever, holding what came after it."""
    if dlq_bytes is None:
        return MAX_KEPT_PAYLOAD
    return max(0, min(MAX_KEPT_PAYLOAD, dlq_bytes - LETTER_FRAMING))


def kept_key(key: bytes | None) -> bytes | None:
    """What a dead letter keeps of its input's key: at most its first MAX_KEPT_KEY bytes."""
    return key if key is None or len(key) <= MAX_KEPT_KEY else key[:MAX_KEPT_KEY]


def dlq_id(origin: Origin, stage: str) -> str:
    """Deterministic from where the input was read; the events of one EventBatch message each
    have their own (and what is not in one keeps the id it always had)."""
    place = f"{origin.topic}\x00{origin.partition}\x00{origin.offset}\x00{stage}"
    if origin.index is not None:
        place += f"\x00{origin.index}"
    return hashlib.sha256(place.encode()).hexdigest()[:32]


def dead_letter(
    payload: bytes,
    key: bytes | None,
    origin: Origin,
    error: InvalidEvent,
    *,
    stage: str,
    received_at: datetime,
    keep: int = MAX_KEPT_PAYLOAD,
    scrub_with: Policy = DEFAULT_POLICY,
) -> dict[str, Any]:
    """The vigil.DeadLetter record for one rejected input, keeping at most ``keep`` bytes of
    it (``kept_payload``). The tenant hint comes from the message key (``tenant/agent``), never
    from a payload that failed to decode. PII and secrets in the payload and the reason are
    overwritten (same length, so the bytes keep their shape) before the letter goes anywhere,
    with the detectors of ``scrub_with`` (``Config.scrub``: the built-in ones and every
    tenant's custom patterns); what those patterns run out of time on is withheld instead
    (``withheld``)."""
    match = _KEY.match(key or b"")
    reason = error.reason[:2000]
    if len(payload) > keep:
        # a dead letter must itself fit in a Kafka message: an oversized input keeps its head
        reason += f" (dead letter keeps the first {keep:,} of {len(payload):,} bytes)"
        payload = payload[:keep]
    if key is not None and len(key) > MAX_KEPT_KEY:
        reason += f" (its key keeps the first {MAX_KEPT_KEY:,} of {len(key):,} bytes)"
        key = kept_key(key)
    payload, reason = scrubbed(payload, reason, error.code, scrub_with)
    return {
        "dlq_id": dlq_id(origin, stage),
        "stage": stage,
        "reason_code": error.code,
        "reason": reason,
        "origin_topic": origin.topic,
        "origin_partition": origin.partition,
        "origin_offset": origin.offset,
        "origin_key": None if key is None else withheld_key(key, scrub_with),  # the agent's
        "received_at": received_at,
        "tenant_hint": match.group(1).decode(errors="replace") if match else None,
        "event_id_hint": None,
        "payload": payload,
    }


# The parts of a dead letter scrubbed with a policy whose custom patterns may run out of time
# on them (``detectors.PatternTimeout``): a part they could not be run through to the end may
# hold what they look for, so it is not kept. A payload withheld is empty, its reason says so
# (WITHHELD), and ``vigil dlq replay`` reads it again from where it was read (the raw topic),
# while that topic keeps it.
WITHHELD = " bytes are withheld: "


def scrubbed(payload: bytes, reason: str, code: str, policy: Policy) -> tuple[bytes, str]:
    """A letter's payload and reason (of ``code``) scrubbed with ``policy``. Where its custom
    patterns ran out of time on the payload: no payload, and the reason says so; on the reason:
    a reason naming only ``code``, and that the payload is withheld if it is (now, or when the
    letter was made: the DLQ sink scrubs it again), which the replay looks for."""
    withheld = WITHHELD in reason
    try:
        payload = scrub_bytes(payload, policy)
    except PatternTimeout as exc:
        payload, reason = b"", f"{reason} (its {len(payload):,}{WITHHELD}{exc}, scrubbing them)"
        withheld = True
    try:
        return payload, scrub_text(reason, policy)
    except PatternTimeout as exc:
        kept = f"{code}: the reason is withheld ({exc}, scrubbing it)"
        if withheld and not payload:
            kept += f"; the payload's{WITHHELD}read it again from its origin"
        return payload, kept


def withheld_key(key: bytes, policy: Policy) -> bytes:
    try:
        return scrub_bytes(key, policy)
    except PatternTimeout:
        return b"*" * len(key)
