"""``vigil send``: JSON events from a file or stdin published to the real broker's raw topic, as
the SDK publishes them; a line that is not an event is named and not sent."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from connectors.sdk import Emitter
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.conftest import EXAMPLES
from tests.integration.conftest import events_on, topic_takes, vigil

pytestmark = pytest.mark.integration


def _raw_ids(settings: Settings, expected: int) -> list[str]:
    """The event ids on the raw topic, once ``expected`` of them came (or after 30 s)."""
    events = events_on(settings.bootstrap, settings.topics.raw,
                       lambda seen: len(seen) >= expected, timeout=30)  # fmt: skip
    return [event.event_id for event in events]


def test_send_publishes_each_event_and_names_each_line_that_is_not_one(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env(vigil_env)
    ensure_topics(settings)
    events = [json.loads(path.read_text()) for path in EXAMPLES[:3]]
    not_an_event = {**events[0], "kind": "telepathy"}
    lines = [json.dumps(events[0]), '{"event_id": "cut', json.dumps(events[1]),
             json.dumps(not_an_event), "", json.dumps(events[2])]  # fmt: skip
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(lines) + "\n")

    done = vigil(vigil_env, "send", str(source))
    assert done.returncode == 1, done.stderr
    said = done.stderr.splitlines()
    assert said[0].startswith("line 2: bad_json: ")
    assert said[1].startswith("line 4: ") and "telepathy" in said[1]
    assert said[-1] == (
        f"3 sent to {settings.topics.raw} at {settings.bootstrap}, 3 delivered, 2 rejected "
        f"({said[-1].split('(')[1]}"
    )
    assert "bad_json=1" in said[-1]
    assert sorted(_raw_ids(settings, 3)) == sorted(e["event_id"] for e in events)

    # stdin, every line an event: exit 0, saying how far it got as it goes
    more = [json.dumps({**events[0], "event_id": f"stdin-{i}"}) for i in range(3)]
    env = {**vigil_env, "VIGIL_PROGRESS_SECONDS": "0.001"}
    again = vigil(env, "send", stdin="\n".join(more) + "\n")
    assert again.returncode == 0, again.stderr
    assert "vigil send: 1 sent, " in again.stderr  # the first said at once
    assert "3 sent to " in again.stderr and "3 delivered, 0 rejected (none)" in again.stderr
    assert {"stdin-0", "stdin-1", "stdin-2"} <= set(_raw_ids(settings, 6))


def test_send_batches_no_more_than_the_raw_topic_takes(
    vigil_env: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # librdkafka packs messages into record batches of up to 1,000,000 bytes, and the topic's
    # max.message.bytes holds a whole batch: events each within it were refused together
    settings = Settings.from_env(vigil_env)
    topic_takes(settings, settings.topics.raw, 300_000)
    rng = random.Random(5)
    event = json.loads(EXAMPLES[0].read_text())
    lines = [
        json.dumps({**event, "event_id": f"large-{i}", "attributes": {"note": "".join(
            rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(140_000))}})
        for i in range(6)
    ]  # fmt: skip
    source = tmp_path / "large.jsonl"
    source.write_text("\n".join(lines) + "\n")
    done = vigil(vigil_env, "send", str(source))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 delivered, 0 rejected" in done.stderr
    assert sorted(_raw_ids(settings, 6)) == [f"large-{i}" for i in range(6)]
    # an agent's emitter does not ask the topic: the batch refused is made smaller until the
    # topic takes it (a message refused alone goes for the DLQ: test_bad_input)
    bare = Emitter(settings.bootstrap, settings.topics.raw)
    with caplog.at_level(logging.WARNING, logger="vigil.producer"):
        for i, line in enumerate(lines):
            bare.emit({**json.loads(line), "event_id": f"again-{i}"})
        assert bare.flush(60) == 0
    assert (bare.delivered, bare.failed) == (6, 0)
    assert f"{settings.topics.raw} refused a record batch as too large" in caplog.text
    assert int(bare._kafka._config["batch.size"]) < 300_000
    assert {f"again-{i}" for i in range(6)} <= set(_raw_ids(settings, 12))
    bare.close()
