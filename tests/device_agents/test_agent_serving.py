"""The agent serving real sensors through a real Mosquitto: results, encodings, bad input,
overload, requests, telemetry and shutdown."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agents.protocol import encode_tensor
from tests.device_agents.conftest import Bench
from tests.support.agent import ROOT, wait_for_status


def test_serves_digits_to_independent_mosquitto_clients(bench: Bench, digits_samples) -> None:  # type: ignore[no-untyped-def]
    watcher = bench.peer()
    bench.agent()
    online = wait_for_status(watcher, "online")
    assert online["epoch"] == 1
    assert online["models"][0]["name"] == "digits"
    samples = digits_samples(30)
    sub = subprocess.Popen(["mosquitto_sub", "-h", bench.broker.host, "-p", str(bench.broker.port),
                            "-q", "1", "-t", f"{ROOT}/{bench.device_id}/out/camera0", "-C", "30",
                            "-W", "60"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    for i, (image, _) in enumerate(samples):
        subprocess.run(["mosquitto_pub", "-h", bench.broker.host, "-p", str(bench.broker.port),
                        "-q", "1", "-t", f"{ROOT}/{bench.device_id}/in/camera0",
                        "-m", json.dumps({"id": f"img-{i}", "data": image})], check=True)
    out, _ = sub.communicate(timeout=90)
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == 30
    by_id = {r["id"]: r for r in results}
    assert set(by_id) == {f"img-{i}" for i in range(30)}
    correct = sum(by_id[f"img-{i}"]["label"] == str(label) for i, (_, label) in enumerate(samples))
    assert correct >= 24, f"only {correct}/30 right"
    first = results[0]
    assert first["stream"] == "camera0"
    assert first["epoch"] == 1
    assert first["model"] == {"name": "digits", "version": "1"}
    assert len(next(iter(first["outputs"].values()))) == 10
    assert len(first["top"]) == 3
    assert set(first["latency_ms"]) == {"queue", "inference", "total"}
    assert first["ts_out"] >= first["ts_in"]
    assert sorted(r["seq"] for r in results) == list(range(1, 31))


def test_b64_and_named_inputs(bench: Bench, digits_samples) -> None:  # type: ignore[no-untyped-def]
    watcher, _ = bench.start_online()
    image, label = digits_samples(1)[0]
    arr = np.asarray(image, dtype=np.float32)
    watcher.send("cam", {"id": "b64", "data": encode_tensor(arr)})
    watcher.send("cam", {"id": "named", "inputs": {"image": image}})
    watcher.send("cam", {"id": "batched", "data": [image, image]})
    results = {r["id"]: r for r in watcher.collect("/out/cam", 3)}
    assert results["b64"]["label"] == results["named"]["label"] == str(label)
    batched = next(iter(results["batched"]["outputs"].values()))
    assert np.asarray(batched).shape == (2, 10)


def test_bad_input_never_stops_the_agent(bench: Bench, digits_samples) -> None:  # type: ignore[no-untyped-def]
    bench.write(extra="max_payload_bytes = 65536\n")
    watcher, _ = bench.start_online()
    image, label = digits_samples(1)[0]
    nan = np.asarray(image, dtype=np.float32)
    nan[0, 0, 0] = np.nan
    bad: list[tuple[bytes | dict, str]] = [
        (b"{not json", "bad_payload"),
        (b"[1, 2, 3]", "bad_payload"),
        ({"id": "x"}, "bad_payload"),
        ({"data": [[1, 2], [3]]}, "bad_payload"),
        ({"data": [["a", "b"]]}, "bad_payload"),
        ({"data": {"dtype": "float32", "shape": [2], "b64": "!!"}}, "bad_payload"),
        ({"data": {"dtype": "complex64", "shape": [1], "b64": "AAAAAAAAAAA="}}, "bad_payload"),
        ({"data": {"dtype": "float32", "shape": [3], "b64": "AAAAAA=="}}, "bad_payload"),
        ({"data": [1.0, 2.0, 3.0]}, "bad_input"),
        ({"data": encode_tensor(nan)}, "bad_input"),
        (b'{"data": [[[1e400]]]}', "bad_payload"),  # out of float range
        ({"inputs": {"nope": image}}, "bad_input"),
        (b"x" * 70_000, "bad_payload"),
    ]
    for i, (payload, _) in enumerate(bad):
        doc = payload if isinstance(payload, bytes) else {**payload, "id": f"bad-{i}"}
        watcher.send("cam", doc)
    # unknown stream: this config routes every stream to digits, so use a second config below
    watcher.send("cam", {"id": "good", "data": image})
    errors = watcher.collect("/error", len(bad))
    codes = {e["id"]: e["code"] for e in errors}
    expected = {f"bad-{i}": code for i, (p, code) in enumerate(bad) if not isinstance(p, bytes)}
    assert {k: codes.get(k) for k in expected} == expected
    assert sorted(e["code"] for e in errors) == sorted(code for _, code in bad)
    assert all(e["message"] for e in errors)
    good = watcher.collect("/out/cam", 1)[0]
    assert good["id"] == "good"
    assert good["label"] == str(label)
    tele = watcher.collect("/telemetry", 1, timeout=10)[0]
    assert sum(tele["errors"].values()) == len(bad)
    assert tele["errors"]["bad_payload"] == sum(code == "bad_payload" for _, code in bad)


def test_unknown_stream_is_an_error(bench: Bench, digits_samples) -> None:  # type: ignore[no-untyped-def]
    bench.write(extra="")
    text = bench.config.read_text().replace(
        f'package = "{bench.package}"', f'package = "{bench.package}"\nstreams = ["camera0"]')
    bench.config.write_text(text)
    watcher, _ = bench.start_online()
    image, _ = digits_samples(1)[0]
    watcher.send("lidar", {"id": "u", "data": image})
    watcher.send("camera0", {"id": "k", "data": image})
    error = watcher.collect("/error", 1)[0]
    assert error["code"] == "unknown_stream"
    assert error["stream"] == "lidar"
    assert error["id"] == "u"
    assert watcher.collect("/out/camera0", 1)[0]["id"] == "k"


def test_overload_refuses_with_errors_never_silently(bench: Bench, digits_samples) -> None:  # type: ignore[no-untyped-def]
    bench.write(extra="max_queue = 2\n")
    watcher, _ = bench.start_online()
    image, _ = digits_samples(1)[0]
    payload = json.dumps({"data": image}).encode()
    n = 400
    for i in range(n):
        watcher.client.publish(f"{ROOT}/{bench.device_id}/in/cam",
                               payload.replace(b'{"data"', f'{{"id": {i}, "data"'.encode()), qos=0)
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 60
    while len(seen) < n and time.monotonic() < deadline:
        topic, body, _ = watcher.messages.get(timeout=30)
        doc = json.loads(body)
        if topic.endswith("/out/cam"):
            seen[doc["id"]] = "served"
        elif topic.endswith("/error"):
            assert doc["code"] == "overloaded", doc
            seen[doc["id"]] = "overloaded"
    assert len(seen) == n, f"{n - len(seen)} messages neither served nor refused"
    assert "overloaded" in seen.values()
    assert "served" in seen.values()


def test_requests(bench: Bench) -> None:
    watcher = bench.peer()
    bench.agent(env={"SECRET_SHOULD_NOT_SHOW": "x"})
    wait_for_status(watcher, "online")
    req = f"{ROOT}/{bench.device_id}/request"

    def call(command: str, args: dict) -> dict:  # type: ignore[type-arg]
        watcher.client.publish(f"{req}/{command}", json.dumps({"transaction": command, **args}),
                               qos=1)
        return watcher.collect(f"/response/{command}", 1)[0]

    ping = call("ping", {})
    assert ping["status"] == "ok"
    assert ping["transaction"] == "ping"
    assert ping["data"]["epoch"] == 1
    models = call("models", {})["data"]
    assert models == [{"name": "digits", "active": "1", "previous": None, "serving": "1"}]
    config = call("config", {})["data"]
    assert config["device_id"] == bench.device_id
    tele = call("telemetry", {})["data"]
    assert {"ts", "uptime_s", "rss_bytes", "cpu_percent", "outbox", "inference"} <= set(tele)
    rollback = call("rollback", {"model": "digits"})
    assert rollback["status"] == "error"
    assert "no previous version" in rollback["error"]
    unknown = call("reboot-the-moon", {})
    assert unknown["status"] == "error"
    assert "unknown command" in unknown["error"]


@pytest.mark.mosquitto_only(reason="MQTT 5 response topics: the embedded broker speaks MQTT 3.1.1")
def test_requests_honour_the_mqtt5_response_topic(bench: Bench) -> None:
    watcher = bench.peer()
    bench.agent()
    wait_for_status(watcher, "online")
    req = f"{ROOT}/{bench.device_id}/request"
    reply_to = f"{ROOT}/{bench.device_id}/response/reply-{uuid.uuid4().hex[:8]}"
    watcher.client.subscribe(reply_to, qos=1)
    time.sleep(0.2)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = reply_to
    props.CorrelationData = b"corr-42"
    watcher.client.publish(f"{req}/ping", b"{}", qos=1, properties=props)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        topic, body, properties = watcher.messages.get(timeout=10)
        if topic == reply_to:
            assert json.loads(body)["status"] == "ok"
            assert properties.CorrelationData == b"corr-42"
            break
    else:
        raise AssertionError("no reply on the response topic")


def test_telemetry_fields(bench: Bench, digits_samples) -> None:  # type: ignore[no-untyped-def]
    watcher, _ = bench.start_online()
    for i, (image, _) in enumerate(digits_samples(5)):
        watcher.send("cam", {"id": i, "data": image})
    watcher.collect("/out/cam", 5)
    time.sleep(1.2)
    tele = watcher.collect("/telemetry", 1, timeout=10)[-1]
    assert tele["inference"]["count"] >= 5
    assert tele["inference"]["p50_ms"] > 0
    assert tele["rss_bytes"] > 10_000_000
    assert set(tele["outbox"]) >= {"depth", "bytes", "oldest_s", "dropped"}
    deadline = time.monotonic() + 10  # PUBACKed results leave the outbox, with no new traffic
    while tele["outbox"]["depth"] and time.monotonic() < deadline:
        tele = watcher.collect("/telemetry", 1, timeout=10)[-1]
    assert tele["outbox"]["depth"] == 0


@pytest.mark.mosquitto_only(reason="amqtt keeps no session for a client that went away: what "
                            "the stopped agent had not taken yet is dropped, not kept for its next start")
def test_sigterm_flushes_and_says_offline(bench: Bench, digits_samples) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM: what the agent accepted is answered before it says offline; what it had not
    yet taken stays with the broker and is answered at the next start. Nothing is lost."""
    watcher, agent = bench.start_online()
    for i, (image, _) in enumerate(digits_samples(50)):
        watcher.send("cam", {"id": i, "data": image})
    served: set[int] = {watcher.collect("/out/cam", 1)[0]["id"]}  # serving has started
    assert agent.stop() == 0, agent.logs()
    lines = agent.logs().splitlines()
    assert lines, "the agent logged nothing"
    assert all(json.loads(line)["level"] for line in lines)  # one JSON object per line
    offline = None
    while offline is None:  # everything published before the offline status, in order
        topic, payload, _ = watcher.messages.get(timeout=10)
        doc = json.loads(payload)
        if topic.endswith("/out/cam"):
            served.add(doc["id"])
        elif topic.endswith("/status") and doc["state"] == "offline":
            offline = doc
    assert offline["epoch"] == 1
    # retained: a newcomer sees the device offline
    out = subprocess.run(["mosquitto_sub", "-h", bench.broker.host, "-p", str(bench.broker.port),
                          "-t", f"{ROOT}/{bench.device_id}/status", "-C", "1", "-W", "5"],
                         capture_output=True, text=True, timeout=10)
    assert json.loads(out.stdout)["state"] == "offline"
    rest = set(range(50)) - served
    if rest:  # not taken before the stop: the next start answers them
        bench.agent()
        watcher.drain("/out/cam", rest, timeout=30)


def test_last_will_on_crash(bench: Bench) -> None:
    watcher, agent = bench.start_online()
    agent.stop(kill=True)
    # keepalive 5 s: the broker gives up after 1.5 x and publishes the will
    offline = wait_for_status(watcher, "offline", timeout=20)
    assert offline == {"state": "offline", "epoch": 1}

