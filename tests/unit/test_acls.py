"""How a grant is named, whose principal the ACL check asks about, and what it makes of the
cluster's answers."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AclOperation, ResourceType

from pipeline.acls import Grant, _operations, principal_of
from pipeline.kafkaconn import KafkaSecurity, OidcClient


def test_the_principal_is_the_sasl_user_or_said_to_come_from_the_certificate_or_token() -> None:
    sasl = KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", "vigil", "secret")
    assert principal_of(sasl) == "User:vigil"
    mutual = KafkaSecurity("SSL", cert_location=Path("c.pem"), key_location=Path("k.pem"))
    assert principal_of(mutual) == "User:<the principal of VIGIL_KAFKA_SSL_CERT_LOCATION>"
    assert principal_of(KafkaSecurity()) == "User:ANONYMOUS"
    client = OidcClient("https://idp.example/token", "vigil-worker", "secret")
    tokens = KafkaSecurity("SASL_SSL", "OAUTHBEARER", oidc=client)
    assert principal_of(tokens) == "User:<the sub of client vigil-worker's tokens>"


def test_a_grant_names_what_it_permits() -> None:
    group = Grant("User:w", AclOperation.READ, ResourceType.GROUP, "vigil-worker", prefixed=True)
    assert group.permits() == "READ group vigil-worker*"
    assert str(group) == "User:w may READ group vigil-worker*"


def _described(**answers: object) -> dict[str, Future[Any]]:
    futures: dict[str, Future[Any]] = {}
    for name, answer in answers.items():
        future: Future[Any] = Future()
        if isinstance(answer, KafkaError):
            future.set_exception(KafkaException(answer))
        else:
            future.set_result(SimpleNamespace(authorized_operations=answer))
        futures[name] = future
    return futures


def test_what_the_cluster_did_not_describe_is_not_said_and_a_refusal_allows_nothing() -> None:
    """A group whose coordinator is not ready (NOT_COORDINATOR on a new cluster) is left out,
    rather than ending the whole question, which let a worker short of an ACL start."""
    said = _operations(ResourceType.TOPIC, _described(
        raw=[AclOperation.READ], dlq=KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED),
        new=KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART), old=None,
    ))  # fmt: skip
    topic = ResourceType.TOPIC
    assert said == {
        (topic, "raw"): frozenset({AclOperation.READ}),
        (topic, "dlq"): frozenset(),
        (topic, "old"): None,  # a broker older than 2.3 does not say
    }
    group = _operations(ResourceType.GROUP, _described(g=KafkaError(KafkaError.NOT_COORDINATOR)))
    assert group == {}
