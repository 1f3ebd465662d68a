"""Hostile messages against a real agent process: each ends in exactly one answer, nothing behind
it stalls, and the agent's memory stays flat (CONTRACT 5.3).

Mosquitto runs with `max_inflight_messages 1`: it sends the agent one QoS 1 message at a time, so
a single message left without its acknowledgement would stop everything after it. A second
phase forces the agent's intake queue full, so hostile messages are refused on paho's network
thread, where an exception would end the connection's thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.device_agents.test_protocol_fuzz import CRAFTED
from tests.support.agent import ROOT, AgentProcess, Peer, wait_for_status, write_config
from tests.support.embedded import EmbeddedBrokerProcess
from tests.support.mosquitto import Mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HOSTILE_REQUESTS: list[tuple[str, bytes]] = [
    ("ping", b"[" * 5000 + b"]" * 5000),
    ("ping", b"\xff\xfe not json"),
    ("ping", b'{"transaction": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
    ("ping", json.dumps({"transaction": {"nested": True}}).encode()),
    ("rollback", json.dumps({"transaction": "r1", "model": "x/#"}).encode()),
    ("deploy", json.dumps({"transaction": "d1", "deployment": "d1", "name": "x/#",
                           "version": "1", "manifest": "!!", "chunks": []}).encode()),
    ("deploy", json.dumps({"transaction": "d2", "deployment": "d2", "name": "a\u0007b",
                           "version": "1", "manifest": "!!", "chunks": []}).encode()),
    ("deploy", json.dumps({"transaction": "d3", "deployment": "d3", "name": "digits",
                           "version": "../../etc", "manifest": "!!", "chunks": []}).encode()),
    ("deploy", json.dumps({"transaction": "d4", "deployment": "d4", "name": "digits",
                           "version": "9", "manifest": "!!",
                           "chunks": [["0" * 64, 2**70]]}).encode()),
    ("nosuchcommand", b"{}"),
]


@pytest.fixture(params=["mosquitto", "amqtt"])
def poison_broker(request: pytest.FixtureRequest, tmp_path: Path
                  ) -> Iterator[Mosquitto | EmbeddedBrokerProcess]:
    """A broker of this test's own: Mosquitto holding one QoS 1 message in flight per client."""
    if request.param == "mosquitto":
        broker: Mosquitto | EmbeddedBrokerProcess = Mosquitto(
            tmp_path / "mosquitto", listener_options="max_inflight_messages 1\n")
    else:
        broker = EmbeddedBrokerProcess(tmp_path / "amqtt")
    broker.start()
    yield broker
    broker.stop()


def _rss(agent: AgentProcess) -> int:
    assert agent.proc is not None
    for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _next(peer: Peer, suffixes: tuple[str, ...], timeout: float = 20) -> tuple[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        topic, payload, _ = peer.messages.get(timeout=max(0.01, deadline - time.monotonic()))
        if topic.endswith(suffixes):
            return topic, json.loads(payload)


def _start(tmp: Path, broker: Any, package: Path, keys: list[Path], extra: str = ""
           ) -> tuple[str, Peer, AgentProcess]:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp / f"{device}.toml", device_id=device, broker_url=broker.url,
                          data_dir=tmp / device, package=package, keys=keys, extra=extra)
    watcher = Peer(broker, device)
    agent = AgentProcess(config).start()
    wait_for_status(watcher, "online")
    return device, watcher, agent


def test_every_hostile_message_ends_in_one_error_and_nothing_behind_it_stalls(
        tmp_path: Path, poison_broker: Any, signed_digits_package: Any, keys_dir: Path,
        digits_samples: Any) -> None:
    device, watcher, agent = _start(tmp_path, poison_broker, signed_digits_package.path,
                                    [keys_dir / "fleet.pub"])
    image, label = digits_samples(1)[0]
    good = json.dumps({"id": "warm", "data": image}).encode()
    try:
        watcher.send("cam", good)
        assert _next(watcher, ("/out/cam",))[1]["id"] == "warm"
        rss_start = _rss(agent)
        deploys_at = time.monotonic()
        requests = HOSTILE_REQUESTS
        for command, payload in requests:  # each: one error response, then the next is served
            watcher.client.publish(f"{ROOT}/{device}/request/{command}", payload, qos=1)
            topic, doc = _next(watcher, ("/response/" + command,))
            assert doc["status"] == "error", (command, payload[:60], doc)
            assert doc["error"]
            watcher.send("cam", {"id": f"after-{command}", "data": image})
            started = time.monotonic()
            assert _next(watcher, ("/out/cam",))[1]["id"] == f"after-{command}"
            assert time.monotonic() - started < 5
        oversize = b'{"id": "big", "data": [' + b"1.0," * 600_000 + b"1.0]}"  # 2.4 MB
        corpus = [*CRAFTED, b"x" * 70_000]
        for rounds in range(3):  # repeated: memory must stay flat, not just survive once
            for i, payload in enumerate(corpus):
                watcher.send("cam", payload)
                topic, doc = _next(watcher, ("/error", "/out/cam"))
                assert topic.endswith("/error"), (i, payload[:80], doc)
                assert doc["code"] in {"bad_payload", "bad_input"}, (i, doc)
                assert doc["message"]
                watcher.send("cam", {"id": f"good-{rounds}-{i}", "data": image})
                topic, doc = _next(watcher, ("/error", "/out/cam"))
                assert (topic.endswith("/out/cam"), doc["id"]) == (True, f"good-{rounds}-{i}"), doc
                assert doc["label"] == str(label)
            watcher.send("cam", oversize)  # never reaches memory: the broker or the reader drops it
            watcher.send("cam", {"id": f"after-big-{rounds}", "data": image})
            topic, doc = _next(watcher, ("/error", "/out/cam"))
            if topic.endswith("/error"):  # a 3.1.1 broker delivers it: its head is answered
                assert (doc["code"], doc["id"]) == ("bad_payload", None), doc
                assert "over the" in doc["message"]
                topic, doc = _next(watcher, ("/error", "/out/cam"))
            assert doc["id"] == f"after-big-{rounds}", doc
        # more oversize messages than Mosquitto's default in-flight window (20): had the limit
        # been announced as the Maximum Packet Size, Mosquitto 2.0.11 would drop each but keep
        # it in flight, and the 21st would stop all delivery to the agent for good
        just_over = b'{"data": [' + b"1.0," * 270_000 + b"1.0]}"  # 1.08 MB
        for _ in range(21):
            watcher.send("cam", just_over)
        watcher.send("cam", {"id": "after-21", "data": image})
        # 21 errors and the good answer; in any order: the embedded broker sends each message
        # from a task of its own, so a small one may overtake the megabyte ones before it
        answers = [_next(watcher, ("/error", "/out/cam")) for _ in range(22)]
        errors = [doc for topic, doc in answers if topic.endswith("/error")]
        results = [doc for topic, doc in answers if topic.endswith("/out/cam")]
        assert [doc["code"] for doc in errors] == ["bad_payload"] * 21, errors
        assert [doc["id"] for doc in results] == ["after-21"], results
        rss_end = _rss(agent)
        assert rss_end - rss_start < 5 * 2**20, (rss_start, rss_end)

        # the agent stayed connected all along: no reconnect loop after the hostile deploys
        watcher.client.publish(f"{ROOT}/{device}/request/telemetry",
                               json.dumps({"transaction": "t"}), qos=1)
        tele = _next(watcher, ("/response/telemetry",))[1]["data"]
        assert tele["link"]["connects"] == 1, tele["link"]
        assert tele["faults"]["unacknowledged"] == 1  # the telemetry request itself, being answered
        time.sleep(max(0.0, 60 - (time.monotonic() - deploys_at)))
        watcher.client.publish(f"{ROOT}/{device}/request/ping", b'{"transaction": "p"}', qos=1)
        pong = _next(watcher, ("/response/ping",))[1]
        assert pong["status"] == "ok"
        watcher.client.publish(f"{ROOT}/{device}/request/telemetry",
                               json.dumps({"transaction": "t2"}), qos=1)
        assert _next(watcher, ("/response/telemetry",))[1]["data"]["link"]["connects"] == 1
    finally:
        assert agent.stop() == 0, agent.logs()[-3000:]
        watcher.close()
    # no outbox row was ever made for a topic a broker refuses
    db = sqlite3.connect(tmp_path / device / "outbox.db")
    topics = [t for (t,) in db.execute("SELECT topic FROM outbox")]
    counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
    db.close()
    assert not [t for t in topics if "#" in t or "+" in t or "\x07" in t]
    assert "dead_letter" not in counters
    assert "Traceback" not in agent.logs()


def test_hostile_messages_refused_on_the_network_thread_when_intake_is_full(
        tmp_path: Path, poison_broker: Any, signed_digits_package: Any, keys_dir: Path,
        digits_samples: Any) -> None:
    """A queue of one: most messages of a burst are refused as overloaded by paho's thread,
    which reads their id from whatever bytes they hold."""
    device, watcher, agent = _start(tmp_path, poison_broker, signed_digits_package.path,
                                    [keys_dir / "fleet.pub"], extra="max_queue = 1\n")
    image, _ = digits_samples(1)[0]
    try:
        sent = 0
        for _ in range(3):
            for payload in CRAFTED:
                watcher.send("cam", payload, qos=0)
                sent += 1
        for i in range(50):
            watcher.send("cam", {"id": i, "data": image}, qos=0)
            sent += 1
        answers: list[tuple[str, dict[str, Any]]] = []
        while len(answers) < sent:
            answers.append(_next(watcher, ("/error", "/out/cam"), timeout=30))
        assert all(t.endswith("/out/cam") or d["code"] in {"bad_payload", "bad_input", "overloaded"}
                   for t, d in answers)
        time.sleep(0.5)
        assert watcher.messages.empty() or all(
            not t.endswith(("/error", "/out/cam")) for t, _, _ in list(watcher.messages.queue))
        watcher.send("cam", {"id": "last", "data": image})  # QoS 1, after the storm: served
        assert _next(watcher, ("/out/cam",))[1]["id"] == "last"
        watcher.client.publish(f"{ROOT}/{device}/request/ping", b'{"transaction": "p"}', qos=1)
        assert _next(watcher, ("/response/ping",))[1]["status"] == "ok"
    finally:
        assert agent.stop() == 0, agent.logs()[-3000:]
        watcher.close()
    assert "Traceback" not in agent.logs()
