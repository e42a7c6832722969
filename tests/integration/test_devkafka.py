"""The local broker says why it did not start."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pipeline.devkafka import BrokerError, LocalKafka, fetch_jars
from pipeline.services import free_port
from pipeline.settings import Settings

pytestmark = pytest.mark.integration


def test_a_broker_that_cannot_bind_its_controller_port_names_the_port(tmp_path: Path) -> None:
    port = free_port(2)
    broker = LocalKafka(tmp_path / "kafka", fetch_jars(Settings.from_env({}).cache_dir), port)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port + 1))
        squatter.listen()
        with pytest.raises(BrokerError) as failed:
            broker.start(timeout=60)
    assert f"127.0.0.1:{port + 1}" in str(failed.value)
    assert "Address already in use" in str(failed.value)
    assert broker.pid() is None


def test_a_home_whose_path_is_not_ascii_keeps_the_brokers_data(tmp_path: Path) -> None:
    """server.properties is read as ISO-8859-1: a data directory under /tmp/józef was taken as
    /tmp/jÃ³zef, made beside the home (or not made, where its parent is not writable)."""
    home = tmp_path / "józef vigil" / "kafka"
    broker = LocalKafka(home, fetch_jars(Settings.from_env({}).cache_dir), free_port(2))
    broker.start(timeout=60)  # waits until it takes produce requests
    try:
        assert (home / "data" / "meta.properties").is_file()
        assert [path.name for path in tmp_path.iterdir()] == ["józef vigil"]
    finally:
        assert broker.stop()
