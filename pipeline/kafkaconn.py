"""How Vigil's Kafka clients reach a cluster: where it is, and how they sign in to it.

Every client Vigil makes (the confluent-kafka producers, consumers and admin clients, and
aiokafka under Faust) starts from one ``KafkaConnection``, so a cluster that takes only TLS or
SASL connections is reached by all of them or by none. Built from ``VIGIL_KAFKA_*`` settings
(``Settings.kafka``). OAUTHBEARER tokens come from an OpenID Connect provider's token endpoint
(the client credentials grant): librdkafka asks for its own (``sasl.oauthbearer.method=oidc``),
aiokafka for Vigil's (``pipeline.oidc``).
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Faust is imported by the worker alone, not by every user of Settings
    from faust.types.auth import CredentialsT

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


@dataclass(frozen=True)
class OidcClient:
    """An OAuth 2.0 client that signs in to Kafka with OAUTHBEARER: its tokens come from
    ``token_url`` for its id and secret (the client credentials grant), for ``scope`` if given;
    an https endpoint's certificate is checked against ``ca_location`` (a PEM file; None: the
    system's CAs). ``extensions`` are sent with each token (RFC 7628's key=value pairs, which
    Confluent Cloud asks for: logicalCluster, identityPoolId). The secret is never in a repr."""

    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    scope: str | None = None
    ca_location: Path | None = None
    extensions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class KafkaSecurity:
    """How a client signs in: ``protocol`` one of SECURITY_PROTOCOLS; for SASL_* a user and
    password with ``mechanism`` (SASL_MECHANISMS), or with OAUTHBEARER an ``oidc`` client
    instead; for SSL and SASL_SSL the CA that signed the brokers' certificates
    (``ca_location``, a PEM file; None: the system's CAs) and, for mutual TLS, the client's
    certificate and key (PEM files; ``key_password`` if the key is encrypted). No password or
    client secret is ever in a repr."""

    protocol: str = "PLAINTEXT"
    mechanism: str = "PLAIN"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_location: Path | None = None
    cert_location: Path | None = None
    key_location: Path | None = None
    key_password: str | None = field(default=None, repr=False)  # an encrypted key's
    oidc: OidcClient | None = None  # OAUTHBEARER's

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    def librdkafka(self) -> dict[str, str]:
        """The confluent-kafka (librdkafka) properties that say so."""
        config = {"security.protocol": self.protocol}
        if self.tls:
            # "probe": the system's CA bundle, wherever this distribution keeps it
            config["ssl.ca.location"] = str(self.ca_location or "probe")
            if self.cert_location is not None and self.key_location is not None:
                config["ssl.certificate.location"] = str(self.cert_location)
                config["ssl.key.location"] = str(self.key_location)
                if self.key_password is not None:
                    config["ssl.key.password"] = self.key_password
        if self.sasl:
            config["sasl.mechanism"] = self.mechanism
            if self.oidc is not None:
                config["sasl.oauthbearer.method"] = "oidc"
                config["sasl.oauthbearer.token.endpoint.url"] = self.oidc.token_url
                config["sasl.oauthbearer.client.id"] = self.oidc.client_id
                config["sasl.oauthbearer.client.secret"] = self.oidc.client_secret
                if self.oidc.scope is not None:
                    config["sasl.oauthbearer.scope"] = self.oidc.scope
                config["https.ca.location"] = str(self.oidc.ca_location or _system_cas())
                if self.oidc.extensions:
                    config["sasl.oauthbearer.extensions"] = ",".join(
                        f"{key}={value}" for key, value in self.oidc.extensions
                    )
            else:
                config["sasl.username"] = self.username or ""
                config["sasl.password"] = self.password or ""
        return config

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context aiokafka uses: the brokers' certificates checked against the CA, and
        their host names against the certificates, as librdkafka checks them."""
        context = ssl.create_default_context(
            cafile=str(self.ca_location) if self.ca_location is not None else None
        )
        if self.cert_location is not None and self.key_location is not None:
            password = self.key_password or ""  # None: OpenSSL would ask on the terminal
            context.load_cert_chain(self.cert_location, self.key_location, password)
        return context

    def faust_credentials(self) -> CredentialsT | None:
        """Faust's ``broker_credentials`` for the same sign-in; None for PLAINTEXT."""
        from faust.auth import OAuthCredentials, SASLCredentials, SSLCredentials

        context = self.ssl_context() if self.tls else None
        if self.oidc is not None:
            from pipeline.oidc import OidcTokens

            return OAuthCredentials(oauth_cb=OidcTokens(self.oidc), ssl_context=context)
        if self.sasl:
            return SASLCredentials(
                username=self.username,
                password=self.password,
                mechanism=self.mechanism,
                ssl_context=context,
            )
        return SSLCredentials(context) if context is not None else None


@functools.cache  # asked at each client's config, the same answer each time
def _system_cas() -> str:
    """The CA file of the system's OpenSSL (on Debian /etc/ssl/certs/ca-certificates.crt), for
    the HTTPS client librdkafka asks a token endpoint with: its own default, and its "probe",
    were a path of the distribution its wheel was built on, which Debian lacks, so every https
    endpoint was refused; "probe" where the system has none."""
    paths = ssl.get_default_verify_paths()
    for cafile in (paths.cafile, paths.openssl_cafile):
        if cafile and Path(cafile).is_file():
            return cafile
    return "probe"


@dataclass(frozen=True)
class KafkaConnection:
    """A cluster's bootstrap servers and how to sign in to them. Its str is the bootstrap
    servers alone, for messages."""

    bootstrap: str
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    def __str__(self) -> str:
        return self.bootstrap

    def config(self) -> dict[str, Any]:
        """The properties every confluent-kafka client of this cluster starts from."""
        return {"bootstrap.servers": self.bootstrap, **self.security.librdkafka()}
