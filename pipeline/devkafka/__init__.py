"""A local single-node Apache Kafka broker (KRaft, combined broker/controller) on 127.0.0.1.

Jars come from Maven Central through Maven into ``<cache>/kafka-<version>/libs``; the broker
runs on the machine's Java 17 with its state under ``<home>/kafka``. Every call blocks.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.kafkaconn import KafkaSecurity
from pipeline.ownership import written_by_others

_HERE = Path(__file__).resolve().parent
KAFKA_VERSION = "3.9.1"


class BrokerError(RuntimeError):
    """The local broker could not be fetched, started or stopped; the message says why and
    where its log is."""


def fetch_jars(cache_dir: Path, *, quiet: bool = False) -> Path:
    """Resolve the broker jars with Maven (once) and return the directory holding them.

    Raises BrokerError naming Maven's error when resolution fails, and where the jars resolved
    before may hold what another user wrote (Java would run it as this user).
    """
    libs = cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"
    if (libs / ".complete").exists():
        for path in (libs.parent, libs, *sorted(libs.iterdir())):
            if (why := written_by_others(path)) is not None:
                raise BrokerError(
                    f"the Kafka jars in {libs} are not used: {why}, so another user could have "
                    "put code there that the broker would run as you; remove the folder to "
                    "fetch them again, or set VIGIL_CACHE to a folder of your own"
                )
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven (mvn) is not on PATH; install it (apt-get install maven)")
    staging = libs.with_name("libs.partial")
    shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f"resolving Apache Kafka {KAFKA_VERSION} jars from Maven Central into {libs} ...")
    result = subprocess.run(
        [
            mvn,
            "-B",
            "-q",
            "-f",
            str(_HERE / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
        raise BrokerError("Maven could not resolve the Kafka jars:\n" + "\n".join(tail))
    # for this user alone to change (a umask of 002 left them writable by the group)
    try:
        for path in (staging.parent, staging, *staging.iterdir()):
            path.chmod(path.stat().st_mode & ~0o022)
    except OSError as exc:  # a parent folder another user owns
        raise BrokerError(f"the Kafka jars fetched could not be made yours alone: {exc}") from None
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    (libs / ".complete").touch(mode=0o644)
    return libs


def _properties(lines: list[str]) -> str:
    """``lines`` as a .properties file, which Java reads as ISO-8859-1 with backslash escapes:
    each backslash doubled, each character past ASCII as ``\\uXXXX`` (its UTF-16 units, as
    Java's strings hold it). Written as UTF-8, ``log.dirs`` under /tmp/józef was read as
    /tmp/jÃ³zef: the broker kept its data in a directory it made beside VIGIL_HOME, or did
    not start where it could not make one (a home directory's parent)."""
    text = "\n".join([*lines, ""]).replace("\\", "\\\\")
    return "".join(char if char.isascii() else _escaped(char) for char in text)


def _escaped(char: str) -> str:
    units = char.encode("utf-16-be", "surrogatepass").hex()
    return "".join(f"\\u{units[i : i + 4]}" for i in range(0, len(units), 4))


def ended_with_caller(command: list[str]) -> list[str]:
    """``command`` made to get SIGTERM from the kernel when the thread starting it ends, however
    that ends (SIGKILL, a CI job's time limit): ``setpriv --pdeathsig`` (util-linux) where it is
    on PATH, else ``command`` as it is. The kernel watches the thread that forks, not its
    process: start the child from one that lives as long as it should (the main thread)."""
    setpriv = shutil.which("setpriv")
    return command if setpriv is None else [setpriv, "--pdeathsig", "TERM", "--", *command]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child still answers kill(0); ask the kernel
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass(frozen=True)
class BrokerSecurity:
    """A listener that takes only TLS connections, for testing Vigil's clients against a
    cluster like a production one. ``keystore`` is a PEM file holding the broker's unencrypted
    private key and certificate chain, ``truststore`` the CA that signed it. With ``users`` the
    listener is SASL_SSL: they sign in with PLAIN or SCRAM-SHA-512, the broker itself as the
    first of them. Without, it is SSL and takes only clients with a certificate the CA signed
    (mutual TLS). With ``authorize`` (SASL_SSL), a user may do only what an ACL allows it, but
    the first user, a super user (as is the controller's own plaintext listener, on the port
    after the broker's, which only the broker uses). With ``jwks`` (SASL_SSL), a JSON Web Key
    Set file, clients may also sign in with OAUTHBEARER tokens signed by one of its keys, each
    as the user its ``sub`` claim names, for as long as the token lasts."""

    keystore: Path
    truststore: Path
    users: dict[str, str] = field(default_factory=dict, repr=False)
    authorize: bool = False
    jwks: Path | None = None

    @property
    def protocol(self) -> str:
        return "SASL_SSL" if self.users else "SSL"

    def properties(self, listener: str) -> list[str]:
        """server.properties lines for ``listener`` (its lower-case name)."""
        tls = [
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={self.keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.truststore}",
        ]
        if not self.users:
            return [*tls, "ssl.client.auth=required"]
        name, password = next(iter(self.users.items()))
        accounts = " ".join(f'user_{user}="{secret}"' for user, secret in self.users.items())
        prefix = f"listener.name.{listener}"
        oauth = []
        if self.jwks is not None:
            oauth = [
                f"{prefix}.oauthbearer.sasl.jaas.config="
                "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;",
                f"{prefix}.oauthbearer.sasl.server.callback.handler.class="
                "org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler",
                f"sasl.oauthbearer.jwks.endpoint.url={self.jwks.as_uri()}",
                # a session ends with its token, as managed clusters have it: a client must
                # sign in again (librdkafka re-authenticates; aiokafka is disconnected)
                f"{prefix}.oauthbearer.connections.max.reauth.ms=3600000",
            ]
        return [
            *tls,
            "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-512" + (",OAUTHBEARER" if oauth else ""),
            "sasl.mechanism.inter.broker.protocol=PLAIN",
            *oauth,
            f"{prefix}.plain.sasl.jaas.config="
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{name}" password="{password}" {accounts};',
            f"{prefix}.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            *(
                [
                    "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                    f"super.users=User:{name};User:ANONYMOUS",
                ]
                if self.authorize
                else []
            ),
        ]

    def client(self) -> KafkaSecurity:
        """How a client of the broker's own reaches it: signed in as the first user with PLAIN
        (SASL_SSL), or with the broker's certificate, whose keystore holds its key too (SSL)."""
        if not self.users:
            return KafkaSecurity(
                protocol="SSL",
                ca_location=self.truststore,
                cert_location=self.keystore,
                key_location=self.keystore,
            )
        user, password = next(iter(self.users.items()))
        return KafkaSecurity(
            protocol="SASL_SSL", username=user, password=password, ca_location=self.truststore
        )

    def scram_users(self) -> list[str]:
        """StorageTool arguments that create each user's SCRAM-SHA-512 credential."""
        return [
            arg
            for user, secret in self.users.items()
            for arg in ("--add-scram", f"SCRAM-SHA-512=[name={user},password={secret}]")
        ]


@dataclass(frozen=True)
class LocalKafka:
    """One broker. ``home`` holds server.properties, data, broker.pid and broker.log. With
    ``security`` its one client listener is SASL_SSL or SSL (``BrokerSecurity``), else
    PLAINTEXT."""

    home: Path
    libs: Path
    port: int = 9092
    security: BrokerSecurity | None = None

    @property
    def _listener(self) -> str:
        return "PLAINTEXT" if self.security is None else self.security.protocol

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "broker.log"

    @property
    def _pid_path(self) -> Path:
        return self.home / "broker.pid"

    def pid(self) -> int | None:
        try:
            pid = int(self._pid_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            return "stopped"
        return f"running (pid {pid}, {self.bootstrap})" if _port_open(self.port) else "starting"

    def _write_config(self) -> Path:
        data = self.home / "data"
        config = self.home / "server.properties"
        config.write_text(
            _properties(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.port + 1}",
                    f"listeners={self._listener}://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.port + 1}",
                    f"advertised.listeners={self._listener}://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    f"listener.security.protocol.map={self._listener}:{self._listener},"
                    "CONTROLLER:PLAINTEXT",
                    f"inter.broker.listener.name={self._listener}",
                    *(self.security.properties(self._listener.lower()) if self.security else []),
                    f"log.dirs={data}",
                    "num.partitions=4",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=8",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=true",
                    "message.max.bytes=4194304",
                ]
            ),
            encoding="ascii",
        )
        return config

    def _java(self, main: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise BrokerError("java is not on PATH; the local broker needs Java 17")
        return [
            java,
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{_HERE / 'log4j.properties'}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def start(self, timeout: float = 90.0, *, detached: bool = False) -> None:
        """Format storage on first use, start the broker, and wait until it takes produce
        requests. Idempotent: a running broker is left as it is. The broker stops when the
        caller's process ends, however it ends (``ended_with_caller``), unless ``detached``
        (``vigil dev kafka start``): a test run or a demo killed left it running, 768 MiB and
        two ports."""
        if self.pid() is not None:
            self._wait_ready(timeout)
            return
        if _port_open(self.port):
            raise BrokerError(f"port {self.port} is in use by another process")
        self.home.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        if not (self.home / "data" / "meta.properties").exists():
            fmt = subprocess.run(
                self._java(
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    uuid.uuid4().hex[:22],
                    "-c",
                    str(config),
                    "--ignore-formatted",
                    *([] if self.security is None else self.security.scram_users()),
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if fmt.returncode != 0:
                raise BrokerError(f"formatting KRaft storage failed: {fmt.stderr.strip()[-500:]}")
        with open(self.log_path, "ab") as log_file:
            log_start = log_file.tell()
            command = self._java("kafka.Kafka", str(config))
            proc = subprocess.Popen(
                command if detached else ended_with_caller(command),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._pid_path.write_text(str(proc.pid))
        self._wait_ready(timeout, log_start)

    def _accepts_produce(self) -> bool:
        from confluent_kafka import KafkaException, Producer

        producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "acks": "all",
                "message.timeout.ms": 5000,
                **self.client_config(),
            }
        )
        delivered: list[bool] = []
        try:
            producer.produce(
                "vigil.healthcheck",
                b"ready",
                on_delivery=lambda err, _msg: delivered.append(err is None),
            )
            producer.flush(6)
        except KafkaException:
            return False
        return delivered == [True]

    def client_config(self) -> dict[str, str]:
        """What a librdkafka client adds to ``bootstrap.servers`` to reach this broker."""
        return {} if self.security is None else self.security.client().librdkafka()

    def _errors_since(self, offset: int) -> str:
        """The last error lines the broker logged after ``offset``, for an exception message."""
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(offset)
                lines = log_file.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        errors = [
            line.strip()[:300]
            for line in lines
            if line.startswith("Caused by:") or " ERROR " in line or " FATAL " in line
        ]
        return "; ".join(errors[-3:])

    def _wait_ready(self, timeout: float, log_start: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid() is None:
                why = self._errors_since(log_start)
                raise BrokerError(
                    f"the broker exited during start-up ({why or 'no error logged'}); "
                    f"see {self.log_path}"
                )
            if _port_open(self.port) and self._accepts_produce():
                return
            time.sleep(0.5)
        raise BrokerError(
            f"the broker did not accept producers within {timeout:.0f}s; see {self.log_path}"
        )

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker: SIGTERM, SIGKILL after ``timeout``. False if it was not running."""
        pid = self.pid()
        if pid is None:
            self._pid_path.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        self._pid_path.unlink(missing_ok=True)
        return True
