"""Alerts from the running worker reach a real HTTP webhook receiver and the alerts table; a
dead webhook holds nothing back and gets what it missed once it answers; a restart does not
fire the same alerts again."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connectors.sdk import Emitter
from pipeline.codec import Registry
from pipeline.events import Cost, Enrichment, Eval, Event
from pipeline.rows import Origin
from pipeline.services import free_port
from pipeline.settings import Settings
from pipeline.sink import LedgerSink, Message
from pipeline.store import connect, migrate
from tests.conftest import http_get
from tests.integration.conftest import Webhooks, count, start_worker, wait_until

pytestmark = pytest.mark.integration


def test_budget_alerts_reach_the_webhook_and_the_table_once(
    vigil_env: dict[str, str], tmp_path: Path, webhooks: Webhooks
) -> None:
    url, posts = webhooks.url, webhooks.posts
    config = tmp_path / "vigil.yaml"
    config.write_text(
        "budgets:\n  - {scope: {tenant: acme}, period: day, limit_usd: 2}\n"
        "alerts:\n  routes:\n"
        f"    - {{webhook: 'http://127.0.0.1:{free_port()}/nobody-listens'}}\n"
        f"    - {{webhook: '{url}/all'}}\n"
        f"    - {{match: {{severity: critical}}, webhook: '{url}/slack', format: slack}}\n"
    )
    address = f"127.0.0.1:{free_port()}"
    env = {**vigil_env, "VIGIL_CONFIG": str(config), "VIGIL_WORKER_HTTP_ADDRESS": address}
    worker, settings, store = start_worker(env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)

    def webhooks(outcome: str) -> str:
        return f'vigil_worker_alert_webhooks_total{{outcome="{outcome}"}}'

    now = datetime.now(UTC)
    if now.hour == 23 and now.minute >= 55:  # keep every event in one budget day
        now -= timedelta(minutes=10)

    def spend(n: int, first: int, ahead: timedelta = timedelta(0)) -> None:
        for i in range(first, first + n):
            emitter.emit(Event(event_id=f"a-{i}", kind="cost", ts=now + ahead, tenant_id="acme",
                               agent_id="bot", body=Cost(0.25)))  # fmt: skip
        emitter.flush()

    try:
        # $3 of a $2 day: 50%, 80% and 100%; the first $0.25 stored first, stamped by a clock
        # running 50 minutes fast
        spend(1, 0, ahead=timedelta(minutes=50))
        wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") == 1, 30, "1 event")
        spend(11, 1)
        wait_until(lambda: count(store, "SELECT count() FROM vigil.alerts") >= 3, 60, "3 alerts")
        # judged as of when the events were stored, not at the fast clock's time
        assert count(store, "SELECT (SELECT max(fired_at) FROM vigil.alerts) <= "
                            "(SELECT max(ingested_at) FROM vigil.audit_log)") == 1  # fmt: skip
        rows = store.query_rows(
            "SELECT kind, threshold, severity, tenant_id FROM vigil.alerts ORDER BY threshold"
        )
        assert rows == [("budget_threshold", 1.0, "warning", "acme"),
                        ("budget_threshold", 1.6, "warning", "acme"),
                        ("budget_threshold", 2.0, "critical", "acme")]  # fmt: skip
        wait_until(lambda: len(posts) >= 4, 30, "4 webhook posts")
        by_path: dict[str, list[Any]] = {}
        for path, body in posts:
            by_path.setdefault(path, []).append(body)
        assert sorted(a["threshold"] for a in by_path["/all"]) == [1.0, 1.6, 2.0]
        assert all(a["kind"] == "budget_threshold" and a["alert_id"] for a in by_path["/all"])
        assert len(by_path["/slack"]) == 1 and "budget_threshold" in by_path["/slack"][0]["text"]
        # the worker's /metrics: 4 delivered, and the dead webhook's 3 given up on after retries
        said = (f"{webhooks('delivered')} 4", f"{webhooks('failed')} 3")
        wait_until(lambda: all(line in http_get(f"http://{address}/metrics")[1] for line in said),
                   30, "the webhooks' outcomes counted", worker.tail)  # fmt: skip
        # the dead webhook is still being retried; events keep flowing meanwhile
        spend(2, 100)
        wait_until(
            lambda: count(store, "SELECT count() FROM vigil.audit_log") == 14, 30, "14 events"
        )
        assert worker.stop() == 0, worker.tail()
        # a restart rebuilds the budget from the ledger and does not fire the same levels again
        store = worker.start()
        assert store is not None
        spend(2, 200)
        wait_until(
            lambda: count(store, "SELECT count() FROM vigil.audit_log") == 16, 60, "16 events"
        )
        assert count(store, "SELECT count() FROM vigil.alerts") == 3
        assert len([p for p in posts if p[0] == "/all"]) == 3
        # the one-minute rollups count every stored event once, across the restart
        assert count(store, "SELECT sum(events) FROM vigil.rollups_1m") == 16
        assert count(store, "SELECT sum(cost_usd) FROM vigil.rollups_1m") == 4
    finally:
        emitter.close()
        assert worker.stop() in (0, None), worker.tail()


def _eval_config(tmp_path: Path, webhooks: Webhooks) -> Path:
    """A vigil.yaml with an eval rule of one-minute windows judged a minute after their end,
    its alerts posted to ``webhooks``."""
    config = tmp_path / "vigil.yaml"
    config.write_text(
        "evals:\n  - {metric: faithfulness, min_score: 0.8, window: 1m, min_samples: 3}\n"
        f"alerts:\n  window_grace: 1m\n  routes:\n    - {{webhook: '{webhooks.url}/all'}}\n"
    )
    return config


def _send_poor_scores(emitter: Emitter, minute: datetime) -> None:
    """Three scores of 0.3 of acme's bot in ``minute``, delivered, and nothing of acme after."""
    for i in range(3):
        at = minute + timedelta(seconds=10 * i)
        emitter.emit(Event(event_id=f"q-{i}", kind="eval", ts=at, tenant_id="acme",
                           agent_id="bot", body=Eval("faithfulness", 0.3)))  # fmt: skip
    emitter.flush()


def _the_windows_alert(
    store: Any, webhooks: Webhooks, minute: datetime, tail: Callable[[], str]
) -> None:
    """Wait for the one alert of ``minute``'s window of three scores of 0.3, in the table and
    posted to the webhook."""
    wait_until(lambda: count(store, "SELECT count() FROM vigil.alerts") == 1, 60,
               "the window's alert", tail)  # fmt: skip
    ((kind, fired_at, message),) = store.query_rows(
        "SELECT kind, toUnixTimestamp(fired_at), message FROM vigil.alerts"
    )
    assert (kind, int(fired_at)) == ("eval_regression", (minute + timedelta(minutes=1)).timestamp())
    assert "averaged 0.300 over 3 scores" in message
    wait_until(lambda: len(webhooks.posts) == 1, 30, "the webhook's post")


def test_an_eval_window_whose_scores_stopped_is_judged_by_its_tenants_later_events(
    vigil_env: dict[str, str], tmp_path: Path, webhooks: Webhooks
) -> None:
    """Three poor scores of bot five minutes ago, and none after them to close their one-minute
    window: it is not judged until acme's other agent spends past its end and the grace (a
    minute), then once, and the alert reaches the table and the webhook. A score of that window
    stored after it is left out, counted on /metrics and said in the log."""
    config = _eval_config(tmp_path, webhooks)
    address = f"127.0.0.1:{free_port()}"
    # no lag sample in the test's time: one finding the pipeline caught up would judge the
    # window on the wall clock (the next test), not on acme's events
    env = {**vigil_env, "VIGIL_CONFIG": str(config), "VIGIL_WORKER_HTTP_ADDRESS": address,
           "VIGIL_LAG_SAMPLE_SECONDS": "3600"}  # fmt: skip
    worker, settings, store = start_worker(env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)

    def send(event_id: str, agent: str, at: datetime, body: Any) -> None:
        emitter.emit(Event(event_id=event_id, kind="eval" if isinstance(body, Eval) else "cost",
                           ts=at, tenant_id="acme", agent_id=agent, body=body))  # fmt: skip
        emitter.flush()

    def stored() -> int:
        return count(store, "SELECT count() FROM vigil.audit_log")

    try:
        for i in range(3):
            send(f"q-{i}", "bot", minute + timedelta(seconds=10 * i), Eval("faithfulness", 0.3))
        send("c-0", "other", minute + timedelta(minutes=1, seconds=59), Cost(0.01))
        wait_until(lambda: stored() == 4, 30, "3 scores and a spend")
        time.sleep(2)  # the alerts follow the ledger's write: none of them
        assert count(store, "SELECT count() FROM vigil.alerts") == 0
        send("c-1", "other", minute + timedelta(minutes=2), Cost(0.01))
        _the_windows_alert(store, webhooks, minute, worker.tail)
        send("c-2", "other", minute + timedelta(minutes=4), Cost(0.01))
        send("q-late", "bot", minute + timedelta(seconds=40), Eval("faithfulness", 0.3))
        wait_until(lambda: stored() == 7, 30, "7 events")
        late = 'vigil_worker_alert_samples_late_total{rule="eval",tenant="acme"} 1'
        wait_until(lambda: late in http_get(f"http://{address}/metrics")[1].splitlines(), 30,
                   "the late score counted", worker.tail)  # fmt: skip
        assert "1 drift sample(s) or eval score(s) came after their window" in worker.tail(50)
        assert count(store, "SELECT count() FROM vigil.alerts") == 1 and len(webhooks.posts) == 1
    finally:
        emitter.close()
        assert worker.stop() in (0, None), worker.tail()


def test_a_tenant_that_sends_nothing_more_is_judged_once_the_pipeline_has_caught_up(
    vigil_env: dict[str, str], tmp_path: Path, webhooks: Webhooks
) -> None:
    """Three poor scores of bot five minutes ago, and nothing of acme after them: once the lag
    samples show every event sent before a time evaluated, their window (its end and the grace,
    a minute, passed) is judged, and the alert reaches the table and the webhook. A restarted
    worker's state is rebuilt told of that time: its own samples do not raise it again."""
    config = _eval_config(tmp_path, webhooks)
    address = f"127.0.0.1:{free_port()}"
    env = {**vigil_env, "VIGIL_CONFIG": str(config), "VIGIL_LAG_SAMPLE_SECONDS": "1",
           "VIGIL_WORKER_HTTP_ADDRESS": address}  # fmt: skip
    started = datetime.now(UTC)
    worker, settings, store = start_worker(env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)

    def caught_up_since(at: datetime) -> int:
        """How many caught-up times the lag samples since ``at`` showed (``CaughtUp``)."""
        return count(store, (
            "SELECT count() FROM vigil.caught_up WHERE at > "
            f"fromUnixTimestamp64Milli({int(at.timestamp() * 1000)})"
        ))  # fmt: skip

    try:
        _send_poor_scores(emitter, minute)
        _the_windows_alert(store, webhooks, minute, worker.tail)
        # when the pipeline was last found caught up, on /metrics
        gauge = "vigil_worker_caught_up_timestamp_seconds "
        metrics = http_get(f"http://{address}/metrics")[1].splitlines()
        (line,) = [line for line in metrics if line.startswith(gauge)]
        assert started.timestamp() < float(line.removeprefix(gauge)) < time.time()
        assert worker.stop() == 0, worker.tail()
        restarted = datetime.now(UTC)
        store = worker.start()
        assert store is not None
        wait_until(lambda: caught_up_since(restarted) >= 3, 60, "3 samples caught up", worker.tail)
        assert count(store, "SELECT count() FROM vigil.alerts") == 1
        assert len(webhooks.posts) == 1, webhooks.posts
    finally:
        emitter.close()
        assert worker.stop() in (0, None), worker.tail()


def test_a_caught_up_time_the_store_refused_is_acted_on_once_stored(
    vigil_env: dict[str, str], tmp_path: Path, webhooks: Webhooks
) -> None:
    """While the store refuses inserts into ``vigil.caught_up`` (and takes the rest) the worker
    says so at each sample, goes on sampling the lag, and judges nothing on a time it could not
    store (a rebuild would not be told of it); once the store takes it, the time is stored and
    the quiet window judged, once."""
    config = _eval_config(tmp_path, webhooks)
    refusing = tmp_path / "caught-up-refused"
    env = {**vigil_env, "VIGIL_CONFIG": str(config), "VIGIL_LAG_SAMPLE_SECONDS": "1",
           "VIGIL_FAULT_STORE_OUTAGE_FILE": str(refusing)}  # fmt: skip
    worker, settings, store = start_worker(env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    assert worker.log_path is not None
    log = worker.log_path

    def refused() -> int:
        return log.read_text(errors="replace").count("caught-up time not stored")

    try:
        refusing.write_text("vigil.caught_up\n")
        _send_poor_scores(emitter, minute)
        wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") == 3, 30,
                   "the scores stored", worker.tail)  # fmt: skip
        said, sampled = refused(), count(store, "SELECT count() FROM vigil.consumer_lag")
        wait_until(lambda: refused() >= said + 3, 30, "3 caught-up times refused", worker.tail)
        assert count(store, "SELECT count() FROM vigil.consumer_lag") > sampled
        assert count(store, "SELECT count() FROM vigil.alerts") == 0
        assert "consumer lag not sampled" not in log.read_text(errors="replace")
        refusing.unlink()
        _the_windows_alert(store, webhooks, minute, worker.tail)
        assert count(store, "SELECT count() FROM vigil.caught_up") >= 1
    finally:
        emitter.close()
        assert worker.stop() in (0, None), worker.tail()


def test_a_quiet_tenants_window_is_judged_while_other_tenants_events_flow(
    vigil_env: dict[str, str], tmp_path: Path, webhooks: Webhooks
) -> None:
    """globex sends about 400 events a second throughout; acme's bot sent three poor scores five
    minutes ago and nothing after them. Their window is judged while globex's events flow,
    though hardly any lag sample finds every partition committed to its end (none of 33 in a
    run here, which left the window open): the samples show the pipeline caught up at an
    earlier sample's time (``CaughtUp``)."""
    config = _eval_config(tmp_path, webhooks)
    env = {**vigil_env, "VIGIL_CONFIG": str(config), "VIGIL_LAG_SAMPLE_SECONDS": "1"}
    worker, settings, store = start_worker(env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    flowing = Emitter(settings.bootstrap, settings.topics.raw)
    stop = threading.Event()

    def flow() -> None:
        for n in itertools.count():
            if stop.wait(0.05):
                return
            for i in range(20):
                flowing.emit(Event(event_id=f"c-{n}-{i}", kind="cost", ts=datetime.now(UTC),
                                   tenant_id="globex", agent_id=f"bot-{i % 7}",
                                   body=Cost(0.001)))  # fmt: skip

    traffic = threading.Thread(target=flow, name="globex")
    traffic.start()
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    try:
        wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") > 1000, 60,
                   "globex's events", worker.tail)  # fmt: skip
        _send_poor_scores(emitter, minute)
        _the_windows_alert(store, webhooks, minute, worker.tail)
        assert traffic.is_alive()  # judged while the events flowed
    finally:
        stop.set()
        traffic.join()
        emitter.close()
        flowing.close()
        assert worker.stop() in (0, None), worker.tail()


def test_levels_crossed_by_stored_spend_that_no_alert_was_raised_for_are_raised_at_start(
    vigil_env: dict[str, str], tmp_path: Path, webhooks: Webhooks
) -> None:
    """The ledger holds $1.75 of acme's $2 day: stored by a worker that stopped before it raised
    the 50% and 80% levels that spend crossed (it raises a batch's alerts after the batch's
    insert, and the replay of the ledger drops what it fires). The next worker raises both at
    its start, to the table and the webhook, saying they are late; restarted, it raises nothing
    again."""
    url, posts = webhooks.url, webhooks.posts
    config = tmp_path / "vigil.yaml"
    config.write_text(
        "budgets:\n  - {scope: {tenant: acme}, period: day, limit_usd: 2}\n"
        f"alerts:\n  routes:\n    - {{webhook: '{url}/all'}}\n"
    )
    env = {**vigil_env, "VIGIL_CONFIG": str(config)}
    settings = Settings.from_env(env)
    now = datetime.now(UTC)
    if now.hour == 23 and now.minute >= 55:  # keep every event in one budget day
        now -= timedelta(minutes=10)
    registry = Registry.load()

    def cost(i: int, tenant: str) -> Event:
        return Event(event_id=f"s-{i}", kind="cost", ts=now, tenant_id=tenant, agent_id="bot",
                     body=Cost(0.25), enrichment=Enrichment("non_token", "0.25"))  # fmt: skip

    ledger = connect(settings.clickhouse_dsn)
    try:
        migrate(ledger)
        stored = [Message(Origin(settings.topics.clean, 0, i), b"acme",
                          registry.encode_event(cost(i, "acme"))) for i in range(7)]  # fmt: skip
        assert LedgerSink(ledger, registry).write(stored).inserted == 7
    finally:
        ledger.close()
    worker, settings, store = start_worker(env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    try:
        wait_until(lambda: count(store, "SELECT count() FROM vigil.alerts") >= 2, 60, "2 alerts",
                   worker.tail)  # fmt: skip
        rows = store.query_rows("SELECT threshold, observed, position(message, 'raised late') > 0 "
                                "FROM vigil.alerts ORDER BY threshold")  # fmt: skip
        assert rows == [(1.0, 1.75, True), (1.6, 1.75, True)]
        wait_until(lambda: len(posts) >= 2, 30, "2 webhook posts")
        assert sorted(body["threshold"] for _path, body in posts) == [1.0, 1.6]
        assert worker.stop() == 0, worker.tail()
        store = worker.start()
        assert store is not None
        # written once the alert state is rebuilt: its levels were raised, none is raised again
        emitter.emit(cost(8, "globex"))
        emitter.flush()
        wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") == 8, 60, "8 events")
        assert count(store, "SELECT count() FROM vigil.alerts") == 2
        assert len(posts) == 2
    finally:
        emitter.close()
        assert worker.stop() in (0, None), worker.tail()


def test_an_alert_its_webhook_did_not_get_is_posted_once_it_answers_even_after_a_restart(
    vigil_env: dict[str, str], tmp_path: Path, webhooks: Webhooks
) -> None:
    """The on-call webhook answers 500 to every post while acme's spend crosses 50% of its
    day: the worker posts the alert again at each sweep, and stops with it undelivered. The
    next worker, with the webhook back, posts it at its first sweep, once, and records it
    delivered."""
    webhooks.failing["/oncall"] = 10_000
    config = tmp_path / "vigil.yaml"
    config.write_text(
        "budgets:\n  - {scope: {tenant: acme}, period: day, limit_usd: 2}\n"
        f"alerts:\n  routes:\n    - {{name: oncall, webhook: '{webhooks.url}/oncall'}}\n"
    )
    address = f"127.0.0.1:{free_port()}"
    env = {**vigil_env, "VIGIL_CONFIG": str(config), "VIGIL_ALERT_SWEEP_SECONDS": "2",
           "VIGIL_WEBHOOK_TIMEOUT_SECONDS": "1", "VIGIL_WORKER_HTTP_ADDRESS": address}  # fmt: skip

    def owed(n: int) -> bool:
        return (
            f'vigil_worker_alert_pages_owed{{route="oncall"}} {n}'
            in http_get(f"http://{address}/metrics")[1]
        )

    worker, settings, store = start_worker(env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    now = datetime.now(UTC)
    if now.hour == 23 and now.minute >= 55:  # keep every event in one budget day
        now -= timedelta(minutes=10)

    def states() -> list[tuple[str, str]]:
        return store.query_rows("SELECT route, toString(state) FROM vigil.alert_deliveries "
                                "ORDER BY state")  # fmt: skip

    try:
        for i in range(5):  # $1.25: the 50% level
            emitter.emit(Event(event_id=f"o-{i}", kind="cost", ts=now, tenant_id="acme",
                               agent_id="bot", body=Cost(0.25)))  # fmt: skip
        emitter.flush()
        wait_until(lambda: count(store, "SELECT count() FROM vigil.alerts") == 1, 60, "an alert",
                   worker.tail)  # fmt: skip
        # three attempts of the first post, then one more at a sweep once no first post can
        # be in flight (7 s after it was raised: Notifier.longest_post and a second)
        wait_until(lambda: webhooks.refused >= 4, 30, "the alert posted again", worker.tail)
        assert states() == [("oncall", "pending")]
        wait_until(lambda: owed(1), 10, "the page owed in /metrics", worker.tail)
        assert worker.stop() == 0, worker.tail()
        refused = webhooks.refused

        webhooks.failing["/oncall"] = 0
        store = worker.start()
        assert store is not None
        wait_until(lambda: len(webhooks.to("/oncall")) == 1, 30, "the alert delivered",
                   worker.tail)  # fmt: skip
        (alert,) = webhooks.to("/oncall")
        assert alert["kind"] == "budget_threshold" and alert["threshold"] == 1.0
        assert [(alert["alert_id"],)] == store.query_rows("SELECT alert_id FROM vigil.alerts")
        wait_until(lambda: states() == [("oncall", "pending"), ("oncall", "delivered")], 10,
                   "the delivery recorded")  # fmt: skip
        time.sleep(5)  # two more sweeps: nothing is owed, nothing posted again
        assert len(webhooks.posts) == 1 and webhooks.refused == refused
        assert owed(0)
    finally:
        emitter.close()
        assert worker.stop() in (0, None), worker.tail()
