"""Units of work in the SDK: scope a ticket, a document or a claim once, and every span the
OpenTelemetry SDK starts and every event ``emit`` sends inside it carries the unit.

    with unit_of_work("ticket", "T-123"):
        answer = agent.run(question)          # spans and emitted events carry the unit

    @unit_of_work("document", lambda doc, **_: doc.id)
    async def summarise(doc): ...

The unit travels in OpenTelemetry context and baggage (``vigil.unit.type``, ``vigil.unit.id``),
so it follows asyncio tasks by itself and crosses process boundaries with W3C baggage
propagation. Threads do not inherit context in Python: hand work to a thread with
``in_current_context(fn)``.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from opentelemetry import baggage, context
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from pipeline.events import Unit

UNIT_TYPE = "vigil.unit.type"
UNIT_ID = "vigil.unit.id"
F = TypeVar("F", bound=Callable[..., Any])


def current_unit(ctx: Context | None = None) -> Unit | None:
    """The unit of work in scope, if any."""
    unit_type = baggage.get_baggage(UNIT_TYPE, ctx)
    unit_id = baggage.get_baggage(UNIT_ID, ctx)
    if isinstance(unit_type, str) and isinstance(unit_id, str) and unit_type and unit_id:
        return Unit(unit_type, unit_id)
    return None


def _name(what: str, value: object, unit_type: object) -> str:
    """A unit's type or id as the baggage carries it: a string that is not empty, or for the
    id a whole number (a database id) as its digits. Anything else was carried and then read
    as no unit at all, so the work it scoped was costed to no unit without a word."""
    if what == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        wanted = "a string or a whole number" if what == "id" else "a string"
        raise TypeError(f"unit_of_work({unit_type!r}, ...): the unit {what} must be {wanted}, "
                        f"not {type(value).__name__}")  # fmt: skip
    if not value.strip():
        raise ValueError(f"unit_of_work({unit_type!r}, ...): the unit {what} is empty")
    return value


@contextmanager
def _scope(unit_type: str, unit_id: str) -> Iterator[Unit]:
    unit_id = _name("id", unit_id, unit_type)
    unit_type = _name("type", unit_type, unit_type)
    ctx = baggage.set_baggage(UNIT_TYPE, unit_type)
    ctx = baggage.set_baggage(UNIT_ID, unit_id, context=ctx)
    token = context.attach(ctx)
    try:
        yield Unit(unit_type, unit_id)
    finally:
        context.detach(token)


class unit_of_work:
    """Context manager and decorator. As a decorator the id may be a function of the
    decorated function's arguments. The type and id are strings that are not empty (a whole
    number id is taken as its digits); anything else raises TypeError or ValueError as the
    scope is entered."""

    def __init__(self, unit_type: str, unit_id: str | Callable[..., str]) -> None:
        self.unit_type = unit_type
        self.unit_id = unit_id
        self._scopes: list[Any] = []

    def __enter__(self) -> Unit:
        if callable(self.unit_id):
            raise TypeError("unit_of_work as a context manager needs the unit id itself")
        scope = _scope(self.unit_type, self.unit_id)
        self._scopes.append(scope)
        return scope.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._scopes.pop().__exit__(*exc)

    def _id_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        return self.unit_id(*args, **kwargs) if callable(self.unit_id) else self.unit_id

    def __call__(self, fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with _scope(self.unit_type, self._id_for(args, kwargs)):
                    return await fn(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with _scope(self.unit_type, self._id_for(args, kwargs)):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]


def in_current_context(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` bound to a copy of the current context, for ``executor.submit`` or a Thread."""
    ctx = contextvars.copy_context()
    return functools.partial(ctx.run, fn)


class UnitOfWorkSpanProcessor(SpanProcessor):
    """Copies the unit in scope onto every span as it starts (exporters run later, on another
    thread, where the scope is gone). Add it to the TracerProvider next to the exporter."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        unit = current_unit(parent_context)
        if unit is not None:
            span.set_attribute(UNIT_TYPE, unit.type)
            span.set_attribute(UNIT_ID, unit.id)

    def on_end(self, span: ReadableSpan) -> None:
        return None
