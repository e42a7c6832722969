"""Vigil against a broker like a production cluster's: its one listener takes only TLS
connections signed in with SASL (``SASL_SSL``), its certificate signed by a CA of the test's own.
A client Vigil makes without the settings cannot reach it, so the pipeline's events arriving
shows that every client on their path signs in."""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.sdk import Emitter
from pipeline.devkafka import BrokerSecurity, LocalKafka, fetch_jars
from pipeline.events import Event, Interaction
from pipeline.services import GatewayProcess, free_port
from pipeline.settings import Settings
from pipeline.topics import TopicError, ensure_topics
from tests.integration.conftest import count, start_worker, wait_until
from tests.integration.test_gateway import ACME_KEY, _json_span, _json_traces, _post

pytestmark = pytest.mark.integration

EVENTS = 60


def _certificates(folder: Path) -> tuple[Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1: (the broker's PEM keystore, the CA)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-days", "2", "-subj", "/CN=vigil-test-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key",
            "-out", "broker.csr", "-subj", "/CN=localhost")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "broker.pem", "-days", "2", "-extfile", "san.ext")  # fmt: skip
    keystore = folder / "keystore.pem"
    keystore.write_text((folder / "broker.key").read_text() + (folder / "broker.pem").read_text())
    return keystore, folder / "ca.pem"


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    keystore, ca = _certificates(tmp_path_factory.mktemp("certs"))
    users = {"admin": secrets.token_urlsafe(16), "vigil": secrets.token_urlsafe(16)}
    broker = LocalKafka(
        tmp_path_factory.mktemp("secure-kafka"),
        fetch_jars(Settings.from_env({}).cache_dir),
        free_port(2),
        BrokerSecurity(keystore, ca, users),
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _env(broker: LocalKafka, home: Path, **security: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    env = {name: value for name, value in os.environ.items() if not name.startswith("VIGIL_KAFKA_")}
    env.update(
        VIGIL_HOME=str(home),
        VIGIL_KAFKA_BOOTSTRAP=broker.bootstrap,
        VIGIL_TOPIC_PREFIX=f"s{tag}",
        VIGIL_CONSUMER_GROUP=f"vigil-secure-{tag}",
        VIGIL_SINK_FLUSH_SECONDS="0.3",
        **security,
    )
    return env


def _signed_in(broker: LocalKafka, password: str, **more: str) -> dict[str, str]:
    """The settings of a client that signs in as the user ``vigil``."""
    assert broker.security is not None
    return {
        "VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "VIGIL_KAFKA_SASL_USERNAME": "vigil",
        "VIGIL_KAFKA_SASL_PASSWORD": password,
        "VIGIL_KAFKA_SSL_CA_LOCATION": str(broker.security.truststore),
        **more,
    }


def test_the_pipeline_signs_in_with_scram_over_tls(
    secure_broker: LocalKafka, tmp_path: Path
) -> None:
    """Events sent through the SDK and the gateway are validated, stored and dead-lettered, and
    the worker's lag is sampled: the SDK's producer, the gateway's, the raw consumer, aiokafka
    under Faust (clean, the DLQ), the producer of clean and dead letters, the lag sampler and
    the admin client all signed in, with a password read from a file."""
    assert secure_broker.security is not None
    password = secure_broker.security.users["vigil"]
    secret = tmp_path / "kafka-password"
    secret.write_text(password + "\n")
    security = _signed_in(secure_broker, "", VIGIL_KAFKA_SASL_MECHANISM="SCRAM-SHA-512")
    del security["VIGIL_KAFKA_SASL_PASSWORD"]
    config = tmp_path / "vigil.yaml"
    config.write_text("tenants:\n  acme: {api_keys_env: ACME_KEYS}\n")
    env = _env(secure_broker, tmp_path / "home", VIGIL_KAFKA_SASL_PASSWORD_FILE=str(secret),
               VIGIL_CONFIG=str(config), ACME_KEYS=ACME_KEY, **security)  # fmt: skip
    worker, settings, store = start_worker(env)
    gateway = GatewayProcess(settings, free_port(), env)
    try:
        gateway.start()
        emitter = Emitter.from_settings(settings)
        event = Event(
            event_id="",
            kind="interaction",
            ts=datetime.now(UTC),
            tenant_id="acme",
            agent_id="bot",
            body=Interaction("openai", "gpt-4o", input_tokens=10, output_tokens=2),
        )
        for i in range(EVENTS):
            emitter.emit(dataclasses.replace(event, event_id=f"s-{i}"))
        emitter.emit(dataclasses.replace(event, event_id="no-tenant", tenant_id=""))
        emitter.close()
        assert emitter.delivered == EVENTS + 1
        status, _, reply = _post(f"{gateway.url}/v1/traces", _json_traces([_json_span(1)]))
        assert status == 200, reply

        stored = EVENTS + 1
        wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") >= stored, 90,
                   f"{stored} events stored", worker.tail)  # fmt: skip
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") >= 1, 60,
                   "the dead letter stored", worker.tail)  # fmt: skip
        wait_until(lambda: count(store, "SELECT count() FROM vigil.consumer_lag") > 0, 60,
                   "a lag sample", worker.tail)  # fmt: skip
        time.sleep(1)
        assert store.query_rows(
            "SELECT countIf(event_id LIKE 's-%'), uniqExact(event_id), "
            "countIf(agent_id = 'json-agent') FROM vigil.audit_log"
        ) == [(EVENTS, stored, 1)]
        assert store.query_rows("SELECT reason_code FROM vigil.dlq") == [("missing_tenant",)]
    finally:
        gateway_code = gateway.stop()
        code = worker.stop()
    logs = [process.log_path for process in (worker, gateway)]
    said = "".join(path.read_text(errors="replace") for path in logs if path and path.exists())
    assert (code, gateway_code) == (0, 0), said[-3000:]
    assert password not in said


def test_a_refused_sign_in_is_named_at_once_and_without_the_password(
    secure_broker: LocalKafka, tmp_path: Path
) -> None:
    wrong = secrets.token_urlsafe(16)
    env = _env(secure_broker, tmp_path / "home", **_signed_in(secure_broker, wrong))
    began = time.monotonic()
    with pytest.raises(TopicError) as refused:
        ensure_topics(Settings.from_env(env), timeout=30)
    assert time.monotonic() - began < 15  # not the 30 s a broker that does not answer gets
    message = str(refused.value)
    assert f"Kafka at {secure_broker.bootstrap} refused Vigil's SASL_SSL connection" in message
    assert "Authentication failed" in message
    assert wrong not in message

    # the worker says the same and stops, rather than waiting on a broker that will not let it in
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "worker"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "vigil: error: Kafka at" in result.stderr and "Authentication failed" in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_an_untrusted_certificate_is_named(secure_broker: LocalKafka, tmp_path: Path) -> None:
    """Without the CA, the broker's certificate is checked against the system's CAs, and fails."""
    assert secure_broker.security is not None
    security = _signed_in(secure_broker, secure_broker.security.users["vigil"])
    del security["VIGIL_KAFKA_SSL_CA_LOCATION"]
    with pytest.raises(TopicError) as refused:
        ensure_topics(Settings.from_env(_env(secure_broker, tmp_path, **security)), timeout=30)
    assert "certificate verify failed" in str(refused.value)


def test_a_plaintext_client_is_told_what_to_set(secure_broker: LocalKafka, tmp_path: Path) -> None:
    with pytest.raises(TopicError) as unreached:
        ensure_topics(Settings.from_env(_env(secure_broker, tmp_path)), timeout=3)
    message = str(unreached.value)
    assert f"cannot reach Kafka at {secure_broker.bootstrap} over PLAINTEXT within 3s" in message
    assert "VIGIL_KAFKA_SECURITY_PROTOCOL" in message
