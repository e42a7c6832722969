"""Shared fixtures. Integration fixtures (a real Kafka broker, real ClickHouse) live in
tests/integration/conftest.py and start once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from pipeline.codec import Registry

# CI runs the property tests with a fixed seed so a run is reproducible; on a developer's
# machine they keep exploring new examples.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "schemas" / "examples").glob("*.json"))


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry.load()


def load_example(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data
