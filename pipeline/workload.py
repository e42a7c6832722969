"""A synthetic multi-tenant agent workload: what the demo, the tests and the benchmarks send.

Pure and seeded: ``generate`` returns what to send (GenAI spans for the OpenTelemetry path,
events for the SDK path, malformed payloads with the reason each must be rejected for); the
caller decides how to send it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from pipeline.codec import DEAD_LETTER_SCHEMA, EVENT_SCHEMA, HEADER, Registry
from pipeline.events import (
    DECISIONS,
    Actor,
    Body,
    Cost,
    Decision,
    Drift,
    Eval,
    Event,
    Interaction,
    Unit,
    event_to_avro,
)
from pipeline.otel_mapping import SpanView, span_to_event


@dataclass(frozen=True)
class AgentProfile:
    tenant: str
    agent: str
    unit_type: str
    provider: str
    model: str
    legacy_otel_names: bool  # emit gen_ai.system / prompt_tokens instead of the current names


AGENTS = (
    AgentProfile("acme", "support-bot", "ticket", "openai", "gpt-4o-2024-08-06", False),
    AgentProfile(
        "acme", "refund-approver", "ticket", "anthropic", "claude-3-5-sonnet-20241022", True
    ),
    AgentProfile(
        "globex", "claims-triage", "claim", "anthropic", "claude-3-5-haiku-20241022", False
    ),
    AgentProfile("globex", "fraud-screen", "claim", "openai", "gpt-4o-mini", True),
    AgentProfile("initech", "doc-summarizer", "document", "gcp.gemini", "gemini-1.5-pro", False),
    AgentProfile(
        "initech", "contract-review", "document", "mistral_ai", "mistral-large-latest", False
    ),
    AgentProfile(
        "initech", "sql-copilot", "query", "aws.bedrock", "meta.llama3-1-70b-instruct-v1:0", True
    ),
)
TOOLS = ("lookup_customer", "search_kb", "fetch_policy", "run_sql", "create_refund")
UNPRICED = ("sql-copilot", "initech-sql-ft-v3")  # (agent, model missing from the catalog)
EVAL_METRICS = ("faithfulness", "relevance", "safety")  # scores where higher is better
PROMPTS = (
    "My email is {email}, please send the invoice there.",
    "Call me back on {phone} about the refund.",
    "I paid with card {card} and was charged twice.",
    "The error came from {ip} after the last deploy.",
    "{ask}",
)
# per unit type: the request that carries no PII, and what the agent answers
ASKS = {
    "ticket": "Why was my last order delayed?",
    "claim": "Please assess the attached water-damage claim.",
    "document": "Summarise the attached contract in three bullet points.",
    "query": "Which regions grew revenue last quarter?",
}
ANSWERS = {
    "ticket": "I have looked into this and updated the ticket.",
    "claim": "I have reviewed the claim and recorded my assessment.",
    "document": "Here is the summary, with the clauses that need review.",
    "query": "Here is the query and the regions it returns.",
}


@dataclass(frozen=True)
class SpanSpec:
    """One GenAI span to emit through the OpenTelemetry SDK."""

    name: str
    start: datetime
    duration_ms: float
    attributes: dict[str, str | int | float | list[str]]
    output_tokens: int
    error: bool = False


@dataclass(frozen=True)
class BadPayload:
    key: bytes
    value: bytes
    reason_code: str


@dataclass
class Workload:
    spans: list[SpanSpec] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    bad: list[BadPayload] = field(default_factory=list)

    @property
    def valid_count(self) -> int:
        return len(self.spans) + len(self.events)


def _ids(rng: random.Random, run_id: str) -> Iterator[str]:
    # event_id is the pipeline's dedup key: the same seed must not give a second run the first
    # run's ids, or every event of the second run would be dropped as already stored
    while True:
        yield f"{run_id}-{rng.getrandbits(64):016x}{rng.getrandbits(32):08x}"


def _span(
    rng: random.Random,
    p: AgentProfile,
    start: datetime,
    unit: Unit,
    run_id: str,
    session: str,
    user: str,
    tool: str | None,
    output_factor: float = 1.0,
) -> SpanSpec:
    prompt = rng.randint(300, 6000)
    cached = rng.choice((0, 0, prompt // 2, prompt - prompt % 1024))
    output = max(1, int(rng.lognormvariate(5.3, 0.6) * output_factor))
    error = rng.random() < 0.02
    legacy = p.legacy_otel_names
    model = p.model
    if p.agent == UNPRICED[0] and rng.random() < 0.15:
        model = UNPRICED[1]  # a self-hosted fine-tune the price catalog does not know
    attrs: dict[str, str | int | float | list[str]] = {
        ("gen_ai.system" if legacy else "gen_ai.provider.name"): p.provider,
        "gen_ai.request.model": model,
        "gen_ai.response.model": model,
        "gen_ai.operation.name": "execute_tool" if tool else "chat",
        ("gen_ai.usage.prompt_tokens" if legacy else "gen_ai.usage.input_tokens"): prompt,
        ("gen_ai.usage.completion_tokens" if legacy else "gen_ai.usage.output_tokens"): output,
        "gen_ai.response.finish_reasons": ["tool_calls" if tool else "stop"],
        "gen_ai.conversation.id": session,
        "gen_ai.agent.id": p.agent,
        "vigil.tenant_id": p.tenant,
        "vigil.unit.type": unit.type,
        "vigil.unit.id": unit.id,
        "enduser.id": user,
        "demo.run": run_id,
    }
    if cached:
        attrs["gen_ai.usage.cache_read.input_tokens"] = cached
    if tool:
        attrs["gen_ai.tool.name"] = tool
    if rng.random() < 0.2:
        # what users really paste into prompts; the pipeline must redact it before storage
        attrs["gen_ai.input.messages"] = rng.choice(PROMPTS).format(
            email=f"customer{rng.randint(1, 999)}@example.com",
            phone=f"+1 (415) 555-{rng.randint(1000, 9999)}",
            card="4111 1111 1111 1111",
            ip=f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            ask=ASKS[unit.type],
        )
        attrs["gen_ai.output.messages"] = ANSWERS[unit.type]
    if error:
        attrs["error.type"] = rng.choice(("rate_limit", "timeout", "server_error"))
    duration = rng.lognormvariate(math.log(400 + output * 8), 0.3)
    name = f"{'execute_tool ' + tool if tool else 'chat ' + model}"
    return SpanSpec(name, start, duration, attrs, output, error)


def generate(
    target: int,
    now: datetime,
    seed: int = 7,
    run_id: str = "demo",
    bad_fraction: float = 0.015,
    drift: tuple[str, datetime] | None = None,
    window: timedelta = timedelta(hours=2),
    drift_history: timedelta | None = None,
) -> Workload:
    """At least ``target`` valid events of all five kinds over the last ``window`` (two
    hours), about 60% as OpenTelemetry spans, plus ``bad_fraction`` malformed payloads.
    ``drift`` (agent, since) triples that agent's output tokens from then on: a shift for the
    monitors to find. ``drift_history``, if longer than ``window``: that agent's units of work
    also go that far back, as many an hour as in the window (beyond ``target``), so that a
    drift monitor has the baseline a short window cannot hold."""
    rng = random.Random(seed)
    ids = _ids(rng, run_id)
    w = Workload()
    unit_no = 0

    def add_unit(p: AgentProfile, start: datetime) -> None:
        """One unit of work of ``p``'s from ``start``: its model calls (spans), their drift
        samples, its evals, maybe a cost and a human decision."""
        nonlocal unit_no
        unit_no += 1
        unit = Unit(p.unit_type, f"{p.unit_type[:3].upper()}-{run_id[-4:]}-{unit_no:05d}")
        session, user = next(ids), f"user-{rng.randint(1, 400)}"

        def event(kind: str, ts: datetime, body: Body, actor: Actor | None = None) -> Event:
            return Event(
                event_id=next(ids),
                kind=kind,
                ts=ts,
                tenant_id=p.tenant,
                agent_id=p.agent,
                unit=unit,
                session_id=session,
                actor=actor,
                attributes={"demo.run": run_id},
                body=body,
            )

        for step in range(rng.randint(2, 5)):
            tool = rng.choice(TOOLS) if rng.random() < 0.3 else None
            at = start + timedelta(seconds=step * 3)
            shifted = drift is not None and p.agent == drift[0] and at >= drift[1]
            span = _span(rng, p, at, unit, run_id, session, user, tool, 3.0 if shifted else 1.0)
            w.spans.append(span)
            # the output length the agent observed, as a drift sample
            w.events.append(
                event("drift", at, Drift("output_tokens", value=float(span.output_tokens)))
            )
        t = start + timedelta(seconds=20)
        evaluated = ""
        for metric in rng.sample(EVAL_METRICS, rng.randint(1, 2)):
            score = min(1.0, max(0.0, rng.gauss(0.86, 0.07)))
            w.events.append(event("eval", t, Eval(metric, score, 0.8, "online")))
            evaluated = w.events[-1].event_id
        if rng.random() < 0.35:
            category = rng.choice(("tool", "compute", "human_review", "vector_db"))
            amount = round(rng.uniform(0.01, 2.5), 4)
            w.events.append(event("cost", t, Cost(amount, "USD", category, "metered call")))
        if rng.random() < 0.3:
            reviewer = f"rev-{rng.randint(1, 12)}"
            outcome = rng.choices(DECISIONS[:4], (70, 10, 15, 5))[0]
            decision = Decision(evaluated, outcome, reviewer, f"{outcome} after review")
            w.events.append(
                event("decision", t + timedelta(minutes=2), decision, Actor(reviewer, "reviewer"))
            )

    drifting = next((a for a in AGENTS if drift is not None and a.agent == drift[0]), None)
    drifting_units = 0  # in the window
    while w.valid_count < target:
        p = rng.choice(AGENTS)
        drifting_units += p is drifting
        add_unit(p, now - window * rng.uniform(1 / 120, 1))
    w.bad = list(bad_payloads(rng, now, max(12, int(target * bad_fraction)), run_id))
    if drifting is not None and drift_history is not None and drift_history > window:
        earlier = drift_history - window
        for _ in range(round(drifting_units * (earlier / window))):
            add_unit(drifting, now - window - earlier * rng.random())
    return w


def span_events(spans: Sequence[SpanSpec], seed: int = 0) -> list[Event]:
    """The interaction events the OpenTelemetry path makes of ``spans`` (``span_to_event``),
    with seeded random trace and span ids: for callers that publish a workload's spans straight
    to the raw topic, as the exporter and the gateway would."""
    rng = random.Random(seed)
    events = []
    for spec in spans:
        start = int(spec.start.timestamp() * 1e9)
        end = start + int(spec.duration_ms * 1e6)
        view = SpanView(spec.name, rng.getrandbits(128), rng.getrandbits(64), start, end,
                        spec.attributes, {}, spec.error)  # fmt: skip
        event = span_to_event(view)
        if event is None:
            raise ValueError(f"span {spec.name!r} is not a GenAI span")
        events.append(event)
    return events


def published(workload: Workload, seed: int = 0) -> list[Event]:
    """Every valid event of ``workload`` as it reaches the raw topic, in the order of their
    time: its spans as interactions (``span_events``), then its other events."""
    return sorted([*span_events(workload.spans, seed), *workload.events], key=lambda e: e.ts)


def bad_payloads(
    rng: random.Random, now: datetime, count: int, run_id: str
) -> Iterator[BadPayload]:
    registry = Registry.load()
    base = Event(
        event_id="bad",
        kind="interaction",
        ts=now,
        tenant_id="acme",
        agent_id="support-bot",
        attributes={"demo.run": run_id},
        body=Interaction("openai", "gpt-4o", input_tokens=100, output_tokens=20),
    )
    key = b"acme/support-bot"

    def enc(event: Event) -> bytes:
        return registry.encode(EVENT_SCHEMA, event_to_avro(event))

    makers = [
        lambda i: BadPayload(key, enc(replace(base, event_id=f"bad-{i}"))[:-7], "corrupt_avro"),
        lambda i: BadPayload(
            key, b"\x07" + enc(replace(base, event_id=f"bad-{i}"))[1:], "bad_magic"
        ),
        lambda i: BadPayload(key, HEADER.pack(0, 999) + b"\x00" * 20, "unknown_schema"),
        lambda i: BadPayload(
            key,
            enc(
                replace(
                    base,
                    event_id=f"bad-{i}",
                    body=Interaction("openai", "gpt-4o", input_tokens=-50),
                )
            ),
            "negative_value",
        ),
        lambda i: BadPayload(
            key,
            enc(replace(base, event_id=f"bad-{i}", kind="cost", body=Cost(float("nan")))),
            "not_finite",
        ),
        lambda i: BadPayload(
            b"/support-bot", enc(replace(base, event_id=f"bad-{i}", tenant_id="")), "missing_tenant"
        ),
        lambda i: BadPayload(
            key,
            enc(replace(base, event_id=f"bad-{i}", ts=now + timedelta(days=30))),
            "timestamp_future",
        ),
        lambda i: BadPayload(
            key, enc(replace(base, event_id=f"bad-{i}", kind="telemetry")), "unknown_kind"
        ),
    ]
    for i in range(count):
        yield makers[i % len(makers)](i)


def bad_corpus(now: datetime, max_payload_bytes: int = 1_048_576) -> dict[str, BadPayload]:
    """Every kind of bad input Vigil must reject with its reason, by name: broken bytes
    (truncated, wrong magic, unknown or wrong schema, corrupt Avro, invalid UTF-8, oversized)
    and well-formed events that break the contract (NaN, negatives, times out of range, no
    tenant, unknown kind, huge attribute maps...). Each payload's key is ``acme/<name>``, so
    its dead letter can be matched to it."""
    registry = Registry.load()
    base = Event(
        event_id="corpus", kind="interaction", ts=now, tenant_id="acme", agent_id="corpus-bot",
        body=Interaction("openai", "gpt-4o", input_tokens=100, output_tokens=20, latency_ms=5.0),
    )  # fmt: skip

    def enc(event: Event) -> bytes:
        return registry.encode(EVENT_SCHEMA, event_to_avro(event))

    def body(**changes: object) -> Event:
        return replace(base, body=replace(base.body, **changes))  # type: ignore[arg-type]

    good = enc(base)
    marked = enc(replace(base, event_id="MARKMARK"))
    at = marked.index(b"MARKMARK")
    letter = registry.encode(DEAD_LETTER_SCHEMA, {
        "dlq_id": "x", "stage": "validate", "reason_code": "x", "reason": "x", "origin_topic": "t",
        "origin_partition": 0, "origin_offset": 0, "origin_key": None, "received_at": now,
        "tenant_hint": None, "event_id_hint": None, "payload": b"",
    })  # fmt: skip
    cases: dict[str, tuple[bytes, str]] = {
        "empty": (b"", "truncated"),
        "header_only": (good[: HEADER.size], "truncated"),
        "wrong_magic": (b"\x07" + good[1:], "bad_magic"),
        "json_not_avro": (b'{"kind": "interaction", "tenant_id": "acme"}', "bad_magic"),
        "unknown_schema_id": (HEADER.pack(0, 999) + good[HEADER.size :], "unknown_schema"),
        "dead_letter_schema": (letter, "wrong_schema"),
        "truncated_avro": (good[:-7], "corrupt_avro"),
        "trailing_garbage": (good + b"\x00\x01\x02", "corrupt_avro"),
        "random_body": (good[: HEADER.size] + bytes(range(200, 256)) * 3, "corrupt_avro"),
        "invalid_utf8": (marked[:at] + b"\xff\xfe\xfd\xfc\xff\xfe\xfd\xfc" + marked[at + 8 :],
                         "invalid_utf8"),
        "oversized": (enc(body(input_text="x" * max_payload_bytes)), "oversized"),
        "nan_latency": (enc(body(latency_ms=float("nan"))), "not_finite"),
        "infinite_cost": (enc(replace(base, kind="cost", body=Cost(float("inf")))), "not_finite"),
        "nan_eval_score": (enc(replace(base, kind="eval", body=Eval("faithfulness", float("nan")))),
                           "not_finite"),
        "negative_tokens": (enc(body(input_tokens=-50)), "negative_value"),
        "negative_latency": (enc(body(latency_ms=-3.0)), "negative_value"),
        "tokens_beyond_any_model": (enc(body(output_tokens=60_000_000)), "out_of_range"),
        "id_too_long": (enc(replace(base, event_id="e" * 300)), "out_of_range"),
        "timestamp_far_future": (enc(replace(base, ts=now + timedelta(days=3650))),
                                 "timestamp_future"),
        "timestamp_far_past": (enc(replace(base, ts=now - timedelta(days=3650))),
                               "timestamp_past"),
        "missing_tenant": (enc(replace(base, tenant_id="")), "missing_tenant"),
        "missing_agent": (enc(replace(base, agent_id="  ")), "missing_field"),
        "unknown_kind": (enc(replace(base, kind="telemetry")), "unknown_kind"),
        "huge_attribute_map": (enc(replace(base, attributes={f"k{i}": "v" for i in range(5000)})),
                               "too_many_attributes"),
        "cache_beyond_input": (enc(body(cache_read_tokens=500)), "inconsistent_tokens"),
        "reasoning_beyond_output": (enc(body(reasoning_tokens=50)), "inconsistent_tokens"),
        "unknown_status": (enc(body(status="maybe")), "bad_value"),
        "bad_currency": (enc(replace(base, kind="cost", body=Cost(1.0, "dollars"))), "bad_value"),
        "negative_cost": (enc(replace(base, kind="cost", body=Cost(-5.0))), "negative_value"),
        "cost_beyond_the_ledger": (enc(replace(base, kind="cost", body=Cost(2.5e10))),
                                   "out_of_range"),
        "reported_cost_beyond_any_decimal": (enc(body(reported_cost_usd=1e30)), "out_of_range"),
        "empty_event_id": (enc(replace(base, event_id="")), "missing_field"),
        "empty_drift_sample": (enc(replace(base, kind="drift", body=Drift("output_tokens"))),
                               "missing_field"),
    }  # fmt: skip
    return {
        name: BadPayload(f"acme/{name}".encode(), payload, code)
        for name, (payload, code) in cases.items()
    }
