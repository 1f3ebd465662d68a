"""The fleet tools against hostile devices: retained statuses, results and responses that break
the contract (deep nesting, wrong types, bytes that are not UTF-8, topics naming no device) never
take `fleet status`, `fleet deploy --group`, `fleet call` or `fleet collect` down for everyone.
The bad device is reported, every other one is served as usual."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agents import protocol
from device_agents.config import BrokerConfig
from device_agents.fleet import client as fleet_client
from device_agents.fleet.client import FleetClient
from device_agents.fleet.collect import Collector
from device_agents.fleet.deploy import Outcome, apply_state, needs
from device_agents.fleet.results_db import NotAResultError, ResultStore, result_row
from device_agents.fleet.status import FleetView
from device_agents.transport import Message
from edgefleet.cli import cli
from runtime.package import Package
from tests.device_agents.conftest import Bench
from tests.support.agent import ROOT, Peer

DEEP = b"[" * 3000 + b"]" * 3000
SHA = "0" * 64


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def deep_inside(doc: dict[str, Any], key: str) -> bytes:
    """`doc` with a 3000-deep array under `key` (where a parser may skip it unread)."""
    return json.dumps({**doc, key: "HOLE"}).encode().replace(b'"HOLE"', DEEP)


class Retained:
    """Retained messages put on the broker by a plain paho client, cleared at the end (the
    broker is shared by the whole test session)."""

    def __init__(self, broker: Any) -> None:
        self.peer = Peer(broker, "unused", subscribe=[])
        self.topics: list[str] = []

    def put(self, topic: str, payload: bytes) -> None:
        self.peer.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
        self.topics.append(topic)

    def close(self) -> None:
        for topic in self.topics:
            self.peer.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
        self.peer.close()


@pytest.fixture
def retained(broker: Any) -> Iterator[Retained]:
    r = Retained(broker)
    yield r
    r.close()


def hostile_statuses(group: str) -> dict[str, bytes]:
    """Device id -> a retained status that breaks the contract (each claims `group` if it can)."""
    return {
        unique("bad-types"): b'{"state": "online", "epoch": "x", "groups": 5, "models": [1]}',
        unique("bad-epoch"): json.dumps({"state": "online", "epoch": "x", "groups": [group]}).encode(),
        unique("bad-deep"): DEEP,
        unique("bad-deep-field"): deep_inside({"state": "online", "epoch": 1, "groups": [group]},
                                              "extra"),
        unique("bad-utf8"): b'\xff\xfe{"state": "online", "epoch": 1}',
        unique("bad-string"): b'{"state": "online", "epoch": 1, "agent": "\xff", "groups": []}',
    }


BAD_TOPICS = [f"{ROOT}/a/b/status",  # two levels: no `+/status` subscription gets it
              f"{ROOT}/bad id/status",  # a device id no device may have
              f"{ROOT}/{'x' * 70}/status"]


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["fleet", *args])


# -- fleet status ------------------------------------------------------------------------------

def test_status_shows_good_devices_and_reports_hostile_ones(broker: Any, retained: Retained) -> None:
    good, gone = unique("good"), unique("gone")
    retained.put(protocol.Topics(good).status, protocol.birth(
        3, "edgefleet-agent/test", ["plant-a"], [{"name": "digits", "version": "1", "sha256": SHA}]))
    retained.put(protocol.Topics(gone).status, protocol.offline(7))
    bad = hostile_statuses("plant-a")
    for device, payload in bad.items():
        retained.put(protocol.Topics(device).status, payload)
    for topic in BAD_TOPICS:
        retained.put(topic, protocol.birth(1, "x", [], []))

    out = invoke("status", "--json", "--wait", "1", "--broker", broker.url)

    assert out.exit_code == 0, out.output
    rows = {r["device"]: r for r in json.loads(out.stdout)}
    assert rows[good]["state"] == "online"
    assert rows[good]["models"] == ["digits:1"]
    assert rows[good]["groups"] == ["plant-a"]
    assert rows[good]["epoch"] == 3
    assert rows[good]["error"] is None
    assert rows[gone]["state"] == "offline"
    assert rows[gone]["epoch"] == 7
    for device in bad:
        assert rows[device]["state"] == "invalid", rows[device]
        assert rows[device]["error"], rows[device]
        assert (rows[device]["groups"], rows[device]["models"]) == ([], [])
        assert f"warning: {device}: " in out.stderr
    assert "nested too deeply" in rows[next(d for d in bad if d.startswith("bad-deep-field"))]["error"]
    assert "`$.epoch`" in rows[next(d for d in bad if d.startswith("bad-types"))]["error"]
    assert "'edgefleet/v1/bad id/status'" in out.stderr
    assert "Traceback" not in out.output

    table = invoke("status", "--wait", "1", "--broker", broker.url)
    assert table.exit_code == 0, table.output
    assert good in table.stdout
    assert "invalid" in table.stdout


# -- fleet deploy --group ----------------------------------------------------------------------

def test_group_deploy_skips_hostile_statuses_and_deploys_the_rest(
        bench: Bench, retained: Retained, signed_digits_package: Package) -> None:
    group = unique("g")
    bench.config.write_text(bench.config.read_text().replace('groups = ["test"]',
                                                             f'groups = ["{group}"]'))
    bench.start_online()
    bad = hostile_statuses(group)
    for device, payload in bad.items():
        retained.put(protocol.Topics(device).status, payload)
    retained.put(f"{ROOT}/bad id/status", protocol.birth(1, "x", [group], []))

    # the agent serves this very version: a quick no-op, answered active and healthy
    out = invoke("deploy", str(signed_digits_package.path), "--group", group, "--json",
                 "--health-window", "1", "--timeout", "30", "--broker", bench.broker.url)

    assert out.exit_code == 0, out.output
    outcome = json.loads(out.stdout)
    assert [d["device"] for d in outcome["devices"]] == [bench.device_id]
    assert outcome["devices"][0]["phase"] == "active"
    assert outcome["devices"][0]["healthy"] is True
    skipped = {s["device"]: s["error"] for s in outcome["skipped"]}
    assert set(bad) <= set(skipped)
    assert all(skipped[d] for d in bad)
    assert f"warning: skipping {next(iter(bad))}: " in out.stderr
    assert "'edgefleet/v1/bad id/status'" in out.stderr
    assert "Traceback" not in out.output


# -- fleet call --------------------------------------------------------------------------------

class FakeDevice:
    """A paho client that answers every request with the payloads given, then a good response."""

    def __init__(self, broker: Any, device: str, garbage: list[bytes], final: bool = True) -> None:
        self.peer = Peer(broker, device, subscribe=[f"{ROOT}/{device}/request/+"])
        self.device, self.garbage, self.final = device, garbage, final
        self.thread = threading.Thread(target=self._answer, daemon=True)
        self.thread.start()

    def _answer(self) -> None:
        topic, payload, _ = self.peer.messages.get(timeout=30)
        transaction = json.loads(payload)["transaction"]
        answer_to = topic.replace("/request/", "/response/")
        for body in self.garbage:
            self.peer.client.publish(answer_to, body.replace(b"TX", transaction.encode()), qos=1)
        if self.final:
            self.peer.client.publish(answer_to, protocol.response(transaction, "ok",
                                                                  {"pong": True}), qos=1)

    def close(self) -> None:
        self.thread.join(10)
        self.peer.close()


def test_call_survives_hostile_responses(broker: Any) -> None:
    device = unique("fake")
    fake = FakeDevice(broker, device, [DEEP, b"\xff\xfe", b'{"transaction": "other", "status": 1}',
                                       b"[" * 100_000, b'{"transaction": ' + DEEP + b"}"])
    try:
        out = invoke("call", device, "ping", "--timeout", "10", "--broker", broker.url)
    finally:
        fake.close()
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["data"] == {"pong": True}
    assert "Traceback" not in out.output


def test_call_reports_a_response_that_breaks_the_contract_at_once(broker: Any) -> None:
    device = unique("fake")
    fake = FakeDevice(broker, device, [b'{"transaction": "TX", "status": "maybe"}'], final=False)
    started = time.monotonic()
    try:
        out = invoke("call", device, "ping", "--timeout", "20", "--broker", broker.url)
    finally:
        fake.close()
    assert out.exit_code == 2, out.output
    assert f"{device} answered ping with a response that breaks the contract" in out.stderr
    assert time.monotonic() - started < 10  # not at the timeout
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("args", [["call", "bad/id", "ping"], ["call", "dev", "x/#"],
                                  ["rollback", "--device", "a b", "--model", "m"]])
def test_names_that_make_no_topic_are_one_line_errors(broker: Any, args: list[str]) -> None:
    out = invoke(*args, "--broker", broker.url)
    assert out.exit_code == 2, out.output
    assert "does not match" in out.stderr
    assert "Traceback" not in out.output


# -- fleet collect -----------------------------------------------------------------------------

def good_result(seq: int) -> bytes:
    return json.dumps({"id": f"m{seq}", "stream": "cam", "seq": seq, "epoch": 1,
                       "model": {"name": "digits", "version": "1"}, "label": "3", "score": 0.9,
                       "latency_ms": {"total": 1.5}, "ts_in": 1.0, "ts_out": 2.0}).encode()


HOSTILE_RESULTS = [
    b'{"seq": 1, "epoch": 1, "id": ' + DEEP + b"}",
    deep_inside({"seq": 2, "epoch": 1, "stream": "cam"}, "outputs"),  # in a field it skips
    b'{"seq": 3, "epoch": 1, "label": "\xff"}',
    b"\xff" + good_result(4),
]


def collector(broker: Any, db: Path, device: str) -> Collector:
    return Collector(db, BrokerConfig(url=broker.url), devices=[device], name=unique("c"),
                     group=unique("g"), session_expiry_s=120)


def publish(peer: Peer, device: str, payloads: list[bytes]) -> None:
    infos = [peer.client.publish(f"{ROOT}/{device}/out/cam", p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(30)


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_collect_writer_survives_hostile_results(broker: Any, tmp_path: Path) -> None:
    db, device = tmp_path / "results.db", unique("dev")
    peer = Peer(broker, device, subscribe=[])
    with collector(broker, db, device) as c:
        for i, payload in enumerate(HOSTILE_RESULTS):  # one batch each: the next one is good
            publish(peer, device, [payload])
            publish(peer, device, [good_result(10 + i)])
            assert c.wait_for(i + 1, timeout=10), c.stats
        assert c._supervisor is not None
        assert c._supervisor.healthy()[0]
    peer.close()
    assert (c.stats.stored, c.stats.rejects) == (len(HOSTILE_RESULTS), len(HOSTILE_RESULTS))
    assert [r[0] for r in rows(db, "SELECT seq FROM results ORDER BY seq")] == [10, 11, 12, 13]
    reasons = [r[0] for r in rows(db, "SELECT reason FROM rejects")]
    assert len(reasons) == len(HOSTILE_RESULTS)
    assert "at `$.id`" in reasons[0]  # typed: the deep array is refused at its first bracket
    assert "nested too deeply" in reasons[1]
    assert all(r.startswith("not a result") for r in reasons)


def test_a_writer_that_fails_is_restarted_and_the_message_that_broke_it_rejected(
        broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real_write = ResultStore.write

    def write(self: ResultStore, messages: Any, received_at: float) -> Any:
        if any(b"poison" in payload for _, payload in messages):
            raise ZeroDivisionError("a bug in the writer")
        return real_write(self, messages, received_at)

    monkeypatch.setattr(ResultStore, "write", write)
    db, device = tmp_path / "results.db", unique("dev")
    peer = Peer(broker, device, subscribe=[])
    with caplog.at_level(logging.WARNING, "edgefleet"), collector(broker, db, device) as c:
        publish(peer, device, [good_result(1), b'{"poison": 1}', good_result(2)])
        publish(peer, device, [good_result(3)])
        assert c.wait_for(3, timeout=10), c.stats
        assert c.failure is None
    peer.close()
    assert [r[0] for r in rows(db, "SELECT seq FROM results ORDER BY seq")] == [1, 2, 3]
    assert rows(db, "SELECT reason, payload FROM rejects") == [
        ("collector error: ZeroDivisionError: a bug in the writer", b'{"poison": 1}')]
    failed = [r for r in caplog.records if "worker collect-writer failed" in r.getMessage()]
    assert failed
    assert failed[0].exc_info is not None
    assert "restarting worker collect-writer" in caplog.text


def test_a_writer_that_keeps_failing_ends_the_collector(broker: Any, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise ZeroDivisionError("the writer is broken")

    monkeypatch.setattr(ResultStore, "write", broken)
    monkeypatch.setattr(ResultStore, "reject", broken)
    db, device = tmp_path / "results.db", unique("dev")
    peer = Peer(broker, device, subscribe=[])
    c = collector(broker, db, device).start()
    try:
        publish(peer, device, [good_result(1)])
        deadline = time.monotonic() + 15
        while c.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.failure is not None
        assert "collect-writer" in c.failure
        assert not c.wait_for(1, timeout=0.1)
    finally:
        c.stop()
        peer.close()
    assert rows(db, "SELECT count(*) FROM results") == [(0,)]


@pytest.mark.mosquitto_only(reason="the embedded broker keeps nothing for a client that is away")
def test_collect_command_exits_70_when_its_writer_keeps_failing(
        broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db, device, name = tmp_path / "results.db", unique("dev"), unique("cli")
    common = ["collect", "--db", str(db), "--broker", broker.url, "--device", device, "--name", name]
    assert invoke(*common, "--duration", "0.5").exit_code == 0  # the session the result waits in
    peer = Peer(broker, device, subscribe=[])
    publish(peer, device, [good_result(1)])
    peer.close()

    def broken(*args: Any) -> Any:
        raise ZeroDivisionError("the writer is broken")

    monkeypatch.setattr(ResultStore, "write", broken)
    monkeypatch.setattr(ResultStore, "reject", broken)
    started = time.monotonic()
    out = invoke(*common, "--duration", "30")
    assert out.exit_code == 70, out.output
    assert time.monotonic() - started < 20  # it did not run on with a dead writer
    assert "error: the collector stopped: worker 'collect-writer' failed" in out.stderr
    assert "ZeroDivisionError: the writer is broken" in out.stderr  # the traceback, on stderr


# -- the client's callbacks --------------------------------------------------------------------

def offline_client() -> FleetClient:
    """A FleetClient never connected: its handlers are called by hand."""
    return FleetClient(BrokerConfig(url="mqtt://127.0.0.1:9", session_expiry_s=0), "test")


def message(topic: str, payload: bytes) -> Message:
    return Message(topic, payload, 1, 1, 0)


def test_a_listener_that_raises_is_logged_and_the_client_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    client = offline_client()
    seen: list[str] = []

    def boom(where: protocol.DeviceTopic, payload: bytes) -> None:
        raise KeyError("a bug in a listener")

    client.listen(fleet_client.ALL_STATUS, "status", boom)
    client.listen(fleet_client.ALL_STATUS, "status", lambda where, _: seen.append(where.device))
    with caplog.at_level(logging.ERROR):
        client._on_message(message(protocol.Topics("a").status, b"{}"))
        client._on_message(message(protocol.Topics("b").status, DEEP))
    assert seen == ["a", "b"]
    assert client.callback_errors() == {"status listener": 2}
    assert all(r.exc_info is not None for r in caplog.records if "listener" in r.getMessage())


def test_fleet_filters_match_the_topics_protocol_builds() -> None:
    topics = protocol.Topics("edge-001")
    assert mqtt.topic_matches_sub(fleet_client.ALL_STATUS, topics.status)
    assert mqtt.topic_matches_sub(fleet_client.ALL_TELEMETRY, topics.telemetry)
    assert mqtt.topic_matches_sub(fleet_client.ALL_RESULTS, topics.output("cam"))
    assert mqtt.topic_matches_sub(fleet_client.device_results("edge-001"), topics.output("cam"))
    assert not mqtt.topic_matches_sub(fleet_client.device_results("edge-001"),
                                      protocol.Topics("edge-002").output("cam"))
    assert not mqtt.topic_matches_sub(fleet_client.ALL_STATUS, topics.telemetry)


# -- properties: whatever the bytes, the handlers never raise ----------------------------------

names = st.one_of(st.sampled_from(["edge-1", "digits", "cam", "", "a b", "x" * 70, "+", "#",
                                   "\ud800", "é", "a/b"]), st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([2**64, -(2**63) - 1]),
                    st.floats(allow_nan=False, allow_infinity=False), names)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(names, inner, max_size=4)), max_leaves=12)
FIELDS = ["state", "epoch", "agent", "groups", "models", "ts", "uptime_s", "outbox", "inference",
          "seq", "id", "stream", "run", "model", "label", "score", "latency_ms", "ts_in", "ts_out",
          "deployment", "version", "phase", "progress", "error", "healthy", "transaction",
          "status", "data", "need", "need_bytes", "name", "sha256", "depth", "p50_ms"]
crafted = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8).map(
    lambda d: json.dumps(d).encode())
deep = st.integers(1, 5000).flatmap(lambda n: st.sampled_from([
    b"[" * n + b"]" * n, b'{"a":' * n + b"1" + b"}" * n,
    b'{"seq": 1, "epoch": 1, "state": "online", "x": ' + b"[" * n + b"]" * n + b"}"]))
payloads = st.one_of(st.binary(max_size=200), crafted, deep, json_values.map(
    lambda v: json.dumps(v).encode()), crafted.map(lambda b: b"\xff" + b))
topics = st.one_of(
    st.builds(lambda d, tail: f"{ROOT}/{d}/{tail}", names, st.sampled_from([
        "status", "telemetry", "out/cam", "out/", "response/ping", "model/digits/state", "a/status",
        "in/cam", "error", "event", "request/ping"])),
    st.text(max_size=40))
HYPOTHESIS = settings(max_examples=300, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYPOTHESIS
@given(messages=st.lists(st.tuples(topics, payloads), min_size=1, max_size=5))
def test_the_client_and_the_status_view_never_raise(messages: list[tuple[str, bytes]]) -> None:
    client = offline_client()
    view = FleetView(client)
    client.statuses(wait_s=0)  # the status scan deploy --group reads, fed as well
    for topic, payload in messages:
        client._on_message(message(topic, payload))  # raises nothing, or the test fails
    assert client.callback_errors() == {}  # and no listener raised behind the guard either
    rows = view.snapshot()
    json.dumps(rows)
    assert {r["state"] for r in rows} <= {"online", "offline", "invalid", "unknown"}
    assert all(r["error"] for r in rows if r["state"] == "invalid")
    view.problems()
    client.devices(wait_s=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResultStore]:
    s = ResultStore(tmp_path_factory.mktemp("hostile") / "results.db")
    yield s
    s.close()


@HYPOTHESIS
@given(messages=st.lists(st.tuples(topics, payloads), min_size=1, max_size=5))
def test_result_rows_raise_only_not_a_result(store: ResultStore, messages: list[tuple[str, bytes]]
                                             ) -> None:
    for topic, payload in messages:
        try:
            row = result_row(topic, payload, 1.0)
        except NotAResultError as exc:
            reason = str(exc)
            assert reason
        else:
            assert isinstance(row[0], str)
            assert isinstance(row[2], int)
            assert isinstance(row[3], int)
    outcome = store.write(messages, 1.0)  # one batch: no message can fail the others
    assert outcome.stored + outcome.duplicates + outcome.rejects == len(messages)


@HYPOTHESIS
@given(payload=payloads, data=json_values)
def test_deploy_handlers_never_raise(payload: bytes, data: Any) -> None:
    out = Outcome("edge-1")
    if apply_state(out, payload, "digits-1-abc", wait_healthy=True):
        assert out.phase in {"downloading", "verifying", "staged", "active", "failed",
                             "rolled_back"}
    chunks, need_bytes = needs(data, {})
    assert chunks == []
    assert need_bytes >= 0
