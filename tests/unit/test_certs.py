"""When certificates expire, read from PEM files openssl made: `vigil check`'s finding and the
lines the worker and the gateway log at start."""

from __future__ import annotations

import logging
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.certs import (
    CertificateError,
    ServedCertificate,
    expiries,
    expiry_family,
    kafka_expiries,
    say_expiring,
    standings,
)
from pipeline.check import FAIL, OK, WARN, _certificates
from pipeline.settings import ServerTLS, Settings


def _certificate(folder: Path, name: str, days: int) -> Path:
    """A self-signed certificate valid for ``days``, with its key beside it (``name``.key)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    f"{name}.key", "-out", f"{name}.pem", "-days", str(days), "-subj",
                    f"/CN={name}"], cwd=folder, check=True, capture_output=True)  # fmt: skip
    return folder / f"{name}.pem"


def _openssl_says(path: Path) -> datetime:
    out = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", str(path)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return datetime.strptime(out.strip(), "notAfter=%b %d %H:%M:%S %Y GMT").replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("certs")
    made = {name: _certificate(folder, name, days)
            for name, days in (("ca", 400), ("client", 10), ("far", 30000))}  # fmt: skip
    chain = folder / "chain.pem"
    chain.write_bytes(made["client"].read_bytes() + made["ca"].read_bytes())  # the leaf first
    return {**made, "chain": chain}


def test_each_certificates_expiry_is_what_openssl_says(pem: dict[str, Path]) -> None:
    # 30,000 days on is after 2049: a GeneralizedTime, the others UTCTime
    for name in ("ca", "client", "far"):
        assert expiries(pem[name]) == [_openssl_says(pem[name])], name
    assert expiries(pem["chain"]) == [_openssl_says(pem["client"]), _openssl_says(pem["ca"])]
    assert expiries(pem["far"])[0].year > 2050


def test_a_file_without_a_certificate_is_named(pem: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"client.key: no PEM certificate"):
        expiries(pem["client"].with_suffix(".key"))
    broken = tmp_path / "broken.pem"
    text = pem["ca"].read_text().splitlines()
    broken.write_text("\n".join(text[:1] + text[1:4] + text[-1:]) + "\n")  # the body cut short
    with pytest.raises(CertificateError, match=r"broken.pem: certificate 1 does not decode"):
        expiries(broken)
    with pytest.raises(CertificateError, match=r"missing.pem: No such file"):
        expiries(tmp_path / "missing.pem")


def _settings(pem: dict[str, Path]) -> Settings:
    return Settings.from_env({
        "VIGIL_KAFKA_BOOTSTRAP": "k:9093", "VIGIL_KAFKA_SECURITY_PROTOCOL": "SSL",
        "VIGIL_KAFKA_SSL_CA_LOCATION": str(pem["ca"]),
        "VIGIL_KAFKA_SSL_CERT_LOCATION": str(pem["client"]),
        "VIGIL_KAFKA_SSL_KEY_LOCATION": str(pem["client"].with_suffix(".key")),
        "VIGIL_GATEWAY_TLS_CERT_LOCATION": str(pem["far"]),
        "VIGIL_GATEWAY_TLS_KEY_LOCATION": str(pem["far"].with_suffix(".key")),
    })  # fmt: skip


def test_vigil_check_warns_a_month_ahead_and_fails_once_expired(pem: dict[str, Path]) -> None:
    settings = _settings(pem)
    now = datetime.now(UTC)
    found = standings(settings, "gateway", now)
    assert [s for s, _ in found] == ["ok", "soon", "ok"]
    assert found[1][1].startswith(f"VIGIL_KAFKA_SSL_CERT_LOCATION: {pem['client']} expires in")
    finding = _certificates(settings, "gateway", now)
    assert finding is not None and finding.status == WARN
    assert "VIGIL_GATEWAY_TLS_CERT_LOCATION" in finding.detail
    # the worker presents no gateway certificate
    assert [s for s, _ in standings(settings, "worker", now)] == ["ok", "soon"]
    later = now + timedelta(days=11)
    assert [s for s, _ in standings(settings, "worker", later)] == ["ok", "expired"]
    finding = _certificates(settings, "worker", later)
    assert finding is not None and finding.status == FAIL
    assert f"{pem['client']} expired on" in finding.detail
    plain = Settings.from_env({"VIGIL_KAFKA_BOOTSTRAP": "k:9092"})
    assert _certificates(plain, "worker", now) is None
    far = Settings.from_env({"VIGIL_KAFKA_BOOTSTRAP": "k:9093",
                             "VIGIL_KAFKA_SECURITY_PROTOCOL": "SSL",
                             "VIGIL_KAFKA_SSL_CA_LOCATION": str(pem["far"])})  # fmt: skip
    finding = _certificates(far, "worker", now)
    assert finding is not None and finding.status == OK
    # a chain presented is as good as its first to expire, a bundle of CAs as its last
    chains = Settings.from_env({
        "VIGIL_KAFKA_BOOTSTRAP": "k:9093", "VIGIL_KAFKA_SECURITY_PROTOCOL": "SSL",
        "VIGIL_KAFKA_SSL_CA_LOCATION": str(pem["chain"]),
        "VIGIL_GATEWAY_TLS_CERT_LOCATION": str(pem["chain"]),
        "VIGIL_GATEWAY_TLS_KEY_LOCATION": str(pem["client"].with_suffix(".key")),
    })  # fmt: skip
    assert [s for s, _ in standings(chains, "gateway", now)] == ["ok", "soon"]
    # the worker's own endpoint, served over HTTPS, is the worker's to renew
    served = Settings.from_env({"VIGIL_WORKER_TLS_CERT_LOCATION": str(pem["chain"]),
                                "VIGIL_WORKER_TLS_KEY_LOCATION": str(pem["client"].with_suffix(".key"))})  # fmt: skip
    assert standings(served, "gateway", now) == []
    assert [s for s, what in standings(served, "worker", now)
            if what.startswith("VIGIL_WORKER_TLS_CERT_LOCATION")] == ["soon"]  # fmt: skip


def test_the_worker_and_gateway_say_at_start_what_expires_soon(
    pem: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "vigil.certs"):
        say_expiring(_settings(pem), "gateway")
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(said) == 1 and said[0][0] == "WARNING"
    assert said[0][1].startswith("certificate VIGIL_KAFKA_SSL_CERT_LOCATION:")


def test_metrics_say_when_each_certificate_expires_kafkas_as_loaded_at_start(
    pem: dict[str, Path],
) -> None:
    """/metrics' family: Kafka's CA and client certificate (as ``standings`` reads a bundle and a
    chain), and the certificate the process serves, each by the variable naming its file; the
    gateway's own certificate is not Kafka's."""
    loaded = kafka_expiries(_settings(pem))
    client, ca = _openssl_says(pem["client"]), _openssl_says(pem["ca"])
    assert loaded == {"VIGIL_KAFKA_SSL_CA_LOCATION": ca, "VIGIL_KAFKA_SSL_CERT_LOCATION": client}
    assert kafka_expiries(Settings.from_env({})) == {}
    served = ServedCertificate(
        ServerTLS(pem["far"], pem["far"].with_suffix(".key")), "VIGIL_WORKER_TLS_CERT_LOCATION"
    )
    name = "vigil_worker_certificate_expiry_timestamp_seconds"
    assert expiry_family("vigil_worker", loaded, served)[2:] == [
        f'{name}{{variable="VIGIL_KAFKA_SSL_CA_LOCATION"}} {ca.timestamp()}',
        f'{name}{{variable="VIGIL_KAFKA_SSL_CERT_LOCATION"}} {client.timestamp()}',
        f'{name}{{variable="VIGIL_WORKER_TLS_CERT_LOCATION"}} '
        f"{_openssl_says(pem['far']).timestamp()}",
    ]
    assert expiry_family("vigil_worker", {}, None) == []  # no TLS: no family
