"""The redact stage: no PII or secret an event carries reaches storage.

``redact(event, policy)`` scans every free-text string (content, reasons, descriptions, tool
and error names, attribute keys and values, and the ids the policy names) and, per detected type,
masks it, replaces it by a keyed pseudonym (HMAC-SHA256 per tenant: the same value gives the
same token within a tenant, so joins and counts still work) or drops the whole field. The
event records what was redacted — field, type, count, never the value. Pure.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.detectors import (
    CUSTOM_PATTERN_SECONDS,
    DETECTORS,
    Deadline,
    Detector,
    Finding,
    Prefilter,
    custom_prefilter,
    default_prefilter,
    find,
)
from pipeline.events import Actor, Decision, Event, Redaction, Unit

ACTIONS = ("mask", "pseudonymize", "drop")
DROPPED = "[DROPPED]"
# the field that records what was found in attribute keys (a key's own name may be the finding)
ATTRIBUTE_KEYS = "attribute_keys"
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
    custom_seconds: float = CUSTOM_PATTERN_SECONDS  # the custom patterns' time on one event
    # ``custom`` by the policies it comes from (``scrub_policy``'s), each compiled as theirs
    groups: tuple[tuple[Detector, ...], ...] = field(default=(), repr=False)

    def action(self, kind: str) -> str:
        return self.actions.get(kind, self.default_action)

    @functools.cached_property
    def prefilter(self) -> Prefilter:
        """Custom patterns first, so they win overlaps, each group compiled once for every
        policy holding it (``custom_prefilter``), then the built-in detectors' prefilter, which
        every policy shares."""
        prefilter = default_prefilter()
        for group in reversed(self.groups or ((self.custom,) if self.custom else ())):
            prefilter = custom_prefilter(group).followed_by(prefilter)
        return prefilter


DEFAULT_POLICY = Policy()


class _Dropped(Exception):
    """Internal: the field holding this text is to be dropped."""


def _token(policy: Policy, tenant: str, kind: str, value: str) -> str:
    if policy.key is None:
        raise RedactionError(f"policy {policy.name}: pseudonymize needs a key and none is set")
    digest = hmac.new(policy.key, f"{tenant}\x00{kind}\x00{value}".encode(), hashlib.sha256)
    return f"[{kind.upper()}:{digest.hexdigest()[:12]}]"


def redact_text(
    text: str,
    policy: Policy,
    tenant: str,
    counts: dict[str, int],
    deadline: Deadline | None = None,
) -> str:
    """``text`` with every finding replaced per the policy; ``counts`` gains one per finding.
    Raises _Dropped when a finding's action is drop; PatternTimeout when the policy's custom
    patterns run past ``deadline`` (the policy's ``custom_seconds`` from their first run if
    None)."""
    findings = find(text, policy.prefilter, deadline or Deadline(policy.custom_seconds))
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


def _scanned(event: Event, policy: Policy) -> list[tuple[str, str]]:
    """(field, text) for every text of ``event`` that ``redact`` scans, empty ones left out, in
    the order their redactions are recorded."""
    body, ids = event.body, policy.scan_ids
    fields = [(name, value) for name in _BODY_TEXT[event.kind] if (value := getattr(body, name))]
    if "reviewer_id" in ids and isinstance(body, Decision) and body.reviewer_id:
        fields.append(("reviewer_id", body.reviewer_id))
    fields += [(f"attributes.{key}", value) for key, value in event.attributes.items() if value]
    if "session_id" in ids and event.session_id:
        fields.append(("session_id", event.session_id))
    if "unit.id" in ids and event.unit and event.unit.id:
        fields.append(("unit.id", event.unit.id))
    if "actor.user_id" in ids and event.actor and event.actor.user_id:
        fields.append(("actor.user_id", event.actor.user_id))
    return fields


def _with_scrubbed(
    event: Event, scrubbed: Mapping[str, str | None], redactions: tuple[Redaction, ...]
) -> Event:
    """``event`` with the fields named in ``scrubbed`` (as ``_scanned`` names them) replaced,
    and ``redactions``. None drops a field; an id that must be present becomes DROPPED."""
    body_changes = {n: v for n, v in scrubbed.items() if n in _BODY_TEXT[event.kind]}
    if "reviewer_id" in scrubbed:
        body_changes["reviewer_id"] = scrubbed["reviewer_id"] or DROPPED
    changes: dict[str, object] = {
        "body": dataclasses.replace(event.body, **body_changes),  # type: ignore[arg-type]
        "redactions": redactions,
    }
    if any(name.startswith("attributes.") for name in scrubbed):
        kept = (
            (key, scrubbed.get(f"attributes.{key}", value))
            for key, value in event.attributes.items()
        )
        changes["attributes"] = {key: value for key, value in kept if value is not None}
    if "session_id" in scrubbed:
        changes["session_id"] = scrubbed["session_id"]
    if "unit.id" in scrubbed and event.unit:
        changes["unit"] = Unit(event.unit.type, scrubbed["unit.id"] or DROPPED)
    if "actor.user_id" in scrubbed and event.actor:
        changes["actor"] = Actor(scrubbed["actor.user_id"] or DROPPED, event.actor.role)
    return dataclasses.replace(event, **changes)  # type: ignore[arg-type]


def _with_keys_scrubbed(event: Event, policy: Policy, deadline: Deadline) -> Event:
    """``event`` with each attribute key that holds a finding replaced by its redacted form (the
    attribute left out where the policy drops), the findings recorded under ATTRIBUTE_KEYS; the
    same object when no key holds one. Two keys redacted alike both stay: the later gets ``#2``."""
    counts: dict[str, int] = {}
    renamed: dict[str, str | None] = {}
    for key in event.attributes:
        found = sum(counts.values())
        result = redact_text_or_drop(key, policy, event.tenant_id, counts, deadline)
        if sum(counts.values()) > found:
            renamed[key] = result
    if not renamed:
        return event
    attributes = {key: value for key, value in event.attributes.items() if key not in renamed}
    for key, new_key in renamed.items():
        if new_key is None:
            continue
        unique, n = new_key, 1
        while unique in attributes:
            n += 1
            unique = f"{new_key}#{n}"
        attributes[unique] = event.attributes[key]
    records = (
        *event.redactions,
        *(Redaction(ATTRIBUTE_KEYS, k, n) for k, n in sorted(counts.items())),
    )
    return dataclasses.replace(event, attributes=attributes, redactions=records)


def redact(event: Event, policy: Policy) -> Event:
    """The event with nothing sensitive left in it, and ``redactions`` saying what was found.

    Raises RedactionError when it cannot be done safely, PatternTimeout when the policy's custom
    patterns take more than its ``custom_seconds`` on the event's texts together (the caller
    sends the event to the DLQ).
    """
    fields = _scanned(event, policy)
    texts = [text for _, text in fields]
    texts += event.attributes  # the keys: one named after a person's address carries it too
    if not policy.prefilter.may_match(texts):
        return event  # nothing to find: one scan, the same object, no copies on the hot path
    deadline = Deadline(policy.custom_seconds)
    if (keyed := _with_keys_scrubbed(event, policy, deadline)) is not event:
        event, fields = keyed, _scanned(keyed, policy)
    records = list(event.redactions)
    scrubbed: dict[str, str | None] = {}
    for name, text in fields:
        counts: dict[str, int] = {}
        result = redact_text_or_drop(text, policy, event.tenant_id, counts, deadline)
        if counts:
            scrubbed[name] = result
            records.extend(Redaction(name, kind, n) for kind, n in sorted(counts.items()))
    if not scrubbed:
        return event  # the prefilter's hits were not findings
    return _with_scrubbed(event, scrubbed, tuple(records))


def redact_text_or_drop(
    text: str,
    policy: Policy,
    tenant: str,
    counts: dict[str, int],
    deadline: Deadline | None = None,
) -> str | None:
    """``redact_text`` for callers outside the stage: None where the policy drops the field."""
    try:
        return redact_text(text, policy, tenant, counts, deadline)
    except _Dropped:
        return None


def scrub_policy(policies: Iterable[Policy]) -> Policy:
    """What dead letters are scrubbed with: the built-in detectors and the custom patterns of
    every policy in ``policies``, whichever tenant a letter seems to be of (its key, the only
    hint, is the sender's to choose), all masked."""
    groups = tuple(dict.fromkeys(p.custom for p in policies if p.custom))
    custom = tuple(detector for group in groups for detector in group)
    return Policy("scrub", custom=custom, groups=groups) if custom else DEFAULT_POLICY


def scrub_bytes(payload: bytes, policy: Policy = DEFAULT_POLICY) -> bytes:
    """Raw bytes with every finding of ``policy``'s detectors (``scrub_policy``) overwritten by
    ``*`` of the same length, so a dead letter keeps its shape (Avro lengths stay valid) but
    none of the sensitive values. Raises PatternTimeout when the policy's custom patterns run
    past its ``custom_seconds`` on them.

    The bytes are read twice: as one character a byte (Latin-1), which any bytes are, and as
    UTF-8, which an event's texts are: read the first way alone, "Müller" was "MÃ¼ller", and
    ``M.ller`` or ``\\w+@corp`` did not find in a dead letter what they find in the event."""
    deadline = Deadline(policy.custom_seconds)  # for both readings together
    spans = [(f.start, f.end) for f in find(payload.decode("latin-1"), policy.prefilter, deadline)]
    # bytes that are not UTF-8 stand for themselves: one character (a lone surrogate) each
    text = payload.decode("utf-8", "surrogateescape")
    if len(text) < len(payload):  # else a character a byte both ways: read already
        spans += _byte_spans(text, find(text, policy.prefilter, deadline))
    if not spans:
        return payload
    chars = bytearray(payload)
    for start, end in spans:
        chars[start:end] = b"*" * (end - start)
    return bytes(chars)


def _byte_spans(text: str, findings: Sequence[Finding]) -> list[tuple[int, int]]:
    """Where ``findings`` (in order, of ``text``, bytes read as UTF-8 with surrogateescape)
    lie in those bytes."""
    spans = []
    at = byte = 0
    for _kind, start, end in findings:
        byte += len(text[at:start].encode("utf-8", "surrogateescape"))
        begin = byte
        byte += len(text[start:end].encode("utf-8", "surrogateescape"))
        spans.append((begin, byte))
        at = end
    return spans


def scrub_text(text: str, policy: Policy = DEFAULT_POLICY) -> str:
    """Plain text (a DLQ reason) with the findings of ``policy``'s detectors masked. Raises
    PatternTimeout as ``scrub_bytes`` does."""
    result = redact_text_or_drop(text, policy, "", {})
    return DROPPED if result is None else result
