"""The versioned price catalog and the cost of one interaction, in Decimal.

Token accounting follows the design: ``input_tokens`` counts every prompt token, cache reads
and writes included; ``reasoning_tokens`` are part of ``output_tokens``. So

    cost = (input - cache_read - cache_write) x input price + cache_read x cache-read price
         + cache_write x cache-write price + output x output price          (per million)

Model names are normalised before lookup: provider prefixes (``openai/gpt-4o``), dated
snapshots (``gpt-4o-2024-08-06``, ``claude-3-5-sonnet-20241022``), Bedrock and Vertex ids
(``anthropic.claude-3-5-sonnet-20241022-v2:0``, ``claude-3-5-sonnet-v2@20241022``) and aliases
from the catalog or vigil.yaml (Azure deployment names). Pure after ``Catalog.load``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from pipeline.events import Interaction
from pipeline.settings import ConfigError, load_yaml, mapping_of, read_input

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "prices" / "default.yaml"
MILLION = Decimal(1_000_000)
_SNAPSHOT = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|-latest|@\d{8}|@latest|-v\d+(?::\d+)?)$")
_HOST_PREFIX = re.compile(
    r"^(?:(?:us|eu|apac|global)\.)?(?:anthropic|meta|amazon|mistral|cohere|ai21)\."
)


@dataclass(frozen=True, slots=True)
class Price:
    provider: str
    model: str
    effective_from: date
    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal
    checked: date | None = None


@dataclass(frozen=True)
class Catalog:
    version: str
    prices: Mapping[str, tuple[Price, ...]]  # normalised model -> prices, oldest first
    aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(
        cls, path: Path = DEFAULT_CATALOG, aliases: Mapping[str, str] | None = None
    ) -> Catalog:
        """Read a catalog file. Raises ConfigError naming the entry that is wrong."""
        what = "price catalog"
        return cls.parse(load_yaml(read_input(path, what), path, what), str(path), aliases)

    @classmethod
    def parse(cls, data: Any, source: str, aliases: Mapping[str, str] | None = None) -> Catalog:
        """A loaded catalog document. Raises ConfigError naming the entry and field that is
        wrong: a catalog that is read wrongly prices every event wrongly."""
        if not isinstance(data, Mapping) or not data.get("version"):
            raise ConfigError(f"{source}: a price catalog needs a version and a list of models")
        unknown = sorted(str(k) for k in set(data) - {"version", "currency", "models", "aliases"})
        if unknown:
            raise ConfigError(f"{source}: {unknown[0]}: unknown (known: version, currency, "
                              "models, aliases)")  # fmt: skip
        if data.get("currency", "USD") != "USD":
            raise ConfigError(f"{source}: currency: prices are in USD, got {data['currency']!r}")
        models, named = data.get("models"), data.get("aliases") or {}
        if not isinstance(models, list):
            raise ConfigError(f"{source}: models: expected a list of prices")
        if not isinstance(named, Mapping):
            raise ConfigError(f"{source}: aliases: expected a mapping of name: model")
        prices: dict[str, list[Price]] = {}
        first: dict[tuple[str, str, date], int] = {}  # (provider, model, from) -> its entry
        for i, entry in enumerate(models):
            price = _price(entry, f"{source}: models[{i}]")
            key = (price.provider, price.model, price.effective_from)
            if key in first:
                raise ConfigError(f"{source}: models[{i}]: a second price of {price.provider} "
                                  f"{price.model} from {price.effective_from} (models"
                                  f"[{first[key]}]): which one holds?")  # fmt: skip
            first[key] = i
            prices.setdefault(price.model, []).append(price)
        all_aliases = {str(k).lower(): str(v).lower() for k, v in named.items()}
        all_aliases.update({k.lower(): v.lower() for k, v in (aliases or {}).items()})
        return cls(
            version=str(data["version"]),
            prices={m: tuple(sorted(p, key=lambda x: x.effective_from)) for m, p in prices.items()},
            aliases=all_aliases,
        )

    def normalise(self, model: str) -> str:
        """The catalog's name for a model id as a provider, host or deployment spells it."""
        name = model.strip().lower()
        for _ in range(4):
            if name in self.aliases:
                name = self.aliases[name]
            if name in self.prices:
                return name
            stripped = _HOST_PREFIX.sub("", name.rsplit("/", 1)[-1])
            stripped = _SNAPSHOT.sub("", stripped)
            if stripped == name:
                break
            name = stripped
        return name

    def price(self, provider: str, model: str, at: datetime) -> Price | None:
        """The price in effect at ``at`` (the provider's own where hosts differ); None if the
        model is unknown or was not yet priced then."""
        candidates = self.prices.get(self.normalise(model), ())
        own = [p for p in candidates if p.provider == provider] or list(candidates)
        day = at.date()
        effective = [p for p in own if p.effective_from <= day]
        return effective[-1] if effective else None


_FIELDS = ("provider", "model", "effective_from", "input", "output", "cache_read", "cache_write",
           "checked")  # fmt: skip
# a bound no real price comes near (USD per million tokens); one past it is a slip of the pen
_MOST = Decimal(1_000_000)


def _price(entry: Any, where: str) -> Price:
    """One entry of a catalog's models. Raises ConfigError naming the field."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(_FIELDS)}")
    mapping_of(entry, _FIELDS, where)
    for name in ("provider", "model", "effective_from", "input", "output"):
        if entry.get(name) in (None, ""):
            raise ConfigError(f"{where}.{name}: missing")
    return Price(
        provider=str(entry["provider"]),
        model=str(entry["model"]).lower(),
        effective_from=_date(entry["effective_from"], f"{where}.effective_from"),
        input=_money(entry["input"], f"{where}.input"),
        output=_money(entry["output"], f"{where}.output"),
        cache_read=_money(entry.get("cache_read", entry["input"]), f"{where}.cache_read"),
        cache_write=_money(entry.get("cache_write", entry["input"]), f"{where}.cache_write"),
        checked=_date(entry["checked"], f"{where}.checked") if entry.get("checked") else None,
    )


def _date(value: Any, where: str) -> date:
    if isinstance(value, datetime):  # YAML reads 2024-05-13T00:00:00Z as one: it sorted apart
        raise ConfigError(f"{where}: expected a date (YYYY-MM-DD), got a date and time")
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{where}: expected a date (YYYY-MM-DD), got {value!r}") from None


def _money(value: Any, where: str) -> Decimal:
    """A price in USD per million tokens."""
    try:
        amount = Decimal(str(value)) if not isinstance(value, bool) else Decimal("NaN")
    except ArithmeticError:
        amount = Decimal("NaN")
    if not (amount.is_finite() and 0 <= amount < _MOST):
        raise ConfigError(f"{where}: expected USD per million tokens, from 0 to below "
                          f"{_MOST:,}, got {value!r}")  # fmt: skip
    return amount


def interaction_cost(body: Interaction, price: Price) -> Decimal:
    """USD cost of one interaction under ``price`` (exact; quantised only when stored)."""
    uncached = body.input_tokens - body.cache_read_tokens - body.cache_write_tokens
    return (
        uncached * price.input
        + body.cache_read_tokens * price.cache_read
        + body.cache_write_tokens * price.cache_write
        + body.output_tokens * price.output
    ) / MILLION
