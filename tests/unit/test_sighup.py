"""SIGHUP: the gateway's before its event loop runs, kept, not the end of the process, and the
policy read again once the loop takes the signal over; the worker's, which says whether the
policy it read at start has changed since."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web

from pipeline import cli
from pipeline.cli import hangups_kept
from pipeline.config import Config
from pipeline.gateway import Gateway, _read_again_at_sighup
from pipeline.worker import HangupSaid


@pytest.fixture
def hangup_restored() -> Iterator[None]:
    before = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, before)


class _Reloaded:
    """A gateway's ``reload``, keeping what it was given."""

    def __init__(self) -> None:
        self.configs: list[Config] = []

    def reload(self, config: Config) -> None:
        self.configs.append(config)


def test_a_sighup_during_start_is_kept_and_read_once_the_loop_runs(
    hangup_restored: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "vigil.yaml"
    policy.write_text("tenants:\n  acme: {disabled: true}\n")
    kept = hangups_kept()
    os.kill(os.getpid(), signal.SIGHUP)  # by default, the end of this process
    assert kept == [signal.SIGHUP]
    gateway = _Reloaded()

    async def start() -> None:
        await _read_again_at_sighup(cast(Gateway, gateway), policy, kept)(web.Application())
        for _ in range(100):
            if gateway.configs:
                break
            await asyncio.sleep(0.05)
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    asyncio.run(start())
    assert [config.disabled_tenants for config in gateway.configs] == [{"acme"}]
    assert f"vigil gateway read {policy} again: 0 tenant(s) with keys" in capsys.readouterr().out


def test_vigil_gateway_keeps_a_sighup_from_before_it_imports_or_reads_its_policy(
    hangup_restored: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vigil gateway` took SIGHUP over only once it was running, after its imports and its
    policy (seconds, at times): a reloader's SIGHUP meanwhile ended it. main keeps one from
    before the command runs, and the command hands what it kept to the gateway."""
    handed: list[list[int]] = []

    def gateway(args: argparse.Namespace, _settings: object) -> int:
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)  # else: the end
        os.kill(os.getpid(), signal.SIGHUP)
        handed.append(list(args.hangups))
        return 0

    monkeypatch.setattr(cli, "cmd_gateway", gateway)
    assert cli.main(["gateway", "--no-grpc"]) == 0
    assert handed == [[signal.SIGHUP]]


def test_without_a_sighup_during_start_nothing_is_read_again(
    hangup_restored: None, tmp_path: Path
) -> None:
    gateway = _Reloaded()

    async def start() -> None:
        policy = tmp_path / "vigil.yaml"
        install = _read_again_at_sighup(cast(Gateway, gateway), policy, hangups_kept())
        await install(web.Application())
        await asyncio.sleep(0.3)
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    asyncio.run(start())
    assert gateway.configs == []


def test_the_worker_says_whether_its_policy_changed_since_it_read_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = tmp_path / "vigil.yaml"
    policy.write_text("tenants: {}\n")
    said = HangupSaid(policy)
    with caplog.at_level(logging.WARNING, "vigil.worker"):
        said(signal.SIGHUP, None)
        policy.write_text("tenants: {acme: {disabled: true}}\n")
        said(signal.SIGHUP, None)
        HangupSaid(None)(signal.SIGHUP, None)
    start = "SIGHUP: the worker reads vigil.yaml only at start; "
    assert [r.getMessage() for r in caplog.records] == [
        f"{start}{policy} is as it was read at start",
        f"{start}{policy} has changed since it was read at start: restart the worker to apply "
        "it (SIGTERM stops it cleanly)",
        f"{start}there is no policy file (VIGIL_CONFIG)",
    ]
