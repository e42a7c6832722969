"""Compiled Hyperscan databases kept between processes (``pipeline.hscache``): loaded when the
same patterns were compiled before, compiled again when what was kept cannot be trusted."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hyperscan
import pytest

from pipeline import hscache
from pipeline.detectors import DETECTORS, Prefilter
from tests.conftest import ROOT

EXPRESSIONS = [rb"\d{3}-\d{4}", rb"secret-[a-z]+"]
FLAGS = [hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_UTF8 | hyperscan.HS_FLAG_UCP] * 2
MODE = hyperscan.HS_MODE_BLOCK


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    hscache.keep_in(tmp_path / "hyperscan")
    try:
        yield tmp_path / "hyperscan"
    finally:
        hscache.keep_in(None)


def _matches(db: object, text: bytes) -> list[int]:
    """Which expressions match in ``text``, scanned as ``Prefilter`` scans: with a scratch of
    its own (a loaded database has none; scanned without, Hyperscan says "invalid")."""
    found: list[int] = []
    scratch = hyperscan.Scratch(db)
    db.scan(text, lambda index, *_: found.append(index), 0, None, scratch)  # type: ignore[attr-defined]
    return sorted(found)


class _NoCompiling:
    """``hyperscan.Database`` while a test says nothing may be compiled."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("compiled, where a kept database was expected to be loaded")


def test_patterns_compiled_once_are_loaded_after(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = hscache.compiled(EXPRESSIONS, FLAGS, MODE)
    [kept] = folder.glob("*.hsdb")
    monkeypatch.setattr(hyperscan, "Database", _NoCompiling)
    again = hscache.compiled(EXPRESSIONS, FLAGS, MODE)
    text = b"call 555-1234 about secret-plans"
    assert _matches(again, text) == _matches(first, text) == [0, 1]
    assert _matches(again, b"nothing here") == []
    assert list(folder.glob("*.hsdb")) == [kept]


def test_other_patterns_or_flags_are_kept_apart(folder: Path) -> None:
    hscache.compiled(EXPRESSIONS, FLAGS, MODE)
    hscache.compiled(EXPRESSIONS[:1], FLAGS[:1], MODE)
    caseless = [FLAGS[0], FLAGS[1] | hyperscan.HS_FLAG_CASELESS]
    db = hscache.compiled(EXPRESSIONS, caseless, MODE)
    assert len(list(folder.glob("*.hsdb"))) == 3
    assert _matches(db, b"SECRET-PLANS") == [1]


@pytest.mark.parametrize("damage", ["flipped", "truncated", "empty"])
def test_a_kept_database_that_is_damaged_is_compiled_again(folder: Path, damage: str) -> None:
    hscache.compiled(EXPRESSIONS, FLAGS, MODE)
    [kept] = folder.glob("*.hsdb")
    whole = kept.read_bytes()
    if damage == "flipped":
        middle = len(whole) // 2
        kept.write_bytes(whole[:middle] + bytes([whole[middle] ^ 0xFF]) + whole[middle + 1 :])
    else:
        kept.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"")
    db = hscache.compiled(EXPRESSIONS, FLAGS, MODE)
    assert _matches(db, b"555-1234 secret-x") == [0, 1]
    assert kept.read_bytes() == whole  # replaced by what was compiled again


def test_a_database_of_another_version_is_compiled_again(folder: Path) -> None:
    """Hyperscan refuses a database another version or platform made: compiled, not raised."""
    hscache.compiled(EXPRESSIONS, FLAGS, MODE)
    [kept] = folder.glob("*.hsdb")
    whole = kept.read_bytes()
    blob = bytearray(whole)
    blob[4] ^= 0xFF  # the serialized database's version field
    kept.write_bytes(bytes(blob))
    with pytest.raises(hyperscan.error):
        hyperscan.loadb(bytes(blob), MODE)
    assert _matches(hscache.compiled(EXPRESSIONS, FLAGS, MODE), b"555-1234") == [0]
    assert kept.read_bytes() == whole


def _plant(kept: Path) -> None:
    """Put in ``kept``'s place a database of other patterns: one that finds neither."""
    other = hyperscan.Database(mode=MODE)
    other.compile(expressions=[rb"zzz-never"], ids=[0], elements=1, flags=FLAGS[:1])
    kept.write_bytes(hyperscan.dumpb(other))


@pytest.mark.parametrize("opened", ["folder for all", "folder for group", "file for all", "owner"])
def test_a_database_others_could_have_written_is_not_loaded(
    folder: Path, opened: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Hyperscan checks a database is whole, not what it was compiled from: one planted in the
    folder is loaded while only this user could have written it (it finds nothing in a text
    with both), and refused once the folder or the file is open to others or another user owns
    it; nothing is kept there then either, and the warning is said once."""
    hscache.compiled(EXPRESSIONS, FLAGS, MODE)
    assert folder.stat().st_mode & 0o777 == 0o700  # made for this user alone
    [kept] = folder.glob("*.hsdb")
    _plant(kept)
    planted = kept.read_bytes()
    assert _matches(hscache.compiled(EXPRESSIONS, FLAGS, MODE), b"555-1234 secret-x") == []
    if opened == "owner":
        monkeypatch.setattr(os, "geteuid", lambda: os.stat(kept).st_uid + 1)
    else:
        target = kept if opened.startswith("file") else folder
        target.chmod(0o775 if opened.endswith("group") else 0o777)
    for _ in range(2):
        assert _matches(hscache.compiled(EXPRESSIONS, FLAGS, MODE), b"555-1234 secret-x") == [0, 1]
    assert kept.read_bytes() == planted  # nor kept there
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]  # once a folder
    assert str(folder) in warning.getMessage() and "not loaded" in warning.getMessage()


def test_a_folder_that_cannot_be_written_costs_only_the_compiling(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    hscache.keep_in(blocked / "hyperscan")
    try:
        assert _matches(hscache.compiled(EXPRESSIONS, FLAGS, MODE), b"secret-x") == [1]
    finally:
        hscache.keep_in(None)
    assert blocked.read_text() == "not a folder"


def test_nothing_is_kept_until_a_folder_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no CLI command has run: an integration test's in-process ``main`` names the user's
    cache for the rest of its test run, so the folder is put back to none here."""
    monkeypatch.setattr(hscache, "_dir", None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    monkeypatch.setenv("VIGIL_CACHE", str(tmp_path / "cache"))
    hscache.compiled(EXPRESSIONS, FLAGS, MODE)
    assert list(tmp_path.rglob("*")) == []


def test_the_folder_keeps_the_latest_written(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """And what a writer killed while writing left there, once it is an hour old."""
    folder.mkdir()
    (folder / ".partial-killed").write_bytes(b"half a database")
    os.utime(folder / ".partial-killed", (0, 0))
    (folder / ".partial-writing").write_bytes(b"being written now")
    monkeypatch.setattr(hscache, "KEPT", 2)
    for n in range(1, 4):
        hscache.compiled(EXPRESSIONS[:1] * n, FLAGS[:1] * n, MODE)
        [written] = sorted(folder.glob("*.hsdb"), key=lambda p: p.stat().st_mtime_ns)[-1:]
        os.utime(written, ns=(n * 10**9, n * 10**9))  # the order they were written in
    kept = {path.stat().st_mtime_ns // 10**9 for path in folder.glob("*.hsdb")}
    assert kept == {2, 3}
    assert [path.name for path in folder.glob(".partial-*")] == [".partial-writing"]


def test_the_built_in_prefilter_loaded_finds_what_it_found_compiled(folder: Path) -> None:
    text = "mail jane.doe@example.com, card 4111 1111 1111 1111, key AKIAIOSFODNN7EXAMPLE"
    compiled = Prefilter(DETECTORS).starts(text)
    assert len(list(folder.glob("*.hsdb"))) == 1
    assert Prefilter(DETECTORS).starts(text) == compiled and len(compiled) >= 3


def test_the_cli_keeps_them_in_vigil_cache(tmp_path: Path) -> None:
    env = {**os.environ, "VIGIL_CACHE": str(tmp_path / "cache"), "VIGIL_HOME": str(tmp_path)}
    env.pop("VIGIL_CONFIG", None)
    outputs = []
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "redact"], input='{"t": "jane@example.com"}\n',
            capture_output=True, text=True, cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
            timeout=120, check=True,
        )  # fmt: skip
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1] == '{"t": "[EMAIL]"}\n'
    assert len(list((tmp_path / "cache" / "hyperscan").glob("*.hsdb"))) == 1
