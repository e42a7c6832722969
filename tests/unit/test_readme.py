"""README.md names every command of the CLI and every setting Vigil reads from the
environment: one added without its line there fails here."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from pipeline.cli import build_parser
from pipeline.settings import Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def _commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}"
                yield from _commands(sub, f"{prefix} {name}")


class _Reading(dict[str, str]):
    """An empty environment that notes every name read of it."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def test_every_command_is_in_the_readme() -> None:
    commands = list(_commands(build_parser(), "vigil"))
    assert len(commands) > 30  # the walk found the tree, not nothing
    assert [c for c in commands if f"`{c}" not in README] == []


def test_every_setting_read_from_the_environment_is_in_the_readme() -> None:
    env = _Reading()
    Settings.from_env(env)
    names = {name for name in env.read if name.startswith("VIGIL_")}
    assert len(names) > 40

    def documented(name: str) -> bool:
        if f"`{name}`" in README:
            return True
        # a secret's file: README gives it as "`NAME` (or `_FILE`)", or by its whole name
        base = name.removesuffix("_FILE")
        return name != base and f"`{base}` (or `_FILE`)" in README

    assert sorted(name for name in names if not documented(name)) == []
