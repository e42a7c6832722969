"""Shared fixtures. Integration fixtures (a real Kafka broker, real ClickHouse) live in
tests/integration/conftest.py and start once per session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.codec import Registry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "schemas" / "examples").glob("*.json"))


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry.load()


def load_example(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data
