"""An OpenTelemetry ``SpanExporter`` that publishes GenAI spans to Vigil as interaction events.

Use it like any exporter::

    provider.add_span_processor(BatchSpanProcessor(VigilSpanExporter(emitter, tenant_id="acme")))

Spans that are not GenAI spans are ignored. Mapping lives in ``pipeline.otel_mapping``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict

from confluent_kafka import KafkaException
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

from connectors.sdk import Emitter, EmitterClosed
from pipeline.codec import encode_failure, unencodable
from pipeline.events import InvalidEvent
from pipeline.otel_mapping import SpanView, span_to_event

log = logging.getLogger(__name__)


def view_of(span: ReadableSpan) -> SpanView:
    """SDK span -> the mapping's view of it."""
    context = span.get_span_context()
    return SpanView(
        name=span.name,
        trace_id=context.trace_id if context else 0,
        span_id=context.span_id if context else 0,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or span.start_time or 0,
        attributes=dict(span.attributes or {}),
        resource=dict(span.resource.attributes) if span.resource else {},
        is_error=span.status.status_code is StatusCode.ERROR,
        status_message=span.status.description,
    )


class VigilSpanExporter(SpanExporter):
    """Called by a span processor with finished spans; publishes through ``emitter`` (which
    batches and delivers asynchronously). ``tenant_id``/``agent_id`` fill in what spans and
    their resource do not say."""

    def __init__(
        self,
        emitter: Emitter,
        *,
        tenant_id: str | None = None,
        agent_id: str | None = None,
        environment: str | None = None,
    ) -> None:
        self._emitter = emitter
        self._tenant_id = tenant_id
        self._agent_id = agent_id
        self._environment = environment
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            for span in spans:
                view = view_of(span)
                try:
                    event = span_to_event(
                        view,
                        default_tenant=self._tenant_id,
                        default_agent=self._agent_id,
                        environment=self._environment,
                    )
                except InvalidEvent as exc:  # the pipeline keeps it in its DLQ, with why
                    self._unmappable(view, exc)
                else:
                    if event is not None:
                        self._emitter.emit(event)
                self.exported += 1
        except (KafkaException, EmitterClosed) as exc:
            log.error("exporting spans to Vigil failed: %s", exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _unmappable(self, view: SpanView, exc: InvalidEvent) -> None:
        """A GenAI span that is not an event (a reported cost past a float's range): sent as
        ``codec.unencodable``, for the pipeline's DLQ, and not the batch's other spans lost."""
        log.warning("span %r does not map to a Vigil event (%s); sent for the dead-letter queue",
                    view.name, exc.code)  # fmt: skip
        key = f"{self._tenant_id or ''}/{self._agent_id or ''}".encode()
        self._emitter.emit_raw(key, unencodable(encode_failure(exc), asdict(view)))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._emitter.flush(timeout_millis / 1000) == 0

    def shutdown(self) -> None:
        self._emitter.flush()
