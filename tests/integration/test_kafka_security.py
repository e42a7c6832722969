"""Vigil against brokers like production clusters: one whose only listener takes TLS
connections signed in with SASL (``SASL_SSL``), its certificate signed by a CA of the test's
own, where each user may do only what an ACL allows it; and one whose only listener takes TLS
connections from clients with a certificate its CA signed (mutual TLS). A client Vigil makes
without the settings cannot reach them, so the pipeline's events arriving shows that every
client on their path signs in, and that the ACLs ``vigil kafka acls`` makes are enough."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AclBindingFilter, AclOperation, AdminClient

from connectors.sdk import Emitter
from pipeline.acls import worker_grants
from pipeline.certs import expiries
from pipeline.devkafka import BrokerSecurity, LocalKafka, fetch_jars
from pipeline.events import Event, Interaction
from pipeline.logs import RDKAFKA_LOGGER
from pipeline.producer import KafkaSender, Unavailable
from pipeline.services import GatewayProcess, free_port
from pipeline.settings import Settings
from pipeline.topics import TopicError, ensure_topics
from tests.conftest import http_get
from tests.integration.conftest import (
    Certificates,
    count,
    make_certificates,
    start_worker,
    vigil,
    wait_until,
)
from tests.integration.test_gateway import ACME_KEY, _json_span, _json_traces, _post
from tests.oidc_issuer import TokenIssuer

pytestmark = pytest.mark.integration

EVENTS = 60


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def issuer(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[TokenIssuer]:
    """An OpenID Connect provider's token endpoint over HTTPS (a certificate of the tests' CA),
    with a client for each of the secure broker's users but the administrator, each a secret
    of its own."""
    clients = {name: secrets.token_urlsafe(16) for name in ("vigil", "gateway", "agent")}
    tls = (certificates.cert, certificates.key)
    with TokenIssuer(tmp_path_factory.mktemp("oidc"), clients, tls=tls) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def secure_broker(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates, issuer: TokenIssuer
) -> Iterator[LocalKafka]:
    """SASL_SSL, authorizing: PLAIN and SCRAM-SHA-512 for its users, OAUTHBEARER for tokens
    ``issuer`` signed."""
    users = {name: secrets.token_urlsafe(16) for name in ("admin", "vigil", "gateway", "agent")}
    broker = LocalKafka(
        tmp_path_factory.mktemp("secure-kafka"),
        fetch_jars(Settings.from_env({}).cache_dir),
        free_port(2),
        BrokerSecurity(
            certificates.keystore, certificates.ca, users, authorize=True, jwks=issuer.jwks
        ),
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def mtls_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalKafka, Certificates]]:
    """A broker whose only listener is SSL and takes only clients with a certificate its CA
    signed (mutual TLS), and those certificates."""
    made = make_certificates(tmp_path_factory.mktemp("mtls-certs"))
    broker = LocalKafka(
        tmp_path_factory.mktemp("mtls-kafka"),
        fetch_jars(Settings.from_env({}).cache_dir),
        free_port(2),
        BrokerSecurity(made.keystore, made.ca),
    )
    broker.start()
    try:
        yield broker, made
    finally:
        broker.stop()


def _env(broker: LocalKafka, home: Path, **security: str) -> dict[str, str]:
    """One test's settings: its own home, topics and group, signed in as ``security`` says."""
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


def _as(broker: LocalKafka, user: str, password: str | None = None, **more: str) -> dict[str, str]:
    """The settings of a client that signs in as ``user`` (with its password, unless another
    is given), over SASL_SSL with PLAIN unless ``more`` says otherwise."""
    assert broker.security is not None
    return {
        "VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "VIGIL_KAFKA_SASL_USERNAME": user,
        "VIGIL_KAFKA_SASL_PASSWORD": broker.security.users[user] if password is None else password,
        "VIGIL_KAFKA_SSL_CA_LOCATION": str(broker.security.truststore),
        **more,
    }


def _with_token(broker: LocalKafka, issuer: TokenIssuer, client: str) -> dict[str, str]:
    """The settings of a client that signs in with OAUTHBEARER, with tokens ``issuer`` gives
    ``client`` for its secret, over SASL_SSL; the broker and the issuer share a CA."""
    assert broker.security is not None
    return {
        "VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "VIGIL_KAFKA_SASL_MECHANISM": "OAUTHBEARER",
        "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": issuer.url,
        "VIGIL_KAFKA_SASL_OAUTHBEARER_CA_LOCATION": str(broker.security.truststore),
        "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID": client,
        "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": issuer.clients[client],
        # as Confluent Cloud asks for them; a broker that does not look at them takes them
        "VIGIL_KAFKA_SASL_OAUTHBEARER_EXTENSIONS": "logicalCluster=lkc-test,identityPoolId=pool-1",
        "VIGIL_KAFKA_SSL_CA_LOCATION": str(broker.security.truststore),
    }


def _emit(settings: Settings, prefix: str, tenantless: str | None = None) -> int:
    """EVENTS interactions of acme's bot, ids ``<prefix>-<i>``, and one without a tenant with
    the id ``tenantless`` if given, through the SDK as ``settings`` sign in; how many were
    delivered."""
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
        emitter.emit(dataclasses.replace(event, event_id=f"{prefix}-{i}"))
    if tenantless is not None:
        emitter.emit(dataclasses.replace(event, event_id=tenantless, tenant_id=""))
    emitter.close()
    return emitter.delivered


def _grant(broker: LocalKafka, env: dict[str, str]) -> str:
    """``vigil kafka acls --apply`` as the administrator, for the principals of these tests on
    the topics and group of ``env``; what it printed."""
    done = vigil({**env, **_as(broker, "admin")}, "kafka", "acls", "--worker", "User:vigil",
                  "--gateway", "User:gateway", "--producer", "User:agent", "--apply")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("sign_in", ["passwords", "tokens"])
def test_the_pipeline_signs_in_over_tls_and_needs_no_more_than_its_acls(
    secure_broker: LocalKafka, issuer: TokenIssuer, sign_in: str, tmp_path: Path
) -> None:
    """Events sent through the SDK and the gateway are validated, stored and dead-lettered, and
    the worker's lag is sampled: the SDK's producer, the gateway's, the raw consumer, aiokafka
    under Faust (clean, the DLQ), the producer of clean and dead letters, the lag sampler and
    the admin client all signed in, the worker with a secret read from a file, and did all
    they do with no ACL but those ``vigil kafka acls`` made. With passwords the worker signs
    in with SCRAM-SHA-512, the gateway and the SDK with PLAIN; with tokens each with
    OAUTHBEARER, a token its client got from an OpenID Connect provider, as the user the
    token's ``sub`` names."""
    assert secure_broker.security is not None
    if sign_in == "tokens":
        signed_in = {user: _with_token(secure_broker, issuer, user) for user in issuer.clients}
        secret_variable = "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"
    else:
        signed_in = {user: _as(secure_broker, user) for user in ("vigil", "gateway", "agent")}
        signed_in["vigil"]["VIGIL_KAFKA_SASL_MECHANISM"] = "SCRAM-SHA-512"
        secret_variable = "VIGIL_KAFKA_SASL_PASSWORD"
    worker_security = signed_in["vigil"]
    password = worker_security.pop(secret_variable)
    secret = tmp_path / "kafka-secret"
    secret.write_text(password + "\n")
    worker_security[f"{secret_variable}_FILE"] = str(secret)
    issued = len(issuer.issued)
    config = tmp_path / "vigil.yaml"
    config.write_text("tenants:\n  acme: {api_keys_env: ACME_KEYS}\n")
    env = _env(secure_broker, tmp_path / "home", VIGIL_CONFIG=str(config), ACME_KEYS=ACME_KEY)
    printed = _grant(secure_broker, env)
    assert "created 16 ACL(s)" in printed
    assert f"User:agent may WRITE topic {env['VIGIL_TOPIC_PREFIX']}.events.raw" in printed

    worker, settings, store = start_worker({**env, **worker_security})
    gateway = GatewayProcess(settings, free_port(), {**env, **signed_in["gateway"]})
    agent = Settings.from_env({**env, **signed_in["agent"]})
    try:
        gateway.start()
        assert _emit(agent, "s", tenantless="no-tenant") == EVENTS + 1
        status, _, reply = _post(f"{gateway.url}/v1/traces", _json_traces([_json_span(1)]))
        assert status == 200, reply
        rejected = _json_span(2, tokens=-5)  # the gateway dead-letters it itself
        status, _, reply = _post(f"{gateway.url}/v1/traces", _json_traces([rejected]))
        assert status == 200 and b"rejectedSpans" in reply, reply

        stored = EVENTS + 1
        wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") >= stored, 90,
                   f"{stored} events stored", worker.tail)  # fmt: skip
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") >= 2, 60,
                   "the dead letters stored", worker.tail)  # fmt: skip
        wait_until(lambda: count(store, "SELECT count() FROM vigil.consumer_lag") > 0, 60,
                   "a lag sample", worker.tail)  # fmt: skip
        time.sleep(1)
        assert store.query_rows(
            "SELECT countIf(event_id LIKE 's-%'), uniqExact(event_id), "
            "countIf(agent_id = 'json-agent') FROM vigil.audit_log"
        ) == [(EVENTS, stored, 1)]
        assert store.query_rows("SELECT stage, reason_code FROM vigil.dlq ORDER BY stage") == [
            ("gateway", "negative_value"),
            ("validate", "missing_tenant"),
        ]
    finally:
        gateway_code = gateway.stop()
        code = worker.stop()
    logs = [process.log_path for process in (worker, gateway)]
    said = "".join(path.read_text(errors="replace") for path in logs if path and path.exists())
    assert (code, gateway_code) == (0, 0), said[-3000:]
    assert password not in said
    given = issuer.issued[issued:]
    if sign_in == "tokens":
        # librdkafka asks with no User-Agent, Vigil's provider for aiokafka as "vigil"
        assert {("vigil", ""), ("vigil", "vigil"), ("gateway", ""), ("agent", "")} == set(given)
        assert not any(client_secret in said for client_secret in issuer.clients.values())
        assert issuer.token_for("vigil").split(".")[0] not in said  # every token's header
    else:
        assert given == []


def test_a_producer_may_write_the_raw_topic_and_nothing_else(
    secure_broker: LocalKafka, tmp_path: Path
) -> None:
    """An agent's principal cannot put an event on clean, past validation and redaction, nor a
    letter in the DLQ; the worker's principal, without its ACLs, is told which it lacks."""
    env = _env(secure_broker, tmp_path / "home")
    ungranted = Settings.from_env({**env, **_as(secure_broker, "vigil")})
    with pytest.raises(TopicError) as refused:
        ensure_topics(ungranted)
    assert f"creating topic {ungranted.topics.raw}: " in str(refused.value)
    assert "TOPIC_AUTHORIZATION_FAILED" in str(refused.value)

    _grant(secure_broker, env)
    ensure_topics(ungranted)  # granted now
    agent = Settings.from_env({**env, **_as(secure_broker, "agent")})
    producer = Producer({**agent.kafka.config(), "message.timeout.ms": 10_000,
                         "logger": RDKAFKA_LOGGER})  # fmt: skip
    outcomes: dict[str, str] = {}
    for topic in (agent.topics.raw, agent.topics.clean, agent.topics.dlq):
        producer.produce(topic, b"x", on_delivery=lambda err, msg: outcomes.update(
            {msg.topic(): "delivered" if err is None else err.name()}))  # fmt: skip
    producer.flush(30)
    assert outcomes == {
        agent.topics.raw: "delivered",
        agent.topics.clean: "TOPIC_AUTHORIZATION_FAILED",
        agent.topics.dlq: "TOPIC_AUTHORIZATION_FAILED",
    }
    # Vigil's own sender names the topic it was refused, for the worker's retry warnings
    sender = KafkaSender(agent.kafka)
    try:
        with pytest.raises(Unavailable) as refused_send:
            asyncio.run(sender.send([(agent.topics.clean, None, b"x")], timeout=30))
        assert str(refused_send.value).startswith(f"{agent.topics.clean}: ")
        assert "TOPIC_AUTHORIZATION_FAILED" in str(refused_send.value)
    finally:
        sender.close(timeout=1)


def test_a_worker_or_gateway_short_of_an_acl_is_told_which_at_start(
    secure_broker: LocalKafka, tmp_path: Path
) -> None:
    """Without READ on the DLQ the worker would start and stop at its first read of it; without
    WRITE on the DLQ the gateway would answer 503 to a rejected span. Both ask the cluster at
    start and exit naming what they lack and the command that grants it."""
    env = _env(secure_broker, tmp_path / "home")
    _grant(secure_broker, env)
    worker = Settings.from_env({**env, **_as(secure_broker, "vigil")})
    dlq_read = next(g for g in worker_grants(worker, "User:vigil")
                    if g.name == worker.topics.dlq and g.operation == AclOperation.READ)  # fmt: skip
    binding = dlq_read.binding()
    admin = AdminClient(Settings.from_env({**env, **_as(secure_broker, "admin")}).kafka.config())
    revoked = admin.delete_acls([AclBindingFilter(
        binding.restype, binding.name, binding.resource_pattern_type, binding.principal,
        binding.host, binding.operation, binding.permission_type)])  # fmt: skip
    assert [len(future.result()) for future in revoked.values()] == [1]

    began = time.monotonic()
    result = vigil({**env, **_as(secure_broker, "vigil")}, "worker")
    assert result.returncode == 2, result.stderr[-3000:]
    assert time.monotonic() - began < 60
    assert (
        f"vigil: error: Kafka at {secure_broker.bootstrap} does not let the worker (User:vigil) "
        f"READ topic {worker.topics.dlq}. An ACL administrator can grant what the worker needs "
        "with: vigil kafka acls --worker User:vigil --apply"
    ) in result.stderr

    # `vigil check` says the same, creating nothing
    check = vigil({**env, **_as(secure_broker, "vigil")}, "check")
    assert check.returncode == 1, check.stdout + check.stderr[-2000:]
    assert (
        f"FAIL  acls        Kafka at {secure_broker.bootstrap} does not let the worker "
        f"(User:vigil) READ topic {worker.topics.dlq}."
    ) in check.stdout
    # the worker's ACLs do not let it DESCRIBE_CONFIGS: retention is not said, not guessed
    assert " retention " not in check.stdout, check.stdout

    # an agent's principal may write raw, not the DLQ the gateway writes rejected spans to (it
    # may not see it either, so the gateway tried to create it, and was refused that first)
    result = vigil({**env, **_as(secure_broker, "agent")}, "gateway", "--port", str(free_port()))
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"does not let the gateway (User:agent) WRITE topic {worker.topics.dlq}." in result.stderr
    )


def test_a_refused_sign_in_is_named_at_once_and_without_the_password(
    secure_broker: LocalKafka, tmp_path: Path
) -> None:
    wrong = secrets.token_urlsafe(16)
    env = _env(secure_broker, tmp_path / "home", **_as(secure_broker, "vigil", wrong))
    began = time.monotonic()
    with pytest.raises(TopicError) as refused:
        ensure_topics(Settings.from_env(env), timeout=30)
    assert time.monotonic() - began < 15  # not the 30 s a broker that does not answer gets
    message = str(refused.value)
    assert f"Kafka at {secure_broker.bootstrap} refused Vigil's SASL_SSL connection" in message
    assert "Authentication failed" in message
    assert wrong not in message

    # the worker says the same and stops, rather than waiting on a broker that will not let it in
    result = vigil(env, "worker")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "vigil: error: Kafka at" in result.stderr and "Authentication failed" in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_the_worker_signs_in_again_as_its_tokens_expire_and_loses_nothing(
    secure_broker: LocalKafka, issuer: TokenIssuer, tmp_path: Path
) -> None:
    """The broker ends a session when its token does (as managed clusters do): librdkafka's
    clients re-authenticate with a new token, aiokafka's connections (clean, the DLQ) are
    closed and opened again with one Vigil's provider asked for once 80% of the last one's
    life had passed. Then the provider is down for longer than a token lasts, and events are
    sent meanwhile: the worker waits it out (it stopped, before), and once it is back every
    event of the three waves is stored once."""
    env = _env(secure_broker, tmp_path / "home")
    _grant(secure_broker, env)
    lifetime, issuer.lifetime = issuer.lifetime, 12
    issued = len(issuer.issued)
    try:
        worker, _, store = start_worker({**env, **_with_token(secure_broker, issuer, "vigil")})
        agent = Settings.from_env({**env, **_with_token(secure_broker, issuer, "agent")})
        try:
            for wave in range(3):
                if wave == 2:  # the provider down for 18 s, longer than a token lasts
                    issuer.down = True
                    threading.Timer(18, setattr, (issuer, "down", False)).start()
                    time.sleep(9)
                assert _emit(agent, f"w{wave}", tenantless=f"w{wave}-dead") == EVENTS + 1
                stored = (wave + 1) * EVENTS
                wait_until(lambda n=stored: count(store, "SELECT count() FROM vigil.audit_log") >= n,
                           90, f"{stored} events stored", worker.tail)  # fmt: skip
                if wave == 0:
                    time.sleep(13)  # the worker's tokens expire
            wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") >= 3, 60,
                       "the dead letters stored", worker.tail)  # fmt: skip
            time.sleep(1)
            assert store.query_rows("SELECT count(), uniqExact(event_id) FROM vigil.audit_log") == [
                (3 * EVENTS, 3 * EVENTS)
            ]
            assert count(store, "SELECT count() FROM vigil.dlq") == 3
        finally:
            code = worker.stop()
    finally:
        issuer.lifetime, issuer.down = lifetime, False
    assert code == 0, worker.tail()
    given = issuer.issued[issued:]
    # each kind of the worker's clients asked again, more than once
    assert given.count(("vigil", "")) >= 3, given
    assert given.count(("vigil", "vigil")) >= 3, given
    assert issuer.down_answers >= 2


def test_a_token_refused_by_its_provider_or_by_kafka_is_named_at_once_without_secrets(
    secure_broker: LocalKafka, issuer: TokenIssuer, tmp_path: Path
) -> None:
    """A wrong client secret: the provider refuses the token, and that is what the error says,
    naming the client and the endpoint, and `vigil check` says it first; a provider that cannot
    be reached, or whose certificate is not trusted, the same; a token signed by a key the
    broker does not trust: Kafka refuses it."""
    wrong = secrets.token_urlsafe(16)
    security = _with_token(secure_broker, issuer, "vigil")
    env = _env(secure_broker, tmp_path / "home",
               **{**security, "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": wrong})  # fmt: skip
    began = time.monotonic()
    with pytest.raises(TopicError) as refused:
        ensure_topics(Settings.from_env(env), timeout=30)
    assert time.monotonic() - began < 15
    message = str(refused.value)
    assert message.startswith(
        f"Vigil could not sign in to Kafka at {secure_broker.bootstrap}: no token for client "
        f"vigil from {issuer.url}: "
    ), message
    assert "invalid_client" in message and wrong not in message
    assert issuer.refused[-1] == "vigil"

    result = vigil(env, "worker")  # the worker says the same and stops
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"no token for client vigil from {issuer.url}" in result.stderr
    assert wrong not in result.stdout + result.stderr

    # `vigil check` asks for a token first, and says whom the cluster will take it for
    check = vigil(env, "check", "--role", "gateway")
    assert check.returncode == 1, check.stdout + check.stderr[-2000:]
    assert (
        f"FAIL  token       the token endpoint {issuer.url} (client vigil) refused a token: "
        "HTTP 401 (invalid_client)\n"
    ) in check.stdout
    assert wrong not in check.stdout + check.stderr
    check = vigil(_env(secure_broker, tmp_path / "home", **security), "check", "--role", "gateway")
    assert (
        f"ok    token       client vigil got a token from {issuer.url}, good for 3600 s, for "
        "sub vigil\n"
    ) in check.stdout, check.stdout + check.stderr[-2000:]
    assert (
        f"ok    kafka       {secure_broker.bootstrap} over SASL_SSL as User:vigil, 1 broker(s)\n"
        in check.stdout
    )
    assert issuer.clients["vigil"] not in check.stdout + check.stderr

    unreached = {**security, "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL":
                 f"https://127.0.0.1:{free_port()}/token"}  # fmt: skip
    with pytest.raises(TopicError) as refused:
        ensure_topics(Settings.from_env(_env(secure_broker, tmp_path, **unreached)), timeout=30)
    assert "no token for client vigil from https://127.0.0.1:" in str(refused.value)

    # without the CA, the provider's certificate is checked against the system's, and fails
    untrusted = {k: v for k, v in security.items() if not k.endswith("OAUTHBEARER_CA_LOCATION")}
    with pytest.raises(TopicError) as refused:
        ensure_topics(Settings.from_env(_env(secure_broker, tmp_path, **untrusted)), timeout=30)
    assert f"no token for client vigil from {issuer.url}" in str(refused.value)
    assert "certificate" in str(refused.value).lower(), str(refused.value)

    # the same clients, a key of its own, over plain HTTP (so with no CA to name)
    with TokenIssuer(tmp_path, issuer.clients) as stranger, pytest.raises(TopicError) as refused:
        forged = {**untrusted, "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": stranger.url}
        ensure_topics(Settings.from_env(_env(secure_broker, tmp_path, **forged)), timeout=30)
    assert len(stranger.issued) >= 1
    assert str(refused.value).startswith(
        f"Kafka at {secure_broker.bootstrap} refused Vigil's SASL_SSL connection: "
    ), str(refused.value)
    assert "invalid_token" in str(refused.value)  # the broker's word on its signature


def test_an_untrusted_certificate_is_named(secure_broker: LocalKafka, tmp_path: Path) -> None:
    """Without the CA, the broker's certificate is checked against the system's CAs, and fails."""
    assert secure_broker.security is not None
    security = _as(secure_broker, "vigil")
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


def test_acls_on_a_cluster_that_does_not_authorize_say_so(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = {**os.environ, "VIGIL_HOME": str(tmp_path), "VIGIL_KAFKA_BOOTSTRAP": kafka_bootstrap}
    done = vigil(env, "kafka", "acls", "--producer", "User:agent", "--apply")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"vigil: error: Kafka at {kafka_bootstrap} has no authorizer: it lets every principal do "
        "everything and takes no ACL, so none was created"
    )


def test_the_pipeline_signs_in_with_a_client_certificate(
    mtls_broker: tuple[LocalKafka, Certificates], tmp_path: Path
) -> None:
    """Mutual TLS: the worker's clients (librdkafka's and aiokafka's) and the SDK present the
    client certificate, its key encrypted and its password read from a file, and the worker's
    /metrics says when it and the CA expire; a client without one is refused at once."""
    broker, made = mtls_broker
    password = secrets.token_urlsafe(16)
    encrypted, secret = tmp_path / "client-encrypted.key", tmp_path / "key-password"
    subprocess.run(["openssl", "pkey", "-in", str(made.client_key), "-aes256", "-passout",
                    f"pass:{password}", "-out", str(encrypted)], check=True)  # fmt: skip
    secret.write_text(password + "\n")
    env = _env(broker, tmp_path / "home", VIGIL_KAFKA_SECURITY_PROTOCOL="SSL",
               VIGIL_KAFKA_SSL_CA_LOCATION=str(made.ca),
               VIGIL_KAFKA_SSL_CERT_LOCATION=str(made.client_cert),
               VIGIL_KAFKA_SSL_KEY_LOCATION=str(encrypted),
               VIGIL_KAFKA_SSL_KEY_PASSWORD_FILE=str(secret),
               VIGIL_WORKER_HTTP_ADDRESS=f"127.0.0.1:{free_port()}")  # fmt: skip
    worker, settings, store = start_worker(env)
    try:
        assert _emit(settings, "m") == EVENTS
        wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") >= EVENTS, 90,
                   f"{EVENTS} events stored", worker.tail)  # fmt: skip
        assert count(store, "SELECT uniqExact(event_id) FROM vigil.audit_log") == EVENTS
        metrics = http_get(f"http://{env['VIGIL_WORKER_HTTP_ADDRESS']}/metrics")[1]
        for variable, path in (("CA", made.ca), ("CERT", made.client_cert)):
            until = min(expiries(path)).timestamp()
            line = f'{{variable="VIGIL_KAFKA_SSL_{variable}_LOCATION"}} {until}'
            assert f"vigil_worker_certificate_expiry_timestamp_seconds{line}" in metrics
    finally:
        assert worker.stop() == 0, worker.tail()
    assert worker.log_path is not None and password not in worker.log_path.read_text()

    anonymous = {k: v for k, v in env.items() if "_SSL_CERT_" not in k and "_SSL_KEY_" not in k}
    began = time.monotonic()
    with pytest.raises(TopicError) as refused:
        ensure_topics(Settings.from_env(anonymous), timeout=30)
    assert time.monotonic() - began < 15
    assert f"Kafka at {broker.bootstrap} refused Vigil's SSL connection" in str(refused.value)
    assert "ssl/tls alert" in str(refused.value)  # the broker's word on the missing certificate
