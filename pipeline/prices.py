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

import yaml

from pipeline.events import Interaction
from pipeline.settings import ConfigError

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
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the price catalog ({exc})") from None
        return cls.parse(data, str(path), aliases)

    @classmethod
    def parse(cls, data: Any, source: str, aliases: Mapping[str, str] | None = None) -> Catalog:
        if not isinstance(data, Mapping) or "version" not in data or "models" not in data:
            raise ConfigError(f"{source}: a price catalog needs a version and models")
        prices: dict[str, list[Price]] = {}
        for i, entry in enumerate(data["models"]):
            where = f"{source}: models[{i}]"
            try:
                price = Price(
                    provider=str(entry["provider"]),
                    model=str(entry["model"]).lower(),
                    effective_from=_date(entry["effective_from"]),
                    input=_money(entry["input"]),
                    output=_money(entry["output"]),
                    cache_read=_money(entry.get("cache_read", entry["input"])),
                    cache_write=_money(entry.get("cache_write", entry["input"])),
                    checked=_date(entry["checked"]) if entry.get("checked") else None,
                )
            except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
                raise ConfigError(f"{where}: {type(exc).__name__} {exc}") from None
            prices.setdefault(price.model, []).append(price)
        all_aliases = {
            str(k).lower(): str(v).lower() for k, v in (data.get("aliases") or {}).items()
        }
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


def _date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def _money(value: Any) -> Decimal:
    amount = Decimal(str(value))
    if amount < 0 or not amount.is_finite():
        raise ValueError(f"price {value!r} must be a non-negative number")
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
