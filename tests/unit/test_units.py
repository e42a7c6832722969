"""Units of work follow the code: spans and SDK events inside the scope carry the unit, across
asyncio tasks and (with in_current_context) threads, and nothing outside it does."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from connectors.otel import view_of
from connectors.units import UnitOfWorkSpanProcessor, current_unit, in_current_context, unit_of_work
from pipeline.events import Unit
from pipeline.otel_mapping import span_to_event


def _tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(UnitOfWorkSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def test_spans_inside_the_scope_carry_the_unit() -> None:
    provider, memory = _tracing()
    tracer = provider.get_tracer("t")
    attrs = {
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "vigil.tenant_id": "acme",
    }
    with unit_of_work("ticket", "T-123") as unit:
        assert unit == Unit("ticket", "T-123") == current_unit()
        with tracer.start_as_current_span("chat", attributes=attrs):
            pass
    with tracer.start_as_current_span("chat", attributes=attrs):
        pass
    inside, outside = (span_to_event(view_of(s)) for s in memory.get_finished_spans())
    assert inside is not None and inside.unit == Unit("ticket", "T-123")
    assert outside is not None and outside.unit is None
    assert current_unit() is None


def test_decorators_take_the_id_from_arguments_for_sync_and_async() -> None:
    @unit_of_work("document", lambda doc_id, **_: doc_id)
    def sync_work(doc_id: str) -> Unit | None:
        return current_unit()

    @unit_of_work("claim", lambda claim_id: claim_id)
    async def async_work(claim_id: str) -> Unit | None:
        await asyncio.sleep(0)
        # a task started inside the scope inherits it
        return await asyncio.create_task(_read_unit())

    assert sync_work("D-9") == Unit("document", "D-9")
    assert asyncio.run(async_work("C-1")) == Unit("claim", "C-1")
    assert current_unit() is None


async def _read_unit() -> Unit | None:
    return current_unit()


def test_threads_see_the_unit_when_handed_the_context() -> None:
    with unit_of_work("ticket", "T-7"), ThreadPoolExecutor(1) as pool:
        assert pool.submit(in_current_context(current_unit)).result() == Unit("ticket", "T-7")
        assert pool.submit(current_unit).result() is None  # plain threads do not inherit context


def test_nested_scopes_restore_the_outer_unit() -> None:
    with unit_of_work("ticket", "outer"):
        with unit_of_work("ticket", "inner"):
            assert current_unit() == Unit("ticket", "inner")
        assert current_unit() == Unit("ticket", "outer")
    assert datetime.now(UTC) and current_unit() is None


def test_a_whole_number_id_is_carried_and_an_unusable_one_refused() -> None:
    # a database id: it was carried, then read as no unit, and the work costed to none
    @unit_of_work("document", lambda doc_id: doc_id)
    def work(doc_id: object) -> Unit | None:
        return current_unit()

    provider, memory = _tracing()
    with (
        unit_of_work("ticket", 42),
        provider.get_tracer("t").start_as_current_span(
            "chat",
            attributes={
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o",
                "vigil.tenant_id": "acme",
            },
        ),
    ):
        assert current_unit() == Unit("ticket", "42")
    [span] = memory.get_finished_spans()
    event = span_to_event(view_of(span))
    assert event is not None and event.unit == Unit("ticket", "42")
    assert work(7) == Unit("document", "7")
    for doc_id, error, said in [
        ("", ValueError, "unit_of_work('document', ...): the unit id is empty"),
        (" ", ValueError, "the unit id is empty"),
        (1.5, TypeError, "the unit id must be a string or a whole number, not float"),
        (None, TypeError, "the unit id must be a string or a whole number, not NoneType"),
        (True, TypeError, "not bool"),
    ]:
        with pytest.raises(error, match=re.escape(said)):
            work(doc_id)
    type_said = r"unit_of_work\(None, ...\): the unit type must be a str"
    with pytest.raises(TypeError, match=type_said), unit_of_work(None, "x"):  # type: ignore[arg-type]
        pass
    with pytest.raises(ValueError, match="the unit type is empty"), unit_of_work("", "x"):
        pass
    assert current_unit() is None
