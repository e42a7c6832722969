"""``vigil check`` against the real broker and engine: what a worker or gateway would meet
where the settings point, before and after a worker made its topics and store."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.access import granted_to
from pipeline.check import _grants, grants_at_start
from pipeline.producer import KafkaSender
from pipeline.services import GatewayProcess, free_port
from pipeline.settings import Settings
from pipeline.store import ClickHouseStore, connect, migrate
from pipeline.topics import ensure_topics
from tests.integration.conftest import alter_topic, start_worker, topic_takes, vigil

pytestmark = pytest.mark.integration


def _check(env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    done = vigil(env, "check", *args)
    return done.returncode, done.stdout.splitlines()


def test_check_says_what_a_worker_or_gateway_would_meet(
    vigil_env: dict[str, str], tmp_path: Path, sender: KafkaSender
) -> None:
    config = tmp_path / "vigil.yaml"
    config.write_text("tenants:\n  acme: {redaction: default}\n  globex: {}\n")
    env = {**vigil_env, "VIGIL_CONFIG": str(config)}
    raw, store = f"{env['VIGIL_TOPIC_PREFIX']}.events.raw", Path(env["VIGIL_HOME"]) / "clickhouse"

    code, said = _check(env)  # nothing made yet: the worker would make it all at start
    assert code == 0, said
    assert said == [
        f"ok    policy      {config}: 2 tenant(s), 0 with gateway keys",
        f"ok    kafka       {env['VIGIL_KAFKA_BOOTSTRAP']} over PLAINTEXT as User:ANONYMOUS, "
        "1 broker(s)",
        f"warn  topics      missing {raw}, {raw[: -len('raw')]}clean, "
        f"{raw[: -len('raw')]}dlq, {env['VIGIL_TOPIC_PREFIX']}.rollups, "
        f"{env['VIGIL_TOPIC_PREFIX']}.alerts: the worker creates them at start (its principal "
        "needs CREATE on them)",
        "ok    acls        User:ANONYMOUS may do what the worker does",
        f"warn  clickhouse  no embedded store at {store} yet: the worker makes it at start",
        "vigil check (worker): 0 failed, 2 to look at",
    ]

    worker, _, _ = start_worker(env)
    try:  # the store is the running worker's: asked through it
        code, said = _check(env)
    finally:
        assert worker.stop() == 0, worker.tail()
    assert code == 0, said
    assert f"ok    topics      partitions x copies: {raw} (4x1), " in said[2]
    prefix = env["VIGIL_TOPIC_PREFIX"]
    assert said[3] == (f"ok    retention   {prefix}.events.clean 168 h, {prefix}.events.dlq "
                       f"168 h, {raw} 168 h")  # the local broker's default  # fmt: skip
    assert said[4] == (f"ok    sizes       max.message.bytes {prefix}.events.clean 4,194,304, "
                       f"{prefix}.events.dlq 4,194,304, {raw} 4,194,304")  # fmt: skip
    assert said[6:] == [
        "ok    clickhouse  the embedded store, every migration applied",
        "vigil check (worker): 0 failed, 0 to look at",
    ]

    # topics made to keep messages 2 hours: a store outage longer than that loses events
    short = {**env, "VIGIL_TOPIC_PREFIX": f"{prefix}-short", "VIGIL_TOPIC_RETENTION_HOURS": "2"}
    ensure_topics(Settings.from_env(short))
    code, said = _check(short)
    assert code == 0 and said[3].startswith(f"warn  retention   {prefix}-short.events.clean 2 h")
    assert "worker down longer than 2 h loses events" in said[3]

    # a topic wanting more copies in sync than it has: a broker before Kafka 3.7 refuses every
    # acks=all write to it; this one (3.9) takes them
    isr = {**env, "VIGIL_TOPIC_PREFIX": f"{prefix}-isr"}
    alter_topic(Settings.from_env(isr), f"{prefix}-isr.events.clean", "min.insync.replicas", 2)
    code, said = _check(isr)
    assert code == 0 and said[2] == (
        f"warn  topics      {prefix}-isr.events.clean (1 of 2) keep fewer copies than their "
        "min.insync.replicas: a broker before Kafka 3.7 refuses every write (acks=all) to them, "
        "for ever (3.7 and later want no more copies in sync than there are); lower it "
        "(kafka-configs --alter) or add copies"
    )
    asyncio.run(sender.send([(f"{prefix}-isr.events.clean", None, b"taken")], timeout=30))

    code, said = _check(env, "--role", "gateway")  # no tenant has a key
    assert code == 0 and said[0].startswith(f"warn  policy      {config}: no tenant has an API key")
    assert said[3] == (f"ok    sizes       max.message.bytes {prefix}.events.dlq 4,194,304, "
                       f"{raw} 4,194,304")  # what the gateway writes  # fmt: skip
    assert len(said) == 6 and "clickhouse" not in "".join(said)

    # a DLQ that refuses the largest dead letter would hold the worker; a raw topic taking
    # less than an event may be refuses the SDK's largest
    topic_takes(Settings.from_env(env), raw, 500_000)
    code, said = _check(env, "--role", "gateway")
    assert code == 0 and said[3].startswith(
        f"warn  sizes       max.message.bytes {prefix}.events.dlq 4,194,304, {raw} 500,000: "
        f"{raw} takes less than an event may be (VIGIL_MAX_PAYLOAD_BYTES, 1,048,576, "
    )
    topic_takes(Settings.from_env(env), f"{prefix}.events.dlq", 200_000)
    code, said = _check(env)
    assert code == 0 and said[4] == (
        f"warn  sizes       max.message.bytes {prefix}.events.clean 4,194,304, "
        f"{prefix}.events.dlq 200,000, {raw} 500,000: {prefix}.events.dlq takes less than a "
        "dead letter of 278,528 bytes, so dead letters keep the first 183,616 bytes of their "
        "input, not 262,144; set its max.message.bytes to at least 278,528 to keep more"
    )
    topic_takes(Settings.from_env(env), f"{prefix}.events.dlq", 10_000)
    code, said = _check(env)
    assert code == 1 and said[4].startswith(
        f"FAIL  sizes       max.message.bytes {prefix}.events.clean 4,194,304, "
        f"{prefix}.events.dlq 10,000, {raw} 500,000: a dead letter takes up to 16,384 bytes "
        "besides what it keeps of its input"
    )
    gateway = GatewayProcess(Settings.from_env(env), free_port(), env)  # says it at start
    gateway.start()
    assert gateway.stop() == 0
    logged = gateway.log_path.read_text()
    assert (
        f"ERROR vigil.check: max.message.bytes {prefix}.events.dlq 10,000, {raw} 500,000: "
        "a dead letter takes up to 16,384 bytes" in logged
    ), logged[-2000:]

    server = {**env, "VIGIL_CLICKHOUSE_DSN": f"http://vigil:s3cret@127.0.0.1:{free_port()}",
              "VIGIL_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}  # fmt: skip
    code, said = _check(server, "--timeout", "2")
    assert code == 1, said
    assert said[1].startswith("FAIL  kafka       cannot reach Kafka at 127.0.0.1:")
    assert said[2].startswith("FAIL  clickhouse  ") and "vigil:***@" in said[2], said
    assert said[-1] == "vigil check (worker): 2 failed, 0 to look at"
    assert "s3cret" not in "\n".join(said)


def test_check_names_the_alert_rules_no_event_is_one_of(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    # a rule naming an agent, tenant or metric otherwise than its events do was taken, and
    # judged nothing: a drift monitor of "suport-bot" never fires
    config = tmp_path / "vigil.yaml"
    config.write_text(
        "budgets:\n"
        "  - {scope: {tenant: acme}, period: day, limit_usd: 15}\n"
        "  - {scope: {tenant: acm}, period: day, limit_usd: 15}\n"
        "drift:\n"
        "  - {metric: output_tokens, agent: support-bot, test: ks, threshold: 0.4}\n"
        "  - {metric: output_tokens, agent: suport-bot, test: ks, threshold: 0.4}\n"
        "  - {metric: summary_length, test: ks, threshold: 0.4}\n"
        "evals:\n"
        "  - {metric: faithfulness, min_score: 0.7}\n"
    )
    env = {**vigil_env, "VIGIL_CONFIG": str(config)}
    dsn = Settings.from_env(env).clickhouse_dsn
    store = connect(dsn)
    migrate(store)
    store.close()  # the embedded engine is one process's at a time
    _code, said = _check(env)
    assert "ok    rules       6 rule(s); no event in the last 7 days to try them on" in said
    store = connect(dsn)
    try:
        now = datetime.now(UTC).replace(tzinfo=None)
        store.insert("vigil.audit_log", [
            ("e1", "interaction", now, "acme", "support-bot", ""),
            ("e2", "eval", now, "acme", "support-bot", "faithfulness"),
            ("e3", "drift", now - timedelta(days=8), "acme", "summarizer", "summary_length"),
        ], ["event_id", "kind", "ts", "tenant_id", "agent_id", "metric"], "check-rules")  # fmt: skip
    finally:
        store.close()
    code, said = _check(env)
    assert code == 0, said
    [rules] = [line for line in said if line.startswith("warn  rules")]
    assert rules.startswith(
        "warn  rules       budgets[1] (tenant acm), drift[1] (output_tokens, agent suport-bot), "
        "drift[2] (summary_length): no event of the last 7 days is one of theirs"
    )


def test_check_asks_the_server_whether_its_user_holds_the_writers_grants(
    store: ClickHouseStore,
) -> None:
    """On a server, ``vigil check`` asks ClickHouse (CHECK GRANT) whether its user holds what
    access.sql grants vigil_writer. The embedded engine answers for its default user: every
    table privilege, and no user management, which grants added for the test show lacking by
    name. A grant the server cannot check (an older server) is a warning, not a failure."""
    writer = granted_to("vigil_writer")
    assert ("INSERT", "vigil.audit_log") in writer and ("SELECT", "vigil.caught_up") in writer
    assert ("SELECT", "vigil.audit_chain_heads") not in writer  # revoked from earlier releases
    assert str(_grants(store, writer)) == (
        f"ok    grants      default holds the {len(writer)} grants vigil_writer has"
    )
    extra = [("SHOW USERS", "*.*"), ("ACCESS MANAGEMENT", "*.*")]
    lacking = _grants(store, [*writer, *extra])
    assert lacking.status == "FAIL" and lacking.detail.startswith(
        f"default lacks SHOW USERS ON *.*, ACCESS MANAGEMENT ON *.* (of the {len(writer) + 2} "
        "grants vigil_writer has): run `vigil migrate` as the administrative user, then "
        "`GRANT vigil_writer TO default`"
    ), lacking
    unknown = _grants(store, [("NO SUCH PRIVILEGE", "vigil.audit_log")])
    assert unknown.status == "warn" and unknown.detail.startswith(
        "default's grants not checked (CHECK GRANT): "
    ), unknown


def test_a_worker_on_a_server_says_at_start_which_grants_its_user_lacks(
    store: ClickHouseStore, caplog: pytest.LogCaptureFixture
) -> None:
    """What ``vigil check`` finds of the grants, logged by a worker on a server as it starts
    (``prepare_store``): nothing when its user holds them all, an ERROR naming those it lacks."""
    grants_at_start(store)
    assert caplog.records == []
    asked = [*granted_to("vigil_writer"), ("SHOW USERS", "*.*")]
    grants_at_start(store, asked)
    [said] = caplog.records
    assert said.levelname == "ERROR" and said.getMessage().startswith(
        f"default lacks SHOW USERS ON *.* (of the {len(asked)} grants vigil_writer has)"
    ), said.getMessage()
