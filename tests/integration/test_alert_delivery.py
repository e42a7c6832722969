"""Alerts' webhook delivery against a real HTTP server and the real embedded engine: a route
that hangs delays no other, what a webhook did not get is posted again by the sweep until it
is delivered, and what stays undelivered is given up on, named, after its window."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest

from pipeline.alerting import (
    ALERT_COLUMNS,
    ALERT_DELIVERY_TABLE,
    DELIVERY_COLUMNS,
    DELIVERY_STATE,
    Notifier,
    Route,
    alert_id,
    alert_row,
    pending_rows,
)
from pipeline.alerts import Alert
from pipeline.store import ClickHouseStore, connect, migrate
from tests.integration.conftest import Webhooks, vigil, wait_until

pytestmark = pytest.mark.integration


def _alert(tenant: str, threshold: float, fired_at: datetime | None = None) -> Alert:
    return Alert("budget_threshold", {"tenant": tenant}, fired_at or datetime.now(UTC),
                 "spend_usd", threshold, threshold, f"{tenant} crossed ${threshold}")  # fmt: skip


def _notifier(store: ClickHouseStore, routes: list[Route], **kwargs: object) -> Notifier:
    record = partial(store.insert, ALERT_DELIVERY_TABLE, columns=DELIVERY_COLUMNS)
    return Notifier(routes, record, **kwargs)  # type: ignore[arg-type]


def _raise(store: ClickHouseStore, notifier: Notifier, alerts: list[Alert], at: datetime) -> None:
    """What the worker does with alerts fired: rows owed, then the posts."""
    rows = pending_rows(alerts, notifier.routes.values(), at)
    store.insert(ALERT_DELIVERY_TABLE, rows, DELIVERY_COLUMNS, f"owed-{rows[0][0]}")
    for alert in alerts:
        notifier.submit(alert)


def _states(store: ClickHouseStore) -> dict[tuple[str, str], str]:
    rows = store.query_rows(f"SELECT alert_id, route, toString({DELIVERY_STATE}) "
                            "FROM vigil.alert_deliveries GROUP BY alert_id, route")  # fmt: skip
    return {(a, r): s for a, r, s in rows}


def test_a_hanging_webhook_delays_no_other_route(
    store: ClickHouseStore, webhooks: Webhooks
) -> None:
    webhooks.hanging["/slow"] = 4.0
    slow = Route(f"{webhooks.url}/slow", name="slow")
    fast = Route(f"{webhooks.url}/fast", {"tenant": "acme"}, "slack")
    notifier = _notifier(store, [slow, fast], timeout=10)
    try:
        alerts = [_alert("acme", 1.0), _alert("acme", 1.6), _alert("globex", 2.0)]
        _raise(store, notifier, alerts, datetime.now(UTC))
        wait_until(lambda: len(webhooks.to("/fast")) == 2, 10, "acme's two alerts on Slack")
        assert all(body["text"].startswith(":warning: *budget_threshold* acme crossed")
                   for body in webhooks.to("/fast"))  # fmt: skip
        assert len(webhooks.to("/slow")) == 0  # not behind the slow route's first post
        # a sweep meanwhile posts nothing again: the slow route's are in flight (one posted, two
        # queued), acme's delivered and recorded
        assert notifier.sweep(store, datetime.now(UTC) + timedelta(hours=1)) == 0
        wait_until(lambda: len(webhooks.to("/slow")) == 3, 20, "the slow route's three")
        assert sorted(b["alert_id"] for b in webhooks.to("/slow")) == sorted(map(alert_id, alerts))
        wait_until(lambda: notifier.counts()["delivered"] == 5, 5, "five deliveries counted")
        states = _states(store)
        assert sorted(states.values()) == ["delivered"] * 5
        assert {route for _id, route in states} == {"slow", fast.key}
        assert fast.key.startswith("webhook-") and webhooks.url[7:] not in fast.key
        assert notifier.sweep(store, datetime.now(UTC) + timedelta(hours=1)) == 0
        assert len(webhooks.posts) == 5
    finally:
        notifier.close()


def test_what_a_webhook_did_not_get_is_posted_again_at_each_sweep_until_delivered_once(
    store: ClickHouseStore, webhooks: Webhooks, caplog: pytest.LogCaptureFixture
) -> None:
    webhooks.failing["/oncall"] = 4  # the three attempts of the first post, the first sweep's
    route = Route(f"{webhooks.url}/oncall", name="oncall")
    notifier = _notifier(store, [route], timeout=1)
    try:
        alert = _alert("acme", 1.0)
        raised = datetime.now(UTC)
        _raise(store, notifier, [alert], raised)
        wait_until(lambda: notifier.counts()["failed"] == 1, 15, "the post given up for now")
        assert webhooks.refused == 3 and webhooks.posts == []
        assert _states(store) == {(alert_id(alert), "oncall"): "pending"}
        # a post raised less than Notifier.longest_post ago may still be in flight elsewhere
        assert notifier.sweep(store, raised + timedelta(seconds=notifier.longest_post)) == 0
        later = raised + timedelta(seconds=notifier.longest_post + 2)
        caplog.clear()
        with caplog.at_level(logging.WARNING, "vigil.alerts"):
            assert notifier.sweep(store, later) == 1
            wait_until(lambda: notifier.counts()["failed"] == 2, 5, "the sweep's post refused")
            assert notifier.sweep(store, later + timedelta(minutes=1)) == 1
            wait_until(lambda: len(webhooks.posts) == 1, 5, "the alert delivered")
        # each sweep says what the route owes, once; its posts fail quietly
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 2 and all("webhook oncall (http://127.0.0.1:" in line
                                      and "still owes 1 alert(s)" in line for line in said), said  # fmt: skip
        assert webhooks.to("/oncall")[0]["alert_id"] == alert_id(alert)
        wait_until(lambda: _states(store) == {(alert_id(alert), "oncall"): "delivered"}, 5,
                   "its delivery recorded")  # fmt: skip
        assert notifier.sweep(store, later + timedelta(minutes=2)) == 0  # nothing owed
        assert notifier.counts() == {"delivered": 1, "failed": 2, "given_up": 0}
        assert webhooks.refused == 4 and len(webhooks.posts) == 1
    finally:
        notifier.close()


def test_an_alert_owed_past_its_window_or_to_a_route_gone_is_given_up_and_named(
    store: ClickHouseStore, webhooks: Webhooks, caplog: pytest.LogCaptureFixture
) -> None:
    kept = Route(f"{webhooks.url}/kept", name="kept")
    gone = Route(f"{webhooks.url}/gone", name="gone")
    now = datetime.now(UTC)
    old, recent = _alert("acme", 1.0, now - timedelta(hours=30)), _alert("acme", 1.6)
    rows = pending_rows([old], [kept], now - timedelta(hours=30))
    rows += pending_rows([recent], [kept, gone], now - timedelta(minutes=5))
    store.insert(ALERT_DELIVERY_TABLE, rows, DELIVERY_COLUMNS, "owed")
    notifier = _notifier(store, [kept], give_up_after=timedelta(hours=24))  # gone: removed
    try:
        with caplog.at_level(logging.ERROR, "vigil.alerts"):
            assert notifier.sweep(store, now) == 1
        wait_until(lambda: len(webhooks.to("/kept")) == 1, 5, "the recent alert delivered")
        assert webhooks.to("/kept")[0]["alert_id"] == alert_id(recent)
        assert webhooks.to("/gone") == []
        wait_until(lambda: _states(store) == {
            (alert_id(old), "kept"): "given_up",
            (alert_id(recent), "kept"): "delivered",
            (alert_id(recent), "gone"): "given_up",
        }, 5, "each one's state recorded")  # fmt: skip
        said = [r.getMessage() for r in caplog.records if "given up on" in r.getMessage()]
        assert len(said) == 2
        assert any(alert_id(old) in line and "not delivered in 24 h" in line for line in said)
        assert any(alert_id(recent) in line and "no longer configured" in line for line in said)
        assert notifier.counts()["given_up"] == 2
        assert notifier.sweep(store, now + timedelta(minutes=1)) == 0
    finally:
        notifier.close()


def test_vigil_alerts_list_shows_each_alerts_deliveries_and_what_is_owed(tmp_path: Path) -> None:
    env = {**os.environ, "VIGIL_HOME": str(tmp_path / "home"),
           "VIGIL_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'ch'}"}  # fmt: skip
    now = datetime.now(UTC)
    alerts = [_alert("acme", 1.0, now - timedelta(hours=3)), _alert("acme", 1.6, now),
              _alert("globex", 2.0, now - timedelta(hours=1)),
              _alert("initech", 5.0, now - timedelta(minutes=30))]  # fmt: skip
    oncall, ops = Route("http://x/1", name="oncall"), Route("http://x/2", name="ops")
    owed = pending_rows(alerts[:3], [oncall, ops], now)
    settled = [(*r[:4], "delivered", now, "", 0) for r in owed if r[0] != alert_id(alerts[1])]
    settled += [(alert_id(alerts[1]), "ops", "acme", alerts[1].fired_at, "given_up", now, "", 0)]
    store = connect(env["VIGIL_CLICKHOUSE_DSN"])
    try:
        migrate(store)
        store.insert("vigil.alerts", [alert_row(a, now) for a in alerts], ALERT_COLUMNS, "a")
        store.insert(ALERT_DELIVERY_TABLE, owed + settled, DELIVERY_COLUMNS, "d")
    finally:
        store.close()

    listed = vigil(env, "alerts", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["tenant"], r["delivered_to"], r["owed_to"], r["given_up_for"]) for r in rows] == [
        ("acme", "", "oncall", "ops"),  # the newest first
        ("initech", "", "", ""),  # no route matched it
        ("globex", "oncall,ops", "", ""),
        ("acme", "oncall,ops", "", ""),
    ]
    assert "4 alert(s); 1 still owed to a webhook" in listed.stderr
    owed_only = vigil(env, "alerts", "list", "--owed", "--format", "json")
    (row,) = [json.loads(line) for line in owed_only.stdout.splitlines()]
    assert row["alert_id"] == alert_id(alerts[1]) and row["owed_to"] == "oncall"
    assert "1 alert(s); 1 still owed" in owed_only.stderr
    since = vigil(env, "alerts", "list", "--tenant", "acme", "--since",
                  (now - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S"))  # fmt: skip
    assert since.returncode == 0 and "1 alert(s)" in since.stderr
    assert "acme crossed $1.6" in since.stdout  # the table
    bad = vigil(env, "alerts", "list", "--since", "yesterday")
    assert bad.returncode != 0 and "--since: 'yesterday' is not a date" in bad.stderr


def test_pages_given_up_on_are_owed_again_by_redeliver_and_posted_for_a_new_window(
    tmp_path: Path, webhooks: Webhooks
) -> None:
    config = tmp_path / "vigil.yaml"
    config.write_text(
        f"alerts:\n  routes:\n    - {{name: oncall, webhook: {webhooks.url}/oncall}}\n"
    )
    env = {**os.environ, "VIGIL_HOME": str(tmp_path / "home"), "VIGIL_CONFIG": str(config),
           "VIGIL_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'ch'}"}  # fmt: skip
    now = datetime.now(UTC)
    lost, elsewhere, taken = (_alert("acme", 1.0, now - timedelta(hours=30)),
                              _alert("acme", 1.6, now - timedelta(hours=29)),
                              _alert("globex", 2.0, now - timedelta(hours=28)))  # fmt: skip
    oncall, gone = Route(f"{webhooks.url}/oncall", name="oncall"), Route("http://x/", name="gone")
    owed = pending_rows([lost, taken], [oncall], now - timedelta(hours=30))
    owed += pending_rows([elsewhere], [gone], now - timedelta(hours=29))
    given_up = [(*r[:4], "given_up", now - timedelta(hours=5), "", 0) for r in owed
                if r[0] != alert_id(taken)]  # fmt: skip
    delivered = [(*r[:4], "delivered", now - timedelta(hours=29), "", 0) for r in owed
                 if r[0] == alert_id(taken)]  # fmt: skip
    store = connect(env["VIGIL_CLICKHOUSE_DSN"])
    try:
        migrate(store)
        store.insert("vigil.alerts", [alert_row(a, now) for a in (lost, elsewhere, taken)],
                     ALERT_COLUMNS, "a")  # fmt: skip
        store.insert(ALERT_DELIVERY_TABLE, owed + given_up + delivered, DELIVERY_COLUMNS, "d")
    finally:
        store.close()

    dry = vigil(env, "alerts", "redeliver", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "1 page(s) given up on would be owed again (oncall 1)" in dry.stderr
    assert "1 page(s) for route gone left given up: it is no longer in the policy" in dry.stderr
    unknown = vigil(env, "alerts", "redeliver", "--route", "pager")
    assert unknown.returncode == 2 and "--route: no route 'pager'" in unknown.stderr
    again = vigil(env, "alerts", "redeliver", "--tenant", "acme")
    assert again.returncode == 0, again.stderr
    assert "1 page(s) owed again (oncall 1)" in again.stderr
    listed = vigil(env, "alerts", "list", "--owed", "--format", "json")
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["alert_id"], row["owed_to"], row["given_up_for"]) == (alert_id(lost), "oncall", "")

    store = connect(env["VIGIL_CLICKHOUSE_DSN"])
    notifier = _notifier(store, [oncall], timeout=1.0, attempts=1)
    try:
        # raised 30 h ago, but owed again just now: posted, not given up at once
        assert notifier.sweep(store, datetime.now(UTC) + timedelta(seconds=5)) == 1
        wait_until(lambda: _states(store).get((alert_id(lost), "oncall")) == "delivered", 10,
                   "the page delivered in its new round")  # fmt: skip
        assert [page["alert_id"] for page in webhooks.to("/oncall")] == [alert_id(lost)]
        assert notifier.sweep(store, datetime.now(UTC) + timedelta(seconds=10)) == 0
        assert notifier.counts()["given_up"] == 0
    finally:
        notifier.close()
        store.close()
    assert "no page given up on matches" in vigil(env, "alerts", "redeliver").stderr


def test_a_webhook_that_hangs_does_not_hold_up_the_workers_exit(webhooks: Webhooks) -> None:
    """A post in progress when the process exits is left (it stays owed for the next sweep):
    the process exits at once, not after the post's 30 s timeout."""
    webhooks.hanging["/slow"] = 20.0
    child = f"""
import time
from datetime import UTC, datetime
from pipeline.alerting import Notifier, Route
from pipeline.alerts import Alert
notifier = Notifier([Route("{webhooks.url}/slow", name="slow")], lambda *_a, **_k: None, timeout=30)
notifier.submit(Alert("budget_threshold", {{"tenant": "acme"}}, datetime.now(UTC), "spend_usd",
                      1.0, 1.0, "acme crossed $1"))
time.sleep(1)  # the post is in progress
notifier.close(wait=False)
print("closed")
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=10)  # fmt: skip
    assert done.returncode == 0 and done.stdout == "closed\n", done.stderr
    assert webhooks.posts == []  # the hanging post was left, not finished


def test_a_webhook_that_redirects_is_not_followed_and_the_alert_stays_owed(
    store: ClickHouseStore, webhooks: Webhooks, caplog: pytest.LogCaptureFixture
) -> None:
    # urllib turned the POST into a GET of the new address, whose 200 was taken for delivered:
    # the page was recorded as delivered and never arrived
    webhooks.moved["/old"] = f"{webhooks.url}/landing"
    notifier = _notifier(store, [Route(f"{webhooks.url}/old", name="moved")], timeout=5)
    alert = _alert("acme", 50.0)
    with caplog.at_level(logging.WARNING, "vigil.alerts"):
        _raise(store, notifier, [alert], datetime.now(UTC))
        notifier.close()
    assert webhooks.gets == [] and webhooks.posts == []
    assert notifier.counts()["failed"] == 1 and notifier.counts()["delivered"] == 0
    assert _states(store) == {(alert_id(alert), "moved"): "pending"}  # still owed
    assert f"answered 301, to {webhooks.url}: a webhook is not followed" in caplog.text
    assert "/landing" not in caplog.text  # a new address's path may be a secret
