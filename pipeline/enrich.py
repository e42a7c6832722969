"""The enrich stage: what an event cost and whose it is. Pure.

Interactions are priced from the catalog in effect at their event time; an unknown model is
never priced at zero: ``cost_usd`` stays None and ``cost_status`` says ``unknown_model`` (or
``reported`` when the emitter reported a cost itself). Cost events in USD count as they are
(``non_token``); other currencies are kept, unconverted, with ``cost_status`` ``unconverted``.
Owner and team come from the agents registry; an unregistered agent is flagged, not dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from pipeline.events import Cost, Enrichment, Event, Interaction, enriched
from pipeline.prices import Catalog, interaction_cost
from pipeline.rows import money


@dataclass(frozen=True)
class AgentInfo:
    owner: str | None = None
    team: str | None = None
    unit: str | None = None


def _text(amount: float | Decimal, where: str) -> str:
    """``amount`` as exact text at the ledger's scale; InvalidEvent if it cannot hold it."""
    return format(money(amount, where), "f")


def cost_of(event: Event, catalog: Catalog) -> tuple[str | None, str]:
    """(cost in USD as exact text or None, cost_status) of one event. Raises InvalidEvent for
    a cost the ledger cannot hold (which validation rejects before enrichment)."""
    body = event.body
    if isinstance(body, Interaction):
        price = catalog.price(body.provider, body.model, event.ts)
        if price is not None:
            return _text(interaction_cost(body, price), "cost_usd"), "priced"
        if body.reported_cost_usd is not None:
            return _text(body.reported_cost_usd, "reported_cost_usd"), "reported"
        return None, "unknown_model"
    if isinstance(body, Cost):
        if body.currency == "USD":
            return _text(body.amount, "amount"), "non_token"
        return None, "unconverted"
    return None, "none"


def enrich(event: Event, catalog: Catalog, agents: Mapping[str, AgentInfo]) -> Event:
    """The event with its Enrichment set."""
    info = agents.get(f"{event.tenant_id}/{event.agent_id}")
    cost, status = cost_of(event, catalog)
    return enriched(
        event,
        Enrichment(
            cost_status=status,
            cost_usd=cost,
            price_version=catalog.version if status == "priced" else None,
            owner=info.owner if info else None,
            team=info.team if info else None,
            registered=info is not None,
        ),
    )
