from __future__ import annotations

import socket
import ssl
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from aiokafka.conn import OAuthAuthenticator
from faust.auth import OAuthCredentials, SASLCredentials, SSLCredentials
from faust.types.auth import AuthProtocol, SASLMechanism

from pipeline.certs import ServedCertificate
from pipeline.check import WARN, Finding, _grpc_key
from pipeline.oidc import OidcTokens
from pipeline.otlp_grpc import credentials
from pipeline.settings import ConfigError, Settings
from pipeline.store import StoreError, connect


def test_defaults_point_at_the_embedded_store_and_the_local_broker(tmp_path: Path) -> None:
    s = Settings.from_env({"VIGIL_HOME": str(tmp_path)})
    assert s.clickhouse_dsn == f"chdb://{tmp_path / 'clickhouse'}"
    assert s.embedded and s.bootstrap == "127.0.0.1:9092"
    assert s.topics.raw == "vigil.events.raw" and s.topics.dlq == "vigil.events.dlq"
    assert s.ledger_dedup_window == timedelta(minutes=10)
    assert s.progress_seconds == 30.0
    assert s.sdk_spool is None and s.sdk_spool_max_bytes == 1 << 30
    assert s.served_query_seconds == 60
    assert s.lag_sample_seconds == 30.0
    assert s.gateway.max_bytes_in_flight == 64 << 20


def test_env_overrides(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "VIGIL_HOME": str(tmp_path),
            "VIGIL_KAFKA_BOOTSTRAP": "k:9092",
            "VIGIL_CLICKHOUSE_DSN": "http://ch:8123",
            "VIGIL_TOPIC_PREFIX": "x",
            "VIGIL_LEDGER_DEDUP_WINDOW_SECONDS": "3600",
            "VIGIL_PROGRESS_SECONDS": "2.5",
            "VIGIL_ALERT_DELIVERY_HOURS": "72",
            "VIGIL_SDK_SPOOL_DIR": "spool",
            "VIGIL_SDK_SPOOL_MAX_BYTES": "1000000",
            "VIGIL_SERVED_QUERY_SECONDS": "600",
            "VIGIL_LAG_SAMPLE_SECONDS": "0.5",
        }
    )
    assert s.bootstrap == "k:9092" and not s.embedded and s.topics.clean == "x.events.clean"
    assert s.ledger_dedup_window == timedelta(hours=1)
    assert s.progress_seconds == 2.5
    assert (s.alert_delivery_hours, s.alert_sweep_seconds, s.webhook_timeout_seconds) == (72, 60, 5)
    assert s.sdk_spool == Path("spool").resolve() and s.sdk_spool_max_bytes == 1_000_000
    assert s.served_query_seconds == 600
    assert s.lag_sample_seconds == 0.5


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"VIGIL_SINK_BATCH_SIZE": "lots"}, "VIGIL_SINK_BATCH_SIZE"),
        ({"VIGIL_PARTITIONS": "0"}, "VIGIL_PARTITIONS"),
        ({"VIGIL_LEDGER_DEDUP_WINDOW_SECONDS": "-1"}, "VIGIL_LEDGER_DEDUP_WINDOW_SECONDS"),
        ({"VIGIL_CLICKHOUSE_DSN": "mysql://x"}, "VIGIL_CLICKHOUSE_DSN"),
        ({"VIGIL_PROGRESS_SECONDS": "0"}, "VIGIL_PROGRESS_SECONDS"),
        ({"VIGIL_ALERT_SWEEP_SECONDS": "soon"}, "VIGIL_ALERT_SWEEP_SECONDS"),
        ({"VIGIL_LAG_SAMPLE_SECONDS": "0"}, "VIGIL_LAG_SAMPLE_SECONDS: must be positive"),
        ({"VIGIL_GATEWAY_GRPC_CONNECTION_AGE_SECONDS": "0"}, "CONNECTION_AGE_SECONDS: must be"),
        ({"VIGIL_ALERT_DELIVERY_HOURS": "0"}, "VIGIL_ALERT_DELIVERY_HOURS"),
        ({"VIGIL_WEBHOOK_TIMEOUT_SECONDS": "-5"}, "VIGIL_WEBHOOK_TIMEOUT_SECONDS"),
        ({"VIGIL_SDK_SPOOL_MAX_BYTES": "1GB"}, "VIGIL_SDK_SPOOL_MAX_BYTES"),
        ({"VIGIL_SERVED_QUERY_SECONDS": "0"}, "VIGIL_SERVED_QUERY_SECONDS: must be positive"),
        # what float() takes but no wait can be (a flush every nan seconds never came)
        (
            {"VIGIL_SINK_FLUSH_SECONDS": "nan"},
            "VIGIL_SINK_FLUSH_SECONDS: expected a finite number, got 'nan'",
        ),
        (
            {"VIGIL_TOPIC_RETENTION_HOURS": "inf"},
            "VIGIL_TOPIC_RETENTION_HOURS: expected a finite number, got 'inf'",
        ),
        ({"VIGIL_SINK_FLUSH_SECONDS": "-0.5"}, "VIGIL_SINK_FLUSH_SECONDS: must be positive, got"),
        ({"VIGIL_DEV_KAFKA_PORT": "65535"}, "VIGIL_DEV_KAFKA_PORT: expected a port below 65535"),
        ({"VIGIL_TOPIC_PREFIX": "acme prod"}, "VIGIL_TOPIC_PREFIX: expected letters, digits"),
        ({"VIGIL_TOPIC_PREFIX": ""}, "VIGIL_TOPIC_PREFIX: expected letters"),
        ({"VIGIL_CONSUMER_GROUP": ""}, "VIGIL_CONSUMER_GROUP: expected a name without spaces"),
        ({"VIGIL_KAFKA_BOOTSTRAP": "kafka 9092"}, "VIGIL_KAFKA_BOOTSTRAP: expected host:port"),
        ({"VIGIL_KAFKA_BOOTSTRAP": "k1:9092,"}, "VIGIL_KAFKA_BOOTSTRAP: expected host:port"),
        ({"VIGIL_KAFKA_BOOTSTRAP": "k1:90920"}, "VIGIL_KAFKA_BOOTSTRAP: expected host:port"),
        ({"VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT": "0"}, "IN_FLIGHT: must be positive"),
        (
            {"VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT": "1000000", "VIGIL_GATEWAY_MAX_BYTES": "2000000"},
            r"IN_FLIGHT: 1000000 is below VIGIL_GATEWAY_MAX_BYTES \(2000000\), so a request",
        ),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        Settings.from_env(env)


def test_the_gateways_bytes_in_flight_take_at_least_its_largest_request() -> None:
    """Raising VIGIL_GATEWAY_MAX_BYTES alone raises the default room with it."""
    larger = Settings.from_env({"VIGIL_GATEWAY_MAX_BYTES": str(100 << 20)})
    assert larger.gateway.max_bytes_in_flight == 100 << 20
    given = Settings.from_env({"VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT": "9000000"})
    assert given.gateway.max_bytes_in_flight == 9_000_000


@pytest.mark.parametrize(
    "bootstrap", ["k1:9092,k2:9093", "k1", "[::1]:9092", "SSL://k.example.com:9093", "10.0.0.1:9"]
)
def test_the_ways_kafka_names_its_brokers_are_taken(bootstrap: str) -> None:
    assert Settings.from_env({"VIGIL_KAFKA_BOOTSTRAP": bootstrap}).bootstrap == bootstrap


def test_password_never_appears_in_repr_or_errors() -> None:
    s = Settings.from_env(
        {"VIGIL_CLICKHOUSE_DSN": "https://writer:s3cr3t-pw@ch.example:8443/vigil"}
    )
    assert "s3cr3t-pw" not in repr(s) and "writer" in repr(s)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"VIGIL_CLICKHOUSE_DSN": "mysql://u:s3cr3t-pw@h"})
    assert "s3cr3t-pw" not in str(info.value)


def test_a_server_that_stops_answering_is_given_up_on_after_the_dsns_timeout() -> None:
    """A socket that accepts and never answers, as a hung ClickHouse server does: the DSN's
    ``send_receive_timeout`` (README, "Pointing Vigil at ...") bounds the wait, not the
    client's default of 300 s; the error names the timeout and not the password."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(4)
        dsn = f"http://u:s3cr3t-pw@127.0.0.1:{hung.getsockname()[1]}/?send_receive_timeout=1"
        started = time.monotonic()
        with pytest.raises(StoreError, match="Read timed out") as info:
            connect(dsn)
        assert time.monotonic() - started < 30
        assert "s3cr3t-pw" not in str(info.value)


PASSWORD = "kafka-s3cr3t"
A_FILE = __file__  # a file that exists, where its content does not matter
OAUTH = {
    "VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "VIGIL_KAFKA_SASL_MECHANISM": "OAUTHBEARER",
    "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://idp.example/token",
    "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "c",
    "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": PASSWORD,
}


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate and its key (PEM), standing in for a CA and a client's own."""
    folder = tmp_path_factory.mktemp("pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=vigil-test"],
                   cwd=folder, check=True, capture_output=True)  # fmt: skip
    return {"cert": folder / "cert.pem", "key": folder / "key.pem"}


def test_kafka_clients_connect_in_plaintext_by_default() -> None:
    kafka = Settings.from_env({"VIGIL_KAFKA_BOOTSTRAP": "k:9092"}).kafka
    assert kafka.config() == {"bootstrap.servers": "k:9092", "security.protocol": "PLAINTEXT"}
    assert kafka.security.faust_credentials() is None and str(kafka) == "k:9092"


def test_sasl_over_tls_signs_in_every_kind_of_client(pem: dict[str, Path], tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(f"{PASSWORD}\nignored\n")
    s = Settings.from_env({
        "VIGIL_KAFKA_BOOTSTRAP": "k:9093", "VIGIL_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "VIGIL_KAFKA_SASL_MECHANISM": "scram-sha-512", "VIGIL_KAFKA_SASL_USERNAME": "vigil",
        "VIGIL_KAFKA_SASL_PASSWORD_FILE": str(secret),
        "VIGIL_KAFKA_SSL_CA_LOCATION": str(pem["cert"]),
    })  # fmt: skip
    assert s.kafka.config() == {
        "bootstrap.servers": "k:9093",
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": str(pem["cert"]),
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "vigil",
        "sasl.password": PASSWORD,
    }
    credentials = s.kafka.security.faust_credentials()
    assert isinstance(credentials, SASLCredentials)
    assert credentials.protocol == AuthProtocol.SASL_SSL
    assert credentials.mechanism == SASLMechanism.SCRAM_SHA_512
    assert (credentials.username, credentials.password) == ("vigil", PASSWORD)
    context = credentials.ssl_context
    assert context is not None and context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED and len(context.get_ca_certs()) == 1
    for shown in (repr(s), repr(s.kafka), str(s.kafka), repr(credentials)):
        assert PASSWORD not in shown
    assert "SASL_SSL" in repr(s)


def test_oauthbearer_gets_tokens_from_an_openid_connect_provider(
    pem: dict[str, Path], tmp_path: Path
) -> None:
    """librdkafka gets its tokens itself (its OIDC method); aiokafka, under Faust, from Vigil's
    provider of the same client. The secret is in no repr, read from a file if given one."""
    secret = tmp_path / "client-secret"
    secret.write_text(f"{PASSWORD}\n")
    s = Settings.from_env({
        "VIGIL_KAFKA_BOOTSTRAP": "k:9093", "VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "VIGIL_KAFKA_SASL_MECHANISM": "oauthbearer",
        "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://idp.example/oauth2/token",
        "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "vigil-worker",
        "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE": str(secret),
        "VIGIL_KAFKA_SASL_OAUTHBEARER_SCOPE": "kafka",
        "VIGIL_KAFKA_SSL_CA_LOCATION": str(pem["cert"]),
    })  # fmt: skip
    assert s.kafka.config() == {
        "bootstrap.servers": "k:9093",
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": str(pem["cert"]),
        "sasl.mechanism": "OAUTHBEARER",
        "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.token.endpoint.url": "https://idp.example/oauth2/token",
        "sasl.oauthbearer.client.id": "vigil-worker",
        "sasl.oauthbearer.client.secret": PASSWORD,
        "sasl.oauthbearer.scope": "kafka",
        # the system's CAs, named: librdkafka's own default is not Debian's (nor its "probe")
        "https.ca.location": ssl.get_default_verify_paths().cafile,
    }
    credentials = s.kafka.security.faust_credentials()
    assert isinstance(credentials, OAuthCredentials)
    assert credentials.protocol == AuthProtocol.SASL_SSL and credentials.ssl_context is not None
    assert isinstance(credentials.oauth_cb, OidcTokens)
    assert credentials.oauth_cb.client == s.kafka.security.oidc
    for shown in (repr(s), repr(s.kafka), repr(credentials), repr(credentials.oauth_cb)):
        assert PASSWORD not in shown
    assert "vigil-worker" in repr(credentials.oauth_cb)

    plain = Settings.from_env({
        "VIGIL_KAFKA_BOOTSTRAP": "k:9092", "VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "VIGIL_KAFKA_SASL_MECHANISM": "OAUTHBEARER",
        "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "http://127.0.0.1:8080/token",
        "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "c",
        "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": PASSWORD,
    }).kafka  # fmt: skip
    assert "sasl.oauthbearer.scope" not in plain.config()
    credentials = plain.security.faust_credentials()
    assert isinstance(credentials, OAuthCredentials) and credentials.ssl_context is None
    assert credentials.protocol == AuthProtocol.SASL_PLAINTEXT
    private = Settings.from_env({**OAUTH, "VIGIL_KAFKA_BOOTSTRAP": "k:9093",
                                 "VIGIL_KAFKA_SASL_OAUTHBEARER_CA_LOCATION": str(pem["cert"])})  # fmt: skip
    assert private.kafka.config()["https.ca.location"] == str(pem["cert"])


def test_oauthbearer_extensions_go_with_every_token() -> None:
    """Confluent Cloud's logicalCluster and identityPoolId: in librdkafka's config, and in the
    request aiokafka builds with Vigil's provider's token."""
    cloud = Settings.from_env({**OAUTH, "VIGIL_KAFKA_BOOTSTRAP": "k:9093",
                               "VIGIL_KAFKA_SASL_OAUTHBEARER_EXTENSIONS":
                               "logicalCluster=lkc-1x2y3, identityPoolId=pool-Ab=1"})  # fmt: skip
    config = cloud.kafka.config()
    assert (
        config["sasl.oauthbearer.extensions"] == "logicalCluster=lkc-1x2y3,identityPoolId=pool-Ab=1"
    )
    credentials = cloud.kafka.security.faust_credentials()
    assert isinstance(credentials, OAuthCredentials)
    authenticator = OAuthAuthenticator(sasl_oauth_token_provider=credentials.oauth_cb)
    request = authenticator._build_oauth_client_request("T0KEN", authenticator._token_extensions())
    assert request == (
        "n,,\x01auth=Bearer T0KEN\x01logicalCluster=lkc-1x2y3\x01identityPoolId=pool-Ab=1\x01\x01"
    )
    assert "sasl.oauthbearer.extensions" not in Settings.from_env(
        {**OAUTH, "VIGIL_KAFKA_BOOTSTRAP": "k:9093"}).kafka.config()  # fmt: skip


def test_sasl_without_tls_and_mutual_tls_without_sasl(pem: dict[str, Path]) -> None:
    sasl = Settings.from_env({
        "VIGIL_KAFKA_BOOTSTRAP": "k:9092", "VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "VIGIL_KAFKA_SASL_USERNAME": "u",
        "VIGIL_KAFKA_SASL_PASSWORD": PASSWORD,
    }).kafka  # fmt: skip
    assert sasl.config()["sasl.mechanism"] == "PLAIN" and "ssl.ca.location" not in sasl.config()
    credentials = sasl.security.faust_credentials()
    assert isinstance(credentials, SASLCredentials)
    assert credentials.protocol == AuthProtocol.SASL_PLAINTEXT and credentials.ssl_context is None

    tls = Settings.from_env({
        "VIGIL_KAFKA_BOOTSTRAP": "k:9092", "VIGIL_KAFKA_SECURITY_PROTOCOL": "SSL", "VIGIL_KAFKA_SSL_CERT_LOCATION": str(pem["cert"]),
        "VIGIL_KAFKA_SSL_KEY_LOCATION": str(pem["key"]),
    }).kafka  # fmt: skip
    assert tls.config() == {
        "bootstrap.servers": "k:9092",
        "security.protocol": "SSL",
        "ssl.ca.location": "probe",  # the system's CAs
        "ssl.certificate.location": str(pem["cert"]),
        "ssl.key.location": str(pem["key"]),
    }
    assert isinstance(tls.security.faust_credentials(), SSLCredentials)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"VIGIL_KAFKA_SECURITY_PROTOCOL": "TLS"}, "VIGIL_KAFKA_SECURITY_PROTOCOL: expected one"),
        ({"VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "VIGIL_KAFKA_SASL_MECHANISM": "GSSAPI",
          "VIGIL_KAFKA_SASL_USERNAME": "u", "VIGIL_KAFKA_SASL_PASSWORD": PASSWORD},
         "VIGIL_KAFKA_SASL_MECHANISM: expected one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
        ({"VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "VIGIL_KAFKA_SASL_PASSWORD": PASSWORD},
         "VIGIL_KAFKA_SASL_USERNAME: SASL_SSL needs a user name"),
        ({"VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "VIGIL_KAFKA_SASL_USERNAME": "u"},
         "SASL needs a password"),
        ({"VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "VIGIL_KAFKA_SASL_USERNAME": "u",
          "VIGIL_KAFKA_SASL_PASSWORD": PASSWORD, "VIGIL_KAFKA_SASL_PASSWORD_FILE": A_FILE},
         "are both set"),
        ({"VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "VIGIL_KAFKA_SASL_USERNAME": "u",
          "VIGIL_KAFKA_SASL_PASSWORD_FILE": "/nonexistent/pw"},
         "VIGIL_KAFKA_SASL_PASSWORD_FILE: cannot read /nonexistent/pw"),
        ({"VIGIL_KAFKA_SASL_USERNAME": "u", "VIGIL_KAFKA_SASL_PASSWORD": PASSWORD},
         "VIGIL_KAFKA_SASL_USERNAME is set, but VIGIL_KAFKA_SECURITY_PROTOCOL=PLAINTEXT"),
        ({"VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "VIGIL_KAFKA_SASL_USERNAME": "u",
          "VIGIL_KAFKA_SASL_PASSWORD": PASSWORD, "VIGIL_KAFKA_SSL_CA_LOCATION": A_FILE},
         "VIGIL_KAFKA_SSL_CA_LOCATION is set, but VIGIL_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT"),
        ({"VIGIL_KAFKA_SECURITY_PROTOCOL": "SSL", "VIGIL_KAFKA_SSL_CA_LOCATION": "/no/ca.pem"},
         "VIGIL_KAFKA_SSL_CA_LOCATION: cannot read /no/ca.pem"),
        ({"VIGIL_KAFKA_SECURITY_PROTOCOL": "SSL", "VIGIL_KAFKA_SSL_CERT_LOCATION": A_FILE},
         "VIGIL_KAFKA_SSL_CERT_LOCATION is set without its pair"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": ""},
         "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL: OAUTHBEARER needs the http(s) URL"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "idp.example/token"},
         "of the OpenID Connect provider's token endpoint, got one that is not"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL":
          f"https://c:{PASSWORD}@idp.example/token"}, "_TOKEN_ENDPOINT_URL: holds a user or password"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID": ""},
         "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID: OAUTHBEARER needs a client id"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": ""},
         "OAUTHBEARER needs the client's secret"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "http://idp/token",
          "VIGIL_KAFKA_SASL_OAUTHBEARER_CA_LOCATION": A_FILE},
         "VIGIL_KAFKA_SASL_OAUTHBEARER_CA_LOCATION is set, but the token endpoint is not https"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_OAUTHBEARER_CA_LOCATION": "/no/ca.pem"},
         "VIGIL_KAFKA_SASL_OAUTHBEARER_CA_LOCATION: cannot read /no/ca.pem"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_OAUTHBEARER_EXTENSIONS": "logicalCluster"},
         "VIGIL_KAFKA_SASL_OAUTHBEARER_EXTENSIONS: 'logicalCluster' is not key=value"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_OAUTHBEARER_EXTENSIONS": "auth=Bearer"},
         "'auth=Bearer' is not key=value with a key of letters alone (and not auth)"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_OAUTHBEARER_EXTENSIONS": "pool_id=1"},
         "'pool_id=1' is not key=value"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_OAUTHBEARER_EXTENSIONS": "pool=a b"},
         "pool's value must be printable ASCII, without spaces"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_PASSWORD": PASSWORD},
         "VIGIL_KAFKA_SASL_PASSWORD is set, but VIGIL_KAFKA_SASL_MECHANISM=OAUTHBEARER does not"),
        ({**OAUTH, "VIGIL_KAFKA_SASL_MECHANISM": "PLAIN", "VIGIL_KAFKA_SASL_USERNAME": "u",
          "VIGIL_KAFKA_SASL_PASSWORD": PASSWORD}, "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"
         " is set, but VIGIL_KAFKA_SASL_MECHANISM=PLAIN does not use it (it is for OAUTHBEARER)"),
        ({**OAUTH, "VIGIL_KAFKA_SECURITY_PROTOCOL": "SSL"},
         "VIGIL_KAFKA_SASL_MECHANISM is set, but VIGIL_KAFKA_SECURITY_PROTOCOL=SSL does not use"),
    ],
)  # fmt: skip
def test_bad_kafka_security_settings_name_the_variable(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({"VIGIL_KAFKA_BOOTSTRAP": "k:9093", **env})
    assert says in str(bad.value) and PASSWORD not in str(bad.value)


def test_a_secured_connection_needs_a_cluster_of_its_own() -> None:
    """Without VIGIL_KAFKA_BOOTSTRAP, Vigil starts its local broker, which is plaintext only."""
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({"VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    assert "VIGIL_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs VIGIL_KAFKA_BOOTSTRAP" in str(bad.value)


def test_an_empty_password_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(ConfigError, match=r"VIGIL_KAFKA_SASL_PASSWORD_FILE: .* is empty"):
        Settings.from_env({
            "VIGIL_KAFKA_BOOTSTRAP": "k:9093", "VIGIL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "VIGIL_KAFKA_SASL_USERNAME": "u", "VIGIL_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "pw"),
        })  # fmt: skip


def test_the_gateway_serves_https_with_a_certificate_and_its_key(
    pem: dict[str, Path], tmp_path: Path
) -> None:
    assert Settings.from_env({}).gateway.tls is None
    env = {"VIGIL_GATEWAY_TLS_CERT_LOCATION": str(pem["cert"]),
           "VIGIL_GATEWAY_TLS_KEY_LOCATION": str(pem["key"])}  # fmt: skip
    tls = Settings.from_env(env).gateway.tls
    assert tls is not None and tls.context().minimum_version == ssl.TLSVersion.TLSv1_2

    with pytest.raises(ConfigError, match="VIGIL_GATEWAY_TLS_KEY_LOCATION is set without its"):
        Settings.from_env({"VIGIL_GATEWAY_TLS_KEY_LOCATION": str(pem["key"])})
    with pytest.raises(ConfigError, match="VIGIL_GATEWAY_TLS_CERT_LOCATION: cannot read /no"):
        Settings.from_env({**env, "VIGIL_GATEWAY_TLS_CERT_LOCATION": "/no/cert.pem"})
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as bad:  # at start, before any command uses them
        Settings.from_env({**env, "VIGIL_GATEWAY_TLS_KEY_LOCATION": str(not_a_key)})
    said = str(bad.value)
    assert f"VIGIL_GATEWAY_TLS_KEY_LOCATION {not_a_key}: not a PEM certificate chain" in said


def test_kafka_certificate_files_are_loaded_at_start(pem: dict[str, Path], tmp_path: Path) -> None:
    """A CA or a client key that is not what it should be is named with its variable, rather
    than by librdkafka or Python's ssl module at the first connection."""
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("this is not a certificate\n")
    secured = {"VIGIL_KAFKA_BOOTSTRAP": "k:9093", "VIGIL_KAFKA_SECURITY_PROTOCOL": "SSL"}
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({**secured, "VIGIL_KAFKA_SSL_CA_LOCATION": str(not_pem)})
    assert f"VIGIL_KAFKA_SSL_CA_LOCATION: {not_pem} holds no PEM certificate" in str(bad.value)
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({**secured, "VIGIL_KAFKA_SSL_CERT_LOCATION": str(pem["cert"]),
                           "VIGIL_KAFKA_SSL_KEY_LOCATION": str(not_pem)})  # fmt: skip
    assert f"VIGIL_KAFKA_SSL_KEY_LOCATION {not_pem}: not a PEM certificate chain" in str(bad.value)


def test_the_grpc_receiver_takes_the_gateways_key_only_unencrypted(
    pem: dict[str, Path], tmp_path: Path
) -> None:
    """gRPC reads a key without a password: an encrypted one is named, with what to do, at the
    gateway's start and by `vigil check --role gateway`; a password given for a key that needs
    none is no error."""
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(["openssl", "pkey", "-in", str(pem["key"]), "-aes256", "-passout",
                    f"pass:{PASSWORD}", "-out", str(encrypted)], check=True)  # fmt: skip
    env = {"VIGIL_GATEWAY_TLS_CERT_LOCATION": str(pem["cert"]),
           "VIGIL_GATEWAY_TLS_KEY_PASSWORD": PASSWORD}  # fmt: skip
    tls = Settings.from_env({**env, "VIGIL_GATEWAY_TLS_KEY_LOCATION": str(encrypted)}).gateway.tls
    assert tls is not None
    with pytest.raises(ConfigError) as bad:
        credentials(ServedCertificate(tls, "VIGIL_GATEWAY_TLS_CERT_LOCATION"))
    assert str(bad.value).startswith(
        f"VIGIL_GATEWAY_TLS_KEY_LOCATION {encrypted}: an encrypted key, which the OTLP/gRPC "
        "receiver cannot read"
    )
    assert "--no-grpc" in str(bad.value) and PASSWORD not in str(bad.value)
    checked = Settings.from_env({**env, "VIGIL_GATEWAY_TLS_KEY_LOCATION": str(encrypted)})
    assert _grpc_key(checked) == Finding("grpc", WARN, str(bad.value))
    plain = Settings.from_env({**env, "VIGIL_GATEWAY_TLS_KEY_LOCATION": str(pem["key"])})
    assert plain.gateway.tls is not None
    served = ServedCertificate(plain.gateway.tls, "VIGIL_GATEWAY_TLS_CERT_LOCATION")
    assert isinstance(credentials(served), grpc.ServerCredentials)
    assert _grpc_key(plain) is None and _grpc_key(Settings.from_env({})) is None


def test_an_encrypted_key_is_read_with_its_password(pem: dict[str, Path], tmp_path: Path) -> None:
    """The Kafka client's key and the gateway's may be encrypted: the password (or a file
    holding it) reaches librdkafka, aiokafka's context and the gateway's; a missing or wrong one
    is named at start, and no repr or message holds it."""
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(["openssl", "pkey", "-in", str(pem["key"]), "-aes256", "-passout",
                    f"pass:{PASSWORD}", "-out", str(encrypted)], check=True)  # fmt: skip
    secret = tmp_path / "key-password"
    secret.write_text(PASSWORD + "\n")
    mutual = {"VIGIL_KAFKA_BOOTSTRAP": "k:9093", "VIGIL_KAFKA_SECURITY_PROTOCOL": "SSL",
              "VIGIL_KAFKA_SSL_CERT_LOCATION": str(pem["cert"]),
              "VIGIL_KAFKA_SSL_KEY_LOCATION": str(encrypted)}  # fmt: skip
    s = Settings.from_env({**mutual, "VIGIL_KAFKA_SSL_KEY_PASSWORD_FILE": str(secret)})
    assert s.kafka.config()["ssl.key.password"] == PASSWORD
    assert isinstance(s.kafka.security.faust_credentials(), SSLCredentials)  # loads the key
    assert PASSWORD not in repr(s) + repr(s.kafka)
    gateway = Settings.from_env({"VIGIL_GATEWAY_TLS_CERT_LOCATION": str(pem["cert"]),
                                 "VIGIL_GATEWAY_TLS_KEY_LOCATION": str(encrypted),
                                 "VIGIL_GATEWAY_TLS_KEY_PASSWORD": PASSWORD})  # fmt: skip
    assert gateway.gateway.tls is not None
    assert isinstance(gateway.gateway.tls.context(), ssl.SSLContext)  # the key decrypted
    assert PASSWORD not in repr(gateway) + repr(gateway.gateway.tls)

    for password, says in (({}, "is not set"),
                           ({"VIGIL_KAFKA_SSL_KEY_PASSWORD": "wrong"}, "does not decrypt it")):  # fmt: skip
        with pytest.raises(ConfigError) as bad:
            Settings.from_env({**mutual, **password})
        assert str(bad.value) == (f"VIGIL_KAFKA_SSL_KEY_LOCATION {encrypted}: an encrypted key, "
                                  f"and VIGIL_KAFKA_SSL_KEY_PASSWORD {says}")  # fmt: skip
    with pytest.raises(ConfigError, match="VIGIL_GATEWAY_TLS_KEY_PASSWORD is set without"):
        Settings.from_env({"VIGIL_GATEWAY_TLS_KEY_PASSWORD": PASSWORD})
    with pytest.raises(ConfigError, match="VIGIL_KAFKA_SSL_KEY_PASSWORD is set, but"):
        Settings.from_env({"VIGIL_KAFKA_SSL_KEY_PASSWORD": PASSWORD})
    # a password for a key that needs none is no error: ssl and librdkafka ignore it
    unencrypted = {**mutual, "VIGIL_KAFKA_SSL_KEY_LOCATION": str(pem["key"])}
    assert Settings.from_env({**unencrypted, "VIGIL_KAFKA_SSL_KEY_PASSWORD": PASSWORD}).kafka


def test_topic_replication_is_the_clusters_default_unless_set() -> None:
    assert Settings.from_env({}).replication_factor == -1
    assert Settings.from_env({"VIGIL_TOPIC_REPLICATION_FACTOR": "3"}).replication_factor == 3
    with pytest.raises(ConfigError, match="VIGIL_TOPIC_REPLICATION_FACTOR: must be positive"):
        Settings.from_env({"VIGIL_TOPIC_REPLICATION_FACTOR": "0"})
