"""Who the ACL check says is missing a grant, and how a grant is named."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka.admin import AclOperation, ResourceType

from pipeline.acls import Grant, principal_of
from pipeline.kafkaconn import KafkaSecurity


def test_the_principal_is_the_sasl_user_or_said_to_come_from_the_certificate() -> None:
    sasl = KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", "vigil", "secret")
    assert principal_of(sasl) == "User:vigil"
    mutual = KafkaSecurity("SSL", cert_location=Path("c.pem"), key_location=Path("k.pem"))
    assert principal_of(mutual) == "User:<the principal of VIGIL_KAFKA_SSL_CERT_LOCATION>"
    assert principal_of(KafkaSecurity()) == "User:ANONYMOUS"


def test_a_grant_names_what_it_permits() -> None:
    group = Grant("User:w", AclOperation.READ, ResourceType.GROUP, "vigil-worker", prefixed=True)
    assert group.permits() == "READ group vigil-worker*"
    assert str(group) == "User:w may READ group vigil-worker*"
