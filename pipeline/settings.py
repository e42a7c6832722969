"""One frozen settings object, read from ``VIGIL_*`` environment variables once at start.

Stages never read the environment; the CLI builds a Settings and passes it down.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import re
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from pipeline.kafkaconn import (
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
    KafkaConnection,
    KafkaSecurity,
    OidcClient,
)
from pipeline.validate import Limits


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def redact_dsn(dsn: str) -> str:
    """Hide the password in ``scheme://user:password@host`` so a DSN can be logged."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)


# ``vigil worker --role``: every agent in one process, or the worker split in two processes
WORKER_ROLES = ("all", "store", "validate")


@dataclass(frozen=True)
class Topics:
    raw: str
    clean: str
    dlq: str
    rollups: str
    alerts: str

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        return cls(
            raw=f"{prefix}.events.raw",
            clean=f"{prefix}.events.clean",
            dlq=f"{prefix}.events.dlq",
            rollups=f"{prefix}.rollups",
            alerts=f"{prefix}.alerts",
        )

    @property
    def drained(self) -> tuple[str, str, str]:
        """The topics whose backlog the worker drains into ClickHouse: how long they keep
        messages is the longest store outage nothing is lost in."""
        return self.raw, self.clean, self.dlq


@dataclass(frozen=True)
class ServerTLS:
    """What an HTTPS server of Vigil's presents: a certificate chain and its key (PEM), and the
    key's password if it is encrypted; checked when Settings read them."""

    cert: Path
    key: Path
    key_password: str | None = field(default=None, repr=False)

    def context(self) -> ssl.SSLContext:
        """The server side of TLS 1.2 or later with this certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # "", not None: OpenSSL would ask for an encrypted key's password on the terminal
        context.load_cert_chain(self.cert, self.key, self.key_password or "")
        return context


@dataclass(frozen=True)
class GatewaySettings:
    """The OTLP gateway's limits (``vigil gateway``)."""

    max_request_bytes: int = 8 * 1024 * 1024  # after gzip is undone, too
    key_header: str = "Authorization"  # "Authorization: Bearer KEY", or a header holding the key
    max_queue: int = 50_000  # messages waiting for the broker before 429
    # bytes of export requests held at once, from a body's first byte to its answer, before 503
    max_bytes_in_flight: int = 64 * 1024 * 1024
    delivery_timeout: float = 10.0  # seconds to wait for the broker before 503
    body_timeout: float = 30.0  # seconds a request's body may take to arrive before 408
    tls: ServerTLS | None = None  # HTTPS with it, else plain HTTP
    # seconds an OTLP/gRPC connection is kept before the client is asked to make a new one
    grpc_connection_age: float = 300.0


@dataclass(frozen=True)
class Settings:
    home: Path
    cache_dir: Path
    kafka_bootstrap: str | None
    dev_kafka_port: int
    clickhouse_dsn: str = field(repr=False)
    topics: Topics
    partitions: int
    consumer_group: str
    sink_batch_size: int
    sink_flush_seconds: float
    limits: Limits
    # the ledger finds a repeat of an event among stored events this close to its ts
    ledger_dedup_window: timedelta
    config_path: Path | None = None
    gateway: GatewaySettings = field(default_factory=lambda: GatewaySettings())
    # how often a worker logs what it has done (``pipeline.progress``), in seconds
    progress_seconds: float = 30.0
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    # copies of each partition of the topics Vigil creates; -1: the cluster's
    # default.replication.factor
    replication_factor: int = -1
    # (host, port) where a worker serves /healthz, /readyz and /metrics; None: nowhere. Over
    # HTTPS with ``worker_tls``
    worker_http: tuple[str, int] | None = None
    worker_tls: ServerTLS | None = None
    # how long the topics Vigil drains (raw, clean, the DLQ) keep messages when it creates them;
    # None: the cluster's log.retention
    topic_retention_hours: float | None = None
    # alerts' webhooks: each attempt's timeout; how often a worker posts again what was not
    # delivered, and for how long after an alert was raised (``alerting.Notifier``)
    webhook_timeout_seconds: float = 5.0
    alert_sweep_seconds: float = 60.0
    # how often a store worker samples the consumer groups' lag (``vigil.consumer_lag``); the
    # samples judge quiet tenants' windows once they show the pipeline caught up (``CaughtUp``)
    lag_sample_seconds: float = 30.0
    alert_delivery_hours: float = 24.0
    # what a scraper shows (Authorization: Bearer) to read the worker's and the gateway's
    # /metrics; None: anyone may, and the gateway's leaves out what names tenants
    metrics_token: str | None = field(default=None, repr=False)
    # where the SDK's process-wide emitter keeps what the broker did not take
    # (``connectors.spool``), and at most how much; None: no spool
    sdk_spool: Path | None = None
    sdk_spool_max_bytes: int = 1 << 30
    # how long a read-only query the worker serves to another process from the embedded store
    # may run (``pipeline.owner``): the worker's own writes wait for it
    served_query_seconds: float = 60.0

    def __repr__(self) -> str:
        return (
            f"Settings(home={self.home}, kafka={self.bootstrap} "
            f"({self.kafka_security.protocol}), "
            f"clickhouse={redact_dsn(self.clickhouse_dsn)}, topics={self.topics.raw}...)"
        )

    @property
    def bootstrap(self) -> str:
        """Where Kafka is: VIGIL_KAFKA_BOOTSTRAP, or the local dev broker."""
        return self.kafka_bootstrap or f"127.0.0.1:{self.dev_kafka_port}"

    @property
    def kafka(self) -> KafkaConnection:
        """Where Kafka is and how every client signs in to it."""
        return KafkaConnection(self.bootstrap, self.kafka_security)

    @property
    def embedded(self) -> bool:
        return self.clickhouse_dsn.startswith("chdb://")

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: os.environ). Raises ConfigError."""
        env = os.environ if env is None else env
        home = Path(env.get("VIGIL_HOME", ".vigil")).resolve()
        cache = env.get("VIGIL_CACHE") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vigil"
        )
        dsn = env.get("VIGIL_CLICKHOUSE_DSN") or f"chdb://{home / 'clickhouse'}"
        if not re.match(r"^(chdb|https?|clickhouse)://", dsn):
            raise ConfigError(
                "VIGIL_CLICKHOUSE_DSN: expected chdb:///path or http(s)://host:port, "
                f"got {redact_dsn(dsn)!r}"
            )

        def number(name: str, default: str, kind: type[int] | type[float]) -> int | float:
            raw = env.get(name, default)
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
            if not math.isfinite(value):  # a wait of nan or inf seconds never ends
                raise ConfigError(f"{name}: expected a finite number, got {raw!r}")
            if value <= 0:
                raise ConfigError(f"{name}: must be positive, got {raw!r}")
            return value

        max_request = int(number("VIGIL_GATEWAY_MAX_BYTES", "8388608", int))
        in_flight = int(
            number("VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT", str(max(64 << 20, max_request)), int)
        )
        if in_flight < max_request:
            raise ConfigError(
                f"VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT: {in_flight} is below VIGIL_GATEWAY_MAX_BYTES "
                f"({max_request}), so a request of the largest size allowed could never be taken"
            )
        config = env.get("VIGIL_CONFIG")
        if config is None and Path("vigil.yaml").exists():
            config = "vigil.yaml"
        return cls(
            config_path=Path(config).resolve() if config else None,
            home=home,
            cache_dir=Path(cache),
            kafka_bootstrap=_bootstrap(env),
            kafka_security=kafka_security(env),
            dev_kafka_port=_dev_port(int(number("VIGIL_DEV_KAFKA_PORT", "9092", int))),
            clickhouse_dsn=dsn,
            topics=Topics.with_prefix(_topic_prefix(env)),
            partitions=int(number("VIGIL_PARTITIONS", "4", int)),
            replication_factor=(
                int(number("VIGIL_TOPIC_REPLICATION_FACTOR", "1", int))
                if env.get("VIGIL_TOPIC_REPLICATION_FACTOR")
                else -1
            ),
            worker_http=_address(env, "VIGIL_WORKER_HTTP_ADDRESS"),
            worker_tls=_server_tls(env, "VIGIL_WORKER_TLS"),
            topic_retention_hours=(
                float(number("VIGIL_TOPIC_RETENTION_HOURS", "168", float))
                if env.get("VIGIL_TOPIC_RETENTION_HOURS")
                else None
            ),
            webhook_timeout_seconds=float(number("VIGIL_WEBHOOK_TIMEOUT_SECONDS", "5", float)),
            metrics_token=_secret(env, "VIGIL_METRICS_TOKEN"),
            alert_sweep_seconds=float(number("VIGIL_ALERT_SWEEP_SECONDS", "60", float)),
            lag_sample_seconds=float(number("VIGIL_LAG_SAMPLE_SECONDS", "30", float)),
            alert_delivery_hours=float(number("VIGIL_ALERT_DELIVERY_HOURS", "24", float)),
            sdk_spool=(
                Path(env["VIGIL_SDK_SPOOL_DIR"]).resolve()
                if env.get("VIGIL_SDK_SPOOL_DIR")
                else None
            ),
            sdk_spool_max_bytes=int(number("VIGIL_SDK_SPOOL_MAX_BYTES", str(1 << 30), int)),
            served_query_seconds=float(number("VIGIL_SERVED_QUERY_SECONDS", "60", float)),
            consumer_group=_consumer_group(env),
            sink_batch_size=int(number("VIGIL_SINK_BATCH_SIZE", "10000", int)),
            sink_flush_seconds=float(number("VIGIL_SINK_FLUSH_SECONDS", "0.5", float)),
            progress_seconds=float(number("VIGIL_PROGRESS_SECONDS", "30", float)),
            ledger_dedup_window=timedelta(
                seconds=float(number("VIGIL_LEDGER_DEDUP_WINDOW_SECONDS", "600", float))
            ),
            limits=Limits(
                max_payload_bytes=int(number("VIGIL_MAX_PAYLOAD_BYTES", "1048576", int)),
                max_clock_skew=timedelta(
                    seconds=float(number("VIGIL_MAX_CLOCK_SKEW_SECONDS", "3600", float))
                ),
                max_event_age=timedelta(
                    days=float(number("VIGIL_MAX_EVENT_AGE_DAYS", "400", float))
                ),
            ),
            gateway=GatewaySettings(
                max_request_bytes=max_request,
                key_header=env.get("VIGIL_GATEWAY_KEY_HEADER", "Authorization"),
                max_queue=int(number("VIGIL_GATEWAY_MAX_QUEUE", "50000", int)),
                max_bytes_in_flight=in_flight,
                delivery_timeout=float(
                    number("VIGIL_GATEWAY_DELIVERY_TIMEOUT_SECONDS", "10", float)
                ),
                body_timeout=float(number("VIGIL_GATEWAY_BODY_TIMEOUT_SECONDS", "30", float)),
                tls=_server_tls(env, "VIGIL_GATEWAY_TLS"),
                grpc_connection_age=float(
                    number("VIGIL_GATEWAY_GRPC_CONNECTION_AGE_SECONDS", "300", float)
                ),
            ),
        )


# --- the shapes a policy file's values take (vigil.yaml, a price catalog) ---


def name_of(spec: Mapping[str, Any], key: str, where: str, default: str) -> str:
    """A name (a tenant, agent, team, metric): a string or number, not a list or mapping."""
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, str | int | float) or value == "":
        raise ConfigError(f"{where}.{key}: expected a name, got {value!r}")
    return str(value)


def mapping_of(spec: Any, known: Sequence[str], where: str) -> Mapping[str, Any]:
    """``spec`` as a mapping whose keys are all ``known``: a misspelt setting is named, not
    left to its default."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(spec).__name__}")
    unknown = sorted(str(k) for k in set(spec) - set(known))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown setting (known: {', '.join(known)})")
    return spec


def list_of(value: Any, where: str) -> list[Any]:
    """``value`` as a list (None: an empty one)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def parse_date(text: str, option: str = "--since") -> datetime:
    """A command line's date (``YYYY-MM-DD``, or an ISO time), read in UTC unless it names its
    zone, and returned in UTC. Raises ConfigError naming ``option``."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a date (YYYY-MM-DD)") from None
    return as_utc(at).astimezone(UTC)


def config_option(
    parser: argparse.ArgumentParser, what: str, default: str = "VIGIL_CONFIG, else ./vigil.yaml"
) -> None:
    """``--config PATH`` on a command that reads vigil.yaml (``what`` it takes from it): the
    file instead of VIGIL_CONFIG's (``cli.main`` puts it in the settings)."""
    parser.add_argument("--config", metavar="PATH", help=f"vigil.yaml with {what} ({default})")


def count_argument(text: str) -> int:
    """A command line's count (argparse's ``type``): a whole number from 1 to 2^63 - 1 (past
    it, ClickHouse refused a LIMIT with an error of its own)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 1 to {2**63 - 1}, got {text!r}"
        )
    return value


def port_argument(text: str) -> int:
    """A command line's port (argparse's ``type``): 1 to 65535."""
    if not re.fullmatch(r"\d{1,5}", text) or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return int(text)


def seconds_argument(text: str) -> float:
    """A command line's wait (argparse's ``type``): seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected seconds, more than 0, got {text!r}")
    return value


def output_file(path: str, option: str = "--out") -> Path:
    """A command line's file to write, checked before the work that fills it: its folder must
    be there and writable. Raises ConfigError naming ``option``."""
    out = Path(path)
    folder = out.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK) or out.is_dir():
        what = "is a folder" if out.is_dir() else f"{folder} is not a folder this user may write"
        raise ConfigError(f"{option} {path}: cannot write it ({what})")
    return out


def read_input(path: Path, what: str) -> str:
    """The text of a file a person wrote (a policy file, a price catalog). Raises ConfigError
    naming the file and ``what`` it is for: one missing, a folder, unreadable, or not UTF-8
    (on the line of the first byte that is not), where each was a traceback."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except (OSError, UnicodeEncodeError) as exc:  # a path no file system names: unencodable
        why = exc.strerror if isinstance(exc, OSError) else "not a path this system can name"
        raise ConfigError(f"{path}: cannot read the {what} ({why or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: the {what} is not UTF-8 text (line {line})") from None


class _RepeatedKey(Exception):
    def __init__(self, key: object, line: int, first: int) -> None:
        super().__init__(f"line {line}: {key!r} is given twice in one mapping (first on line "
                         f"{first}); only one may be")  # fmt: skip


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, reading a key as it is written, taking only true and false for
    booleans (as YAML 1.2 does), and refusing a key given twice in a mapping.

    Every key of Vigil's files is a name (a tenant, an agent, a model, a setting): YAML 1.1
    read an unquoted ``off:``, ``no:`` or ``yes:`` as a boolean and ``007:`` or ``3.10:`` as a
    number, so a tenant named off became 'False' (its API keys answered as tenant 'False',
    its events stored under it) and an agent 007 became '7'. As a value, ``team: no`` was
    the team 'False'; ``disabled: yes`` is now the string it looks like, refused by name
    where a boolean belongs. PyYAML keeps the last of a repeated key: a second ``tenants:``
    section silently dropped every tenant of the first (and their gateway keys), an agent
    listed twice its first owner, a price entry giving ``input`` twice its first price."""

    # YAML 1.1's booleans beyond true and false (yes, no, on, off, in three cases each) left out
    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[object, int] = {}  # key -> the line it is first on
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<``: overriding is its purpose
                continue
            if isinstance(key_node, yaml.ScalarNode) and key_node.style is None:
                key_node.tag = "tag:yaml.org,2002:str"  # plain: the name as written
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                seen = first.get(key)
            except TypeError:  # not hashable: the base class names it
                continue
            if seen is not None:
                raise _RepeatedKey(key, line, seen)
            first[key] = line
        return super().construct_mapping(node, deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str, path: Path | str, what: str) -> Any:
    """The document ``text`` (the file ``path``, a ``what`` a person wrote) holds. Raises
    ConfigError naming the file and the line: YAML it cannot read, or a key given twice in one
    mapping (``_StrictLoader``).

    Read from a stream named as the file, so that YAML's errors say where they are by the
    file's name and line, and quote none of it: read from a string, they said
    '"<unicode string>", line 2' and quoted the line, which may hold a secret (a Slack
    webhook's URL)."""
    document = io.StringIO(text)
    document.name = str(path)
    try:
        return yaml.load(document, Loader=_StrictLoader)  # a SafeLoader
    except _RepeatedKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: the {what} is not valid YAML ({exc})") from None


def write_output(out: Path, text: str, option: str = "--out") -> None:
    """Write ``text`` to ``out`` (from ``output_file``). Raises ConfigError naming ``option``
    (a full disk...)."""
    try:
        out.write_text(text)
    except OSError as exc:
        raise ConfigError(f"{option} {out}: cannot write it ({exc.strerror or exc})") from None


def as_utc(at: datetime) -> datetime:
    """``at`` if it names its zone, else ``at`` in UTC: a command line's date, or a time read
    from a UTC column by a client that returns it without one."""
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _topic_prefix(env: Mapping[str, str]) -> str:
    """VIGIL_TOPIC_PREFIX: what Kafka allows in a topic's name, so a bad one is named at start
    rather than by the broker at first use."""
    value = env.get("VIGIL_TOPIC_PREFIX", "vigil")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", value):
        raise ConfigError(
            "VIGIL_TOPIC_PREFIX: expected letters, digits, '.', '_' or '-' (as Kafka names "
            f"topics), got {value!r}"
        )
    return value


def _consumer_group(env: Mapping[str, str]) -> str:
    value = env.get("VIGIL_CONSUMER_GROUP", "vigil-worker")
    if not re.fullmatch(r"\S{1,249}", value):
        raise ConfigError(f"VIGIL_CONSUMER_GROUP: expected a name without spaces, got {value!r}")
    return value


def _bootstrap(env: Mapping[str, str]) -> str | None:
    """VIGIL_KAFKA_BOOTSTRAP: ``host:port,...`` (a port may be left to Kafka's 9092)."""
    value = env.get("VIGIL_KAFKA_BOOTSTRAP") or None
    if value is None:
        return None
    for server in value.split(","):
        found = re.fullmatch(r"(?:[A-Za-z_]+://)?(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+)(?::(\d+))?",
                             server.strip())  # fmt: skip
        if found is None or (found[2] is not None and not 0 < int(found[2]) < 65536):
            raise ConfigError(
                f"VIGIL_KAFKA_BOOTSTRAP: expected host:port, comma-separated, got {server!r}"
            )
    return value


def _dev_port(port: int) -> int:
    """The local broker's port; its controller takes the next one."""
    if port > 65534:
        raise ConfigError(f"VIGIL_DEV_KAFKA_PORT: expected a port below 65535, got {port}")
    return port


def _address(env: Mapping[str, str], name: str) -> tuple[str, int] | None:
    """``host:port`` (IPv6 in brackets) from variable ``name``; None when unset. Raises
    ConfigError."""
    value = env.get(name)
    if not value:
        return None
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: expected host:port, got {value!r}")
    return host, int(port)


def kafka_security(env: Mapping[str, str]) -> KafkaSecurity:
    """How Vigil's Kafka clients sign in, from ``VIGIL_KAFKA_SECURITY_PROTOCOL`` and the
    ``VIGIL_KAFKA_SASL_*`` and ``VIGIL_KAFKA_SSL_*`` variables it calls for. A variable given
    where the protocol does not use it is an error, not ignored: credentials meant for a
    cluster are not silently left out of its connections. Raises ConfigError."""
    protocol = env.get("VIGIL_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise ConfigError(
            f"VIGIL_KAFKA_SECURITY_PROTOCOL: expected one of {', '.join(SECURITY_PROTOCOLS)}, "
            f"got {env['VIGIL_KAFKA_SECURITY_PROTOCOL']!r}"
        )
    if protocol != "PLAINTEXT" and not env.get("VIGIL_KAFKA_BOOTSTRAP"):
        raise ConfigError(
            f"VIGIL_KAFKA_SECURITY_PROTOCOL={protocol} needs VIGIL_KAFKA_BOOTSTRAP: the local "
            "broker Vigil starts without it takes plaintext connections only"
        )
    security = KafkaSecurity(protocol=protocol)
    sasl_names = [name for name in _SASL_VARIABLES if env.get(name)]
    tls_names = [name for name in _TLS_VARIABLES if env.get(name)]
    for names, used in ((sasl_names, security.sasl), (tls_names, security.tls)):
        if names and not used:
            raise ConfigError(
                f"{names[0]} is set, but VIGIL_KAFKA_SECURITY_PROTOCOL={protocol} does not use "
                f"it (SASL_* settings need SASL_SSL or SASL_PLAINTEXT, SSL_* ones SSL or SASL_SSL)"
            )
    if security.sasl:
        mechanism = env.get("VIGIL_KAFKA_SASL_MECHANISM", "PLAIN").upper()
        if mechanism not in SASL_MECHANISMS:
            raise ConfigError(
                f"VIGIL_KAFKA_SASL_MECHANISM: expected one of {', '.join(SASL_MECHANISMS)}, "
                f"got {env['VIGIL_KAFKA_SASL_MECHANISM']!r}"
            )
        if mechanism == "OAUTHBEARER":
            security = dataclasses.replace(security, mechanism=mechanism, oidc=_oidc_client(env))
        else:
            oauth = [name for name in _OAUTHBEARER_VARIABLES if env.get(name)]
            if oauth:
                raise ConfigError(
                    f"{oauth[0]} is set, but VIGIL_KAFKA_SASL_MECHANISM={mechanism} does not use "
                    "it (it is for OAUTHBEARER)"
                )
            username = env.get("VIGIL_KAFKA_SASL_USERNAME")
            if not username:
                raise ConfigError(f"VIGIL_KAFKA_SASL_USERNAME: {protocol} needs a user name")
            password = _secret(env, "VIGIL_KAFKA_SASL_PASSWORD")
            if password is None:
                raise ConfigError(
                    "VIGIL_KAFKA_SASL_PASSWORD (or VIGIL_KAFKA_SASL_PASSWORD_FILE): SASL needs a "
                    "password"
                )
            security = dataclasses.replace(
                security, mechanism=mechanism, username=username, password=password
            )
    if security.tls:
        cert, key, key_password = _certificate_and_key(
            env, "VIGIL_KAFKA_SSL", "a client certificate"
        )
        security = dataclasses.replace(
            security,
            ca_location=_certificate_authority(env, "VIGIL_KAFKA_SSL_CA_LOCATION"),
            cert_location=cert,
            key_location=key,
            key_password=key_password,
        )
    return security


def _oidc_client(env: Mapping[str, str]) -> OidcClient:
    """OAUTHBEARER's client: its token endpoint, id and secret (or secret file), scope, the CA
    of an https endpoint's certificate, and the extensions sent with its tokens. A user name or
    password set beside them is an error: OAUTHBEARER would not send it. Raises ConfigError."""
    for name in ("VIGIL_KAFKA_SASL_USERNAME", "VIGIL_KAFKA_SASL_PASSWORD",
                 "VIGIL_KAFKA_SASL_PASSWORD_FILE"):  # fmt: skip
        if env.get(name):
            raise ConfigError(
                f"{name} is set, but VIGIL_KAFKA_SASL_MECHANISM=OAUTHBEARER does not use it: "
                "it signs in with VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID and _CLIENT_SECRET"
            )
    url = env.get("VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL", "")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(
            "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL: OAUTHBEARER needs the http(s) URL "
            "of the OpenID Connect provider's token endpoint"
            + (", got one that is not" if url else "")
        )
    if parsed.username is not None or parsed.password is not None:
        raise ConfigError(
            "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL: holds a user or password; give "
            "the client's with VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID and _CLIENT_SECRET"
        )
    client_id = env.get("VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID")
    if not client_id:
        raise ConfigError("VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID: OAUTHBEARER needs a client id")
    secret = _secret(env, "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET")
    if secret is None:
        raise ConfigError(
            "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET (or _CLIENT_SECRET_FILE): OAUTHBEARER "
            "needs the client's secret"
        )
    scope = env.get("VIGIL_KAFKA_SASL_OAUTHBEARER_SCOPE") or None
    if env.get("VIGIL_KAFKA_SASL_OAUTHBEARER_CA_LOCATION") and parsed.scheme != "https":
        raise ConfigError(
            "VIGIL_KAFKA_SASL_OAUTHBEARER_CA_LOCATION is set, but the token endpoint is not https"
        )
    ca = _certificate_authority(env, "VIGIL_KAFKA_SASL_OAUTHBEARER_CA_LOCATION")
    extensions = _sasl_extensions(env.get("VIGIL_KAFKA_SASL_OAUTHBEARER_EXTENSIONS", ""))
    return OidcClient(url, client_id, secret, scope, ca, extensions)


_EXTENSION_KEY = re.compile(r"[A-Za-z]+")  # RFC 7628 3.1: key = 1*(ALPHA)
_EXTENSION_VALUE = re.compile(r"[\x21-\x7e]+")  # VCHAR; no spaces, as librdkafka takes them


def _sasl_extensions(given: str) -> tuple[tuple[str, str], ...]:
    """``key=value,key=value`` as pairs, each checked as RFC 7628 has them (and ``auth``,
    which holds the token, refused). Raises ConfigError naming the pair."""
    pairs = []
    for item in filter(None, (part.strip() for part in given.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not _EXTENSION_KEY.fullmatch(key) or key == "auth":
            raise ConfigError(
                f"VIGIL_KAFKA_SASL_OAUTHBEARER_EXTENSIONS: {item!r} is not key=value with a key "
                "of letters alone (and not auth)"
            )
        if not _EXTENSION_VALUE.fullmatch(value):
            raise ConfigError(
                f"VIGIL_KAFKA_SASL_OAUTHBEARER_EXTENSIONS: {key}'s value must be printable "
                "ASCII, without spaces"
            )
        pairs.append((key, value))
    return tuple(pairs)


def _server_tls(env: Mapping[str, str], prefix: str) -> ServerTLS | None:
    """An HTTPS server's certificate chain and key (``<prefix>_CERT_LOCATION``,
    ``_KEY_LOCATION``), both or neither, and the key's password if it is encrypted. Raises
    ConfigError."""
    cert, key, password = _certificate_and_key(env, prefix, "HTTPS")
    return None if cert is None or key is None else ServerTLS(cert, key, password)


def _certificate_and_key(
    env: Mapping[str, str], prefix: str, needs: str
) -> tuple[Path | None, Path | None, str | None]:
    """The files ``<prefix>_CERT_LOCATION`` and ``<prefix>_KEY_LOCATION`` name, given together
    or not at all, and ``<prefix>_KEY_PASSWORD`` (or ``_FILE``) for an encrypted key; loaded
    once now: a file that is not a PEM certificate chain and its key, or a wrong password, is
    named at start, not by a TLS library at the first connection. Raises ConfigError."""
    names = (f"{prefix}_CERT_LOCATION", f"{prefix}_KEY_LOCATION")
    cert, key = (_readable_file(env, name) for name in names)
    password = _secret(env, f"{prefix}_KEY_PASSWORD")
    if (cert is None) != (key is None):
        raise ConfigError(
            f"{names[0] if key is None else names[1]} is set without its pair: {needs} needs "
            f"both {names[0]} and {names[1]}"
        )
    if cert is None or key is None:
        if password is not None:
            raise ConfigError(f"{prefix}_KEY_PASSWORD is set without {names[1]}")
        return None, None, None
    try:
        # ssl ignores a password an unencrypted key does not need; "", not None, for one
        # that does, or OpenSSL asks for it on the terminal
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password or "")
    except ssl.SSLError as exc:
        if b"ENCRYPTED" in key.read_bytes():  # PKCS#8's header, or the older Proc-Type line
            raise ConfigError(
                f"{names[1]} {key}: an encrypted key, and {prefix}_KEY_PASSWORD "
                + ("is not set" if password is None else "does not decrypt it")
            ) from None
        raise ConfigError(
            f"{names[0]} {cert} and {names[1]} {key}: not a PEM certificate chain and its "
            f"private key ({exc.reason or exc})"
        ) from None
    return cert, key, password


def _certificate_authority(env: Mapping[str, str], name: str) -> Path | None:
    """The CA file variable ``name`` points at, loaded once now. Raises ConfigError."""
    path = _readable_file(env, name)
    if path is not None:
        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{name}: {path} holds no PEM certificate ({exc.reason or exc})"
            ) from None
    return path


_OAUTHBEARER_VARIABLES = (
    "VIGIL_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
    "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
    "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET",
    "VIGIL_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
    "VIGIL_KAFKA_SASL_OAUTHBEARER_SCOPE",
    "VIGIL_KAFKA_SASL_OAUTHBEARER_CA_LOCATION",
    "VIGIL_KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
)
_SASL_VARIABLES = (
    "VIGIL_KAFKA_SASL_MECHANISM",
    "VIGIL_KAFKA_SASL_USERNAME",
    "VIGIL_KAFKA_SASL_PASSWORD",
    "VIGIL_KAFKA_SASL_PASSWORD_FILE",
    *_OAUTHBEARER_VARIABLES,
)
_TLS_VARIABLES = (
    "VIGIL_KAFKA_SSL_CA_LOCATION",
    "VIGIL_KAFKA_SSL_CERT_LOCATION",
    "VIGIL_KAFKA_SSL_KEY_LOCATION",
    "VIGIL_KAFKA_SSL_KEY_PASSWORD",
    "VIGIL_KAFKA_SSL_KEY_PASSWORD_FILE",
)


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """Variable ``name``, or the first line of the file ``<name>_FILE`` names (a mounted
    secret); None when neither is set. No message holds the secret."""
    given, path = env.get(name), env.get(f"{name}_FILE")
    if given and path:
        raise ConfigError(f"{name} and {name}_FILE are both set; set one")
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
        given = lines[0] if lines else ""
        if not given:
            raise ConfigError(f"{name}_FILE: {path} is empty")
    return given or None


def _readable_file(env: Mapping[str, str], name: str) -> Path | None:
    """The file variable ``name`` points at, checked now, so that a wrong path is named at start
    rather than as a TLS library's error at the first connection."""
    value = env.get(name)
    if not value:
        return None
    # absolute, its links kept: a mounted secret's file is a link Kubernetes points elsewhere at
    # each update, and a renewed server certificate is read again through it (ServedCertificate)
    path = Path(os.path.abspath(Path(value).expanduser()))
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {value}: {exc.strerror}") from None
    return path
