"""The publisher pump on its own (a fake connection, a real outbox): rows go out in order within
the window, and a row no broker will take is dead-lettered, counted and reported, not retried."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agents.outbox import Outbox
from device_agents.protocol import Topics
from device_agents.publisher import Publisher
from device_agents.transport import Message, PublishRefusedError


class FakeLink:
    """What the publisher asks of a transport: connected, and publish (refusing some topics)."""

    def __init__(self, refuse: str = "") -> None:
        self.connected = True
        self.sent: list[tuple[int, str, bytes, Any]] = []
        self.refuse = refuse

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: dict[str, Any] | None = None) -> int | None:
        if self.refuse and self.refuse in topic:
            raise PublishRefusedError(f"refused {topic}")
        self.sent.append((len(self.sent) + 1, topic, payload, properties))
        return len(self.sent)


def _settle(box: Outbox, publisher: Publisher, until: Any) -> None:
    deadline = time.monotonic() + 5
    while not until() and time.monotonic() < deadline:
        publisher.pump()
        time.sleep(0.02)


def test_a_row_refused_by_paho_is_dead_lettered_and_the_rows_behind_it_go(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    link = FakeLink(refuse="bad")
    publisher = Publisher(box, link, Topics("dev-1"))  # type: ignore[arg-type]
    for topic in ("t/1", "t/bad", "t/3"):
        box.put(topic, b"{}")
    assert box.flush(5)
    _settle(box, publisher, lambda: len(link.sent) >= 3)
    topics = [t for _, t, _, _ in link.sent]
    assert topics[:2] == ["t/1", "t/3"]  # the refused one held nothing back
    event = json.loads(next(p for _, t, p, _ in link.sent if t.endswith("/event")))
    assert (event["type"], event["topic"]) == ("dead_letter", "t/bad")
    assert publisher.dead_letters == 1
    assert box.stats().dropped_by == {"dead_letter": 1}
    box.close()


def test_a_puback_with_a_failure_reason_is_a_dead_letter(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    link = FakeLink()
    publisher = Publisher(box, link, Topics("dev-1"))  # type: ignore[arg-type]
    box.put("t/ok", b"{}")
    box.put("t/denied", b"{}", correlation=b"c-1")
    assert box.flush(5)
    _settle(box, publisher, lambda: len(link.sent) >= 2)
    assert link.sent[1][3] == {"CorrelationData": b"c-1"}  # a response's correlation goes along
    publisher.on_published(1)
    publisher.on_refused(2, "Not authorized")
    _settle(box, publisher, lambda: any(t.endswith("/event") for _, t, _, _ in link.sent))
    assert box.stats().dropped_by == {"dead_letter": 1}
    event = json.loads(next(p for _, t, p, _ in link.sent if t.endswith("/event")))
    assert "Not authorized" in event["reason"]
    box.close()


@dataclass
class Link:
    generation: int  # the connection now
    session_since: int  # the connection the broker's session began on


def test_a_message_is_stale_only_when_its_session_was_kept_on_a_newer_connection() -> None:
    def message(qos: int, generation: int, via: Any) -> Message:
        return Message("t", b"", qos, 1, generation, via=via)

    assert message(1, 1, Link(2, 0)).stale  # the broker delivers it again on connection 2
    assert message(1, 1, Link(2, 1)).stale
    assert not message(1, 1, Link(2, 2)).stale  # a new session: this copy is the only one
    assert not message(1, 1, Link(3, 2)).stale  # kept since 2, which never held it
    assert not message(1, 2, Link(2, 0)).stale
    assert not message(0, 1, Link(2, 0)).stale  # QoS 0 is never delivered again
    assert not message(1, 1, None).stale
