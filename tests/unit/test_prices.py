"""Cost arithmetic (golden figures worked by hand), name normalisation, effective dates."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from pipeline.enrich import AgentInfo, cost_of, enrich
from pipeline.events import Cost, Drift, Event, Interaction
from pipeline.prices import Catalog, interaction_cost
from pipeline.settings import ConfigError

CATALOG = Catalog.load()
JULY = datetime(2025, 7, 1, tzinfo=UTC)


def _cost(provider: str, model: str, at: datetime = JULY, **tokens: int) -> Decimal:
    price = CATALOG.price(provider, model, at)
    assert price is not None, model
    return interaction_cost(Interaction(provider, model, **tokens), price)


@pytest.mark.parametrize(
    ("provider", "model", "tokens", "expected"),
    [
        # OpenAI: 1,000 prompt tokens of which 400 cached at $1.25/M, 600 at $2.50/M; 200 out at $10/M
        (
            "openai",
            "gpt-4o-2024-08-06",
            {"input_tokens": 1000, "cache_read_tokens": 400, "output_tokens": 200},
            Decimal("0.0015") + Decimal("0.0005") + Decimal("0.002"),
        ),
        # reasoning tokens are part of output: o3 after the June 2025 cut, $8/M for all 1,000 out
        (
            "openai",
            "o3",
            {"input_tokens": 500, "output_tokens": 1000, "reasoning_tokens": 800},
            Decimal("0.001") + Decimal("0.008"),
        ),
        # Anthropic: 10,000 prompt = 2,000 fresh ($3) + 6,000 read ($0.30) + 2,000 written ($3.75); 300 out ($15)
        (
            "anthropic",
            "claude-3-5-sonnet-20241022",
            {
                "input_tokens": 10000,
                "cache_read_tokens": 6000,
                "cache_write_tokens": 2000,
                "output_tokens": 300,
            },
            Decimal("0.006") + Decimal("0.0018") + Decimal("0.0075") + Decimal("0.0045"),
        ),
        # Google: cache reads at $0.3125/M
        (
            "gcp.gemini",
            "gemini-1.5-pro-002",
            {"input_tokens": 2000, "cache_read_tokens": 1000, "output_tokens": 100},
            Decimal("0.00125") + Decimal("0.0003125") + Decimal("0.0005"),
        ),
        # Mistral has no cache prices: cached tokens cost the input price
        (
            "mistral_ai",
            "mistral-large-latest",
            {"input_tokens": 1000, "cache_read_tokens": 500, "output_tokens": 1000},
            Decimal("0.002") + Decimal("0.006"),
        ),
        # Llama on Bedrock, id as Bedrock spells it
        (
            "aws.bedrock",
            "meta.llama3-1-70b-instruct-v1:0",
            {"input_tokens": 1_000_000, "output_tokens": 1_000_000},
            Decimal("1.44"),
        ),
    ],
)
def test_golden_costs(provider: str, model: str, tokens: dict[str, int], expected: Decimal) -> None:
    assert _cost(provider, model, **tokens) == expected


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("openai/gpt-4o", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("us.anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("mistral-large-latest", "mistral-large"),
        ("meta.llama3-1-70b-instruct-v1:0", "llama3-1-70b-instruct"),
        ("GPT-4o", "gpt-4o"),
    ],
)
def test_model_names_are_normalised(given: str, canonical: str) -> None:
    assert CATALOG.normalise(given) == canonical


def test_azure_deployments_map_through_configured_aliases() -> None:
    catalog = Catalog.load(aliases={"acme-gpt4o-prod": "gpt-4o"})
    assert catalog.price("azure.ai.openai", "acme-gpt4o-prod", JULY).input == Decimal("2.50")  # type: ignore[union-attr]
    assert CATALOG.price("azure.ai.openai", "acme-gpt4o-prod", JULY) is None


def test_effective_dates_switch_prices() -> None:
    tokens = {"input_tokens": 1_000_000, "output_tokens": 0}
    assert _cost("openai", "gpt-4o", datetime(2024, 9, 30, tzinfo=UTC), **tokens) == Decimal("5")
    assert _cost("openai", "gpt-4o", datetime(2024, 10, 2, tzinfo=UTC), **tokens) == Decimal("2.5")
    assert _cost("openai", "o3", datetime(2025, 6, 9, tzinfo=UTC), **tokens) == Decimal("10")
    assert _cost("openai", "o3", datetime(2025, 6, 10, tzinfo=UTC), **tokens) == Decimal("2")
    assert CATALOG.price("openai", "gpt-5", datetime(2025, 1, 1, tzinfo=UTC)) is None, (
        "not priced before release"
    )


def _event(body: object, agent: str = "support-bot") -> Event:
    return Event(
        event_id="e",
        kind={Interaction: "interaction", Cost: "cost", Drift: "drift"}[type(body)],
        ts=JULY,
        tenant_id="acme",
        agent_id=agent,
        body=body,
    )  # type: ignore[arg-type]


def test_unknown_models_are_never_priced_at_zero() -> None:
    assert cost_of(_event(Interaction("acme-ai", "secret-model-7", input_tokens=10)), CATALOG) == (
        None,
        "unknown_model",
    )
    reported = Interaction("acme-ai", "secret-model-7", input_tokens=10, reported_cost_usd=0.0123)
    assert cost_of(_event(reported), CATALOG) == ("0.012300000", "reported")


def test_cost_events_and_ownership() -> None:
    agents = {"acme/support-bot": AgentInfo("jane@acme.example", "support", "ticket")}
    usd = enrich(_event(Cost(0.35, "USD", "human_review")), CATALOG, agents).enrichment
    assert usd is not None and (usd.cost_usd, usd.cost_status, usd.team, usd.registered) == (
        "0.350000000",
        "non_token",
        "support",
        True,
    )
    eur = enrich(_event(Cost(2.0, "EUR")), CATALOG, agents).enrichment
    assert eur is not None and (eur.cost_usd, eur.cost_status) == (None, "unconverted")
    stray = enrich(_event(Drift("x", 1.0), agent="shadow-bot"), CATALOG, agents).enrichment
    assert stray is not None and (stray.registered, stray.owner, stray.cost_status) == (
        False,
        None,
        "none",
    )
    priced = enrich(
        _event(Interaction("openai", "gpt-4o", input_tokens=1000)), CATALOG, agents
    ).enrichment
    assert (
        priced is not None
        and priced.price_version == CATALOG.version
        and priced.cost_usd == "0.002500000"
    )


def test_catalog_errors_name_the_entry() -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]"):
        Catalog.parse(
            {
                "version": "x",
                "models": [
                    {
                        "provider": "p",
                        "model": "m",
                        "effective_from": "2025-01-01",
                        "input": -1,
                        "output": 1,
                    }
                ],
            },
            "test.yaml",
        )
    with pytest.raises(ConfigError, match="needs a version"):
        Catalog.parse({"models": []}, "test.yaml")


ENTRY = {"provider": "p", "model": "m", "effective_from": "2025-01-01", "input": 1, "output": 2}


@pytest.mark.parametrize(
    ("catalog", "said"),
    [
        # each of these was a TypeError or AttributeError out of load, or taken silently
        ({"version": "1", "models": 5}, "test.yaml: models: expected a list of prices"),
        ({"version": "1", "models": [], "aliases": ["a"]}, "aliases: expected a mapping"),
        ({"version": "1", "models": [5]}, "test.yaml: models[0]: expected a mapping of provider"),
        ({"version": "1", "models": [{**ENTRY, "outptu": 3}]}, "models[0].outptu: unknown"),
        ({"version": "1", "models": [{**ENTRY, "input": "1e400"}]}, "models[0].input: expected"),
        ({"version": "1", "models": [{**ENTRY, "output": "abc"}]}, "models[0].output: expected"),
        ({"version": "1", "models": [{**ENTRY, "input": True}]}, "models[0].input: expected USD"),
        ({"version": "1", "models": [{**ENTRY, "effective_from": "soon"}]}, "expected a date"),
        # YAML reads 2025-01-01T00:00:00Z as a datetime: sorted beside dates, a TypeError
        (
            {"version": "1", "models": [ENTRY, {**ENTRY, "effective_from": datetime(2025, 2, 1)}]},
            "models[1].effective_from: expected a date (YYYY-MM-DD), got a date and time",
        ),
        ({"version": "1", "models": [{**ENTRY, "provider": None}]}, "models[0].provider: missing"),
        (
            {"version": "1", "models": [ENTRY, {**ENTRY, "model": "M", "input": 9}]},
            "models[1]: a second price of p m from 2025-01-01 (models[0]): which one holds?",
        ),
        ({"version": "1", "currency": "EUR", "models": []}, "currency: prices are in USD"),
        ({"version": "", "models": []}, "needs a version"),
        ({"version": "1", "model": []}, "test.yaml: model: unknown"),
    ],
)
def test_a_catalog_read_wrongly_is_refused_by_entry_and_field(catalog: dict, said: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as bad:
        Catalog.parse(catalog, "test.yaml")
    assert said in str(bad.value)


def test_every_catalog_entry_says_when_it_was_checked() -> None:
    for entries in CATALOG.prices.values():
        for price in entries:
            assert price.checked is not None and price.checked >= price.effective_from, price
