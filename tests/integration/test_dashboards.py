"""Every Grafana dashboard panel, macros expanded as the ClickHouse datasource expands them,
run against a store filled by the demo workload: each returns the columns its panel expects
and, for the demo's data, rows."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.store import ClickHouseStore
from tests.conftest import ROOT
from tests.demo_store import fill

pytestmark = pytest.mark.integration
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
INTERVAL_S = 60


def expand(sql: str, start: datetime, end: datetime, values: dict[str, list[str]]) -> str:
    """The grafana-clickhouse-datasource macros and Grafana's variable formats, for a fixed
    time range and the given variable values (all of them: the dashboards' default)."""
    frm, to = int(start.timestamp()), int(end.timestamp())
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)",
                 rf"\1 >= toDateTime({frm}) AND \1 <= toDateTime({to})", sql)  # fmt: skip
    sql = re.sub(r"\$__timeInterval\(([^)]+)\)",
                 rf"toStartOfInterval(toDateTime(\1), INTERVAL {INTERVAL_S} second)", sql)  # fmt: skip
    sql = sql.replace("$__fromTime", f"toDateTime({frm})").replace("$__toTime", f"toDateTime({to})")
    sql = sql.replace("$__interval_s", str(INTERVAL_S))
    for name, options in values.items():
        quoted = ", ".join("'" + o.replace("'", "\\'") + "'" for o in options) or "''"
        sql = sql.replace(f"${{{name}:singlequote}}", quoted)
        sql = sql.replace(f"${{{name}}}", options[0] if len(options) == 1 else "")
    assert "$" not in sql, f"unexpanded macro or variable in: {sql}"
    return sql


def _columns_and_rows(store: ClickHouseStore, sql: str) -> tuple[list[str], int]:
    out = store.query_raw(sql, "TSVWithNames").decode().splitlines()
    return out[0].split("\t"), len(out) - 1


def _measure_lag(bootstrap: str) -> list[tuple[Any, ...]]:
    """A real lag sample: a topic with 10 messages over 2 partitions, and a group that has
    committed offset 3 on partition 0 only."""
    import uuid

    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from pipeline.kafkaconn import KafkaConnection
    from pipeline.lag import consumer_lag

    topic, group = f"lag-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result()
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(10):
        producer.produce(topic, b"x", partition=i % 2)
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    consumer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
    consumer.close()
    rows, gaps = consumer_lag(KafkaConnection(bootstrap), group, [topic, "no-such-topic"])
    assert gaps == []
    assert [(r[3], r[4], r[5], r[6]) for r in rows] == [(0, 3, 5, 2), (1, 0, 5, 5)]
    return rows


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> Any:
    from pipeline.alerting import CAUGHT_UP_COLUMNS, CAUGHT_UP_TABLE
    from pipeline.lag import LAG_COLUMNS
    from pipeline.store import connect, migrate

    store = connect(f"chdb://{tmp_path_factory.mktemp('dash') / 'ch'}")
    migrate(store)
    now = fill(store)
    store.insert("vigil.consumer_lag", _measure_lag(kafka_bootstrap), LAG_COLUMNS, "lag")
    shown = [(now, "vigil-worker", now - timedelta(minutes=1))]
    store.insert(CAUGHT_UP_TABLE, shown, CAUGHT_UP_COLUMNS, "caught-up")
    yield store, now
    store.close()


def test_there_are_four_dashboards_with_the_template_variables() -> None:
    assert {p.stem for p in DASHBOARDS} == {"cost", "audit", "quality", "health"}
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        names = {v["name"] for v in board["templating"]["list"]}
        assert {"tenant", "team", "agent", "environment"} <= names, path.name
        for panel in board["panels"]:
            assert panel["datasource"]["type"] == "grafana-clickhouse-datasource"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_query_runs_and_returns_what_the_panel_expects(
    path: Path, demo_store: tuple[ClickHouseStore, datetime]
) -> None:
    store, now = demo_store
    start, end = now - timedelta(hours=3), now + timedelta(minutes=5)
    board = json.loads(path.read_text())
    values: dict[str, list[str]] = {}
    for var in board["templating"]["list"]:  # in order: later queries use earlier variables
        if var["type"] == "query":
            rows = store.query_rows(expand(var["query"], start, end, values))
            values[var["name"]] = [str(r[0]) for r in rows]
            assert values[var["name"]] or var["name"] == "team", f"{var['name']} has no values"
        else:
            values[var["name"]] = [""]
    for panel in board["panels"]:
        sql = expand(panel["targets"][0]["rawSql"], start, end, values)
        columns, rows = _columns_and_rows(store, sql)
        assert columns == panel["vigil"]["expected_columns"], panel["title"]
        assert rows > 0, f"{path.stem}: {panel['title']} returned no rows for the demo data"


def test_the_caught_up_stat_says_how_long_ago_and_nothing_before_any_time_is_stored(
    demo_store: tuple[ClickHouseStore, datetime],
) -> None:
    """The health dashboard's caught-up clock: seconds since the latest time stored (a minute
    before the demo's now here), and no number at all where none is (not the 56 years since
    1970 that max() of no rows gives)."""
    store, _ = demo_store
    board = json.loads((ROOT / "dashboards" / "health.json").read_text())
    (panel,) = [p for p in board["panels"] if p["title"].startswith("Caught up")]
    sql = panel["targets"][0]["rawSql"]
    ((seconds,),) = store.query_rows(sql)
    assert 60 <= seconds < 3600
    nowhere = sql.replace("FROM vigil.caught_up", "FROM vigil.caught_up WHERE consumer_group = ''")
    assert store.query_rows(nowhere) == [(None,)]


def test_search_boxes_filter_the_audit_table(demo_store: tuple[ClickHouseStore, datetime]) -> None:
    store, now = demo_store
    board = json.loads((ROOT / "dashboards" / "audit.json").read_text())
    table = board["panels"][0]["targets"][0]["rawSql"]
    user = str(
        store.query_rows("SELECT any(reviewer_id) FROM vigil.audit_log WHERE kind = 'decision'")[0][
            0
        ]
    )
    values = {v: [str(r[0]) for r in store.query_rows(
        f"SELECT DISTINCT {c} FROM vigil.audit_log")] for v, c in
        (("tenant", "tenant_id"), ("team", "team"), ("agent", "agent_id"), ("environment", "environment"))}  # fmt: skip
    sql = expand(table, now - timedelta(hours=3), now + timedelta(minutes=5),
                 {**values, "user": [user], "trace": [""], "unit": [""]})  # fmt: skip
    rows = store.query_rows(sql)
    assert rows and all(r[11] == user or r[7] == user for r in rows)


def test_provisioning_points_grafana_at_these_dashboards(
    demo_store: tuple[ClickHouseStore, datetime],
) -> None:
    prov = ROOT / "dashboards" / "provisioning"
    datasource = yaml.safe_load((prov / "datasources" / "vigil.yaml").read_text())
    by_uid = {ds["uid"]: ds for ds in datasource["datasources"]}
    assert by_uid["vigil-clickhouse"]["type"] == "grafana-clickhouse-datasource"
    # the processes dashboard's, at the Prometheus the stack runs (docker-compose.yml)
    assert by_uid["vigil-prometheus"]["type"] == "prometheus" and len(by_uid) == 2
    assert by_uid["vigil-prometheus"]["url"] == "${VIGIL_GRAFANA_PROMETHEUS_URL}"
    providers = yaml.safe_load((prov / "dashboards" / "vigil.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/vigil"
    rules = yaml.safe_load((prov / "alerting" / "vigil.yaml").read_text())
    # each rule's query on the demo's store: the count its threshold fires on
    counts = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["data"][0]["datasourceUid"] == "vigil-clickhouse"
            (row,) = demo_store[0].query_rows(rule["data"][0]["model"]["rawSql"])
            counts[rule["title"]] = row[0]
    assert counts["Drift detected"] >= 1  # the demo's drift, just stored
    # the demo's webhook owes the first page, raised 20 minutes ago, and took the others
    assert counts["Alert pages not delivered"] == 1
    assert set(counts) == {"Budget forecast breach", "Drift detected", "Alert pages not delivered"}
