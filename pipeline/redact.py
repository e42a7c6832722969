"""The redact stage: no PII or secret an event carries reaches storage.

``redact(event, policy)`` scans every free-text string (content, reasons, descriptions, tool
and error names, attribute values, and the ids the policy names) and, per detected type,
masks it, replaces it by a keyed pseudonym (HMAC-SHA256 per tenant: the same value gives the
same token within a tenant, so joins and counts still work) or drops the whole field. The
event records what was redacted — field, type, count, never the value. Pure.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.detectors import DETECTORS, Detector, Prefilter, default_prefilter, find
from pipeline.events import Actor, Decision, Event, Redaction, Unit

ACTIONS = ("mask", "pseudonymize", "drop")
DROPPED = "[DROPPED]"
# the ids a policy may ask to scan (they are join keys, so scanning them is opt-in)
ID_FIELDS = ("actor.user_id", "unit.id", "session_id", "reviewer_id")
_BODY_TEXT = {
    "interaction": ("input_text", "output_text", "error_type", "finish_reason", "tool_name"),
    "cost": ("description",),
    "drift": ("category",),
    "eval": ("dataset",),
    "decision": ("reason",),
}


class RedactionError(RuntimeError):
    """Redaction could not be done safely; the event must not be stored."""


@dataclass(frozen=True)
class Policy:
    """How one tenant's events are redacted. ``key`` (from the environment) is required when
    any action is ``pseudonymize``; it never appears in reprs."""

    name: str = "default"
    actions: Mapping[str, str] = field(default_factory=dict)
    default_action: str = "mask"
    scan_ids: frozenset[str] = frozenset()
    custom: tuple[Detector, ...] = ()
    key: bytes | None = field(default=None, repr=False)

    def action(self, kind: str) -> str:
        return self.actions.get(kind, self.default_action)

    @functools.cached_property
    def prefilter(self) -> Prefilter:
        """Custom patterns first, so they win overlaps; compiled once per policy."""
        return Prefilter((*self.custom, *DETECTORS)) if self.custom else default_prefilter()


DEFAULT_POLICY = Policy()


class _Dropped(Exception):
    """Internal: the field holding this text is to be dropped."""


def _token(policy: Policy, tenant: str, kind: str, value: str) -> str:
    if policy.key is None:
        raise RedactionError(f"policy {policy.name}: pseudonymize needs a key and none is set")
    digest = hmac.new(policy.key, f"{tenant}\x00{kind}\x00{value}".encode(), hashlib.sha256)
    return f"[{kind.upper()}:{digest.hexdigest()[:12]}]"


def redact_text(text: str, policy: Policy, tenant: str, counts: dict[str, int]) -> str:
    """``text`` with every finding replaced per the policy; ``counts`` gains one per finding.
    Raises _Dropped when a finding's action is drop."""
    findings = find(text, policy.prefilter)
    if not findings:
        return text
    out: list[str] = []
    last = 0
    for kind, start, end in findings:
        counts[kind] = counts.get(kind, 0) + 1
        action = policy.action(kind)
        if action == "drop":
            raise _Dropped
        out.append(text[last:start])
        if action == "pseudonymize":
            out.append(_token(policy, tenant, kind, text[start:end]))
        else:
            out.append(_MASKS.get(kind) or f"[{kind.upper()}]")
        last = end
    out.append(text[last:])
    return "".join(out)


_MASKS = {d.type: f"[{d.type.upper()}]" for d in DETECTORS}


def _scanned_texts(event: Event, policy: Policy) -> list[str]:
    """Every text of ``event`` that ``redact`` scans, empty ones left out."""
    body = event.body
    texts = [value for name in _BODY_TEXT[event.kind] if (value := getattr(body, name))]
    texts += event.attributes.values()
    ids = policy.scan_ids
    if ids:
        if "reviewer_id" in ids and isinstance(body, Decision):
            texts.append(body.reviewer_id)
        if "session_id" in ids and event.session_id:
            texts.append(event.session_id)
        if "unit.id" in ids and event.unit:
            texts.append(event.unit.id)
        if "actor.user_id" in ids and event.actor:
            texts.append(event.actor.user_id)
    return texts


def redact(event: Event, policy: Policy) -> Event:
    """The event with nothing sensitive left in it, and ``redactions`` saying what was found.

    Raises RedactionError when it cannot be done safely (the caller sends the event to the DLQ).
    """
    if not policy.prefilter.may_match(_scanned_texts(event, policy)):
        return event  # nothing to find: one scan, the same object, no copies on the hot path
    tenant = event.tenant_id
    records: list[Redaction] = list(event.redactions)

    def scrub(name: str, value: str | None, *, required: bool = False) -> str | None:
        if not value:
            return value
        counts: dict[str, int] = {}
        result = redact_text_or_drop(value, policy, tenant, counts)
        if result is None and required:
            result = DROPPED
        records.extend(Redaction(name, kind, n) for kind, n in sorted(counts.items()))
        return result

    body_changes = {
        name: scrub(name, getattr(event.body, name))
        for name in _BODY_TEXT[event.kind]
        if getattr(event.body, name)
    }
    if "reviewer_id" in policy.scan_ids and event.kind == "decision":
        body_changes["reviewer_id"] = scrub("reviewer_id", event.body.reviewer_id, required=True)  # type: ignore[union-attr]
    attributes: dict[str, str] = {}
    for key, value in event.attributes.items():
        scrubbed = scrub(f"attributes.{key}", value)
        if scrubbed is not None:
            attributes[key] = scrubbed
    changes: dict[str, object] = {"attributes": attributes}
    if "session_id" in policy.scan_ids:
        changes["session_id"] = scrub("session_id", event.session_id)
    if event.unit and "unit.id" in policy.scan_ids:
        changes["unit"] = Unit(
            event.unit.type, scrub("unit.id", event.unit.id, required=True) or DROPPED
        )
    if event.actor and "actor.user_id" in policy.scan_ids:
        changes["actor"] = Actor(
            scrub("actor.user_id", event.actor.user_id, required=True) or DROPPED, event.actor.role
        )
    if len(records) == len(event.redactions):
        return event  # nothing found: the same object, no copies on the hot path
    body = dataclasses.replace(event.body, **body_changes)  # type: ignore[arg-type]
    return dataclasses.replace(event, body=body, redactions=tuple(records), **changes)  # type: ignore[arg-type]


def redact_text_or_drop(
    text: str, policy: Policy, tenant: str, counts: dict[str, int]
) -> str | None:
    """``redact_text`` for callers outside the stage: None where the policy drops the field."""
    try:
        return redact_text(text, policy, tenant, counts)
    except _Dropped:
        return None


def scrub_bytes(payload: bytes) -> bytes:
    """Raw bytes with every finding overwritten by ``*`` of the same length, so a dead letter
    keeps its shape (Avro lengths stay valid) but none of the sensitive values."""
    text = payload.decode("latin-1")  # one char per byte, so offsets map back exactly
    findings = find(text)
    if not findings:
        return payload
    chars = bytearray(payload)
    for f in findings:
        chars[f.start : f.end] = b"*" * (f.end - f.start)
    return bytes(chars)


def scrub_text(text: str) -> str:
    """Plain text (a DLQ reason) with findings masked."""
    result = redact_text_or_drop(text, DEFAULT_POLICY, "", {})
    return DROPPED if result is None else result
