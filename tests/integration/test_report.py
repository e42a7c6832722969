"""`vigil report`: a self-contained HTML page whose charts a real browser draws. Rendered in
headless Chromium (Debian's chromium package, which `make test` installs); the screenshot is
kept in test-artifacts/report.png."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.report import render
from pipeline.store import connect, migrate
from tests.conftest import ROOT
from tests.demo_store import fill

pytestmark = pytest.mark.integration
ARTIFACTS = ROOT / "test-artifacts"
# a fixed afternoon: in a day's first two hours (or a month's first two days) a budget has too
# few complete periods for a forecast, and at the wall clock this test failed then
NOW = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)


class _Shapes(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.external.append(value)


def test_the_report_draws_every_view_and_renders_in_chromium(tmp_path: Path) -> None:
    store = connect(f"chdb://{tmp_path / 'ch'}")
    try:
        migrate(store)
        fill(store, now=NOW)
        page = render(store, load_config(ROOT / "vigil.yaml", os.environ).rules.budgets, NOW)
    finally:
        store.close()
    shapes = _Shapes()
    shapes.feed(page)
    assert shapes.external == []  # self-contained: nothing fetched from anywhere
    assert shapes.tags["svg"] >= 6  # cost per unit, three budgets, output tokens, eval scores
    assert shapes.tags["path"] >= 8 and shapes.tags["rect"] >= 14
    assert "forecast" in page and "budget $15" in page and "No data." not in page
    assert "budget_threshold" in page and "drift" in page  # the demo's alerts are listed
    report = tmp_path / "report.html"
    report.write_text(page)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is missing: `make test` installs Debian's chromium package"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    run = subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=900,2600", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 40_000
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True,
        timeout=120,
    ).stdout  # fmt: skip
    assert dom.count("<svg") == shapes.tags["svg"] and dom.count("<path") >= 8  # drawn, not dropped


def test_report_command_writes_the_file(tmp_path: Path) -> None:
    store = connect(f"chdb://{tmp_path / 'home' / 'clickhouse'}")
    migrate(store)
    fill(store, events=600)
    store.close()
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "report", "--out", str(tmp_path / "r.html")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "VIGIL_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "self-contained" in run.stdout and (tmp_path / "r.html").read_text().count("<svg") >= 5
