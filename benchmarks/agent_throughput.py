"""How fast does the agent serve sensors over MQTT, and what does it cost in memory?

Side by side on loopback with one Mosquitto, QoS 1 everywhere, the same sensor payload:
1. the ceiling: a raw paho publisher -> broker -> paho subscriber;
2. the agent with the tiny digits model: sensor -> broker -> agent -> broker -> collector,
   sustained results/s (target >= 50% of the ceiling), then p50/p99 latency at half that rate
   (targets <= 5 ms and <= 25 ms), with the agent's RSS sampled all along (target <= 90 MB, and
   no growth);
3. the agent with a ~5 ms model vs a bare `session.run` loop on single samples (target >= 0.8x);
4. the outbox's enqueue rate into SQLite with group commit (target >= 5,000/s);
5. the same half rate with 1% hostile messages mixed in (deep nesting, shapes that overflow,
   broken JSON, wrong dtypes), run right after the clean one: zero good messages lost, every
   hostile one answered with an error, p99 within 1.5x of the clean run, RSS growth <= 2 MB.

    python -m benchmarks.agent_throughput [--quick]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.common import Report, Target
from benchmarks.runtime_overhead import THREADS, build_models
from tests.support.agent import ROOT, AgentProcess, write_config
from tests.support.mosquitto import Mosquitto

DEVICE = "bench-edge"


def _client(broker: Mosquitto, name: str, on_message: Any = None) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    # every client here turns Nagle off, as the agent does: otherwise a PUBACK behind another
    # small packet waits for a delayed ACK (40 ms) and caps the broker's in-flight window
    client.on_socket_open = lambda c, u, sock: sock.setsockopt(  # type: ignore[union-attr,attr-defined]
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if on_message is not None:
        client.on_message = on_message
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    if not connected.wait(10):
        raise TimeoutError(f"{name} could not connect")
    return client


class Collector:
    """Counts messages on a topic filter and records arrival times by message id."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.arrivals: dict[Any, float] = {}
        self.count = 0
        self.done = threading.Event()
        self.expect = 0
        self.client = _client(broker, f"collector-{time.monotonic_ns()}", self._on_message)
        self.client.subscribe(topic, qos=1)
        time.sleep(0.3)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.perf_counter()
        try:
            key = json.loads(msg.payload).get("id")
        except ValueError:
            key = None
        self.arrivals.setdefault(key, now)
        self.count += 1
        if self.expect and len(self.arrivals) >= self.expect:
            self.done.set()

    def reset(self, expect: int) -> None:
        self.arrivals, self.count, self.expect = {}, 0, expect
        self.done.clear()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def payload(image: list[Any], i: int) -> bytes:
    return json.dumps({"id": i, "data": image}).encode()


def flood(broker: Mosquitto, topic: str, images: list[list[Any]], collector: Collector,
          n: int, timeout: float = 300) -> float:
    """Publish n messages as fast as QoS 1 allows; messages/s from first send to last arrival."""
    sensor = _client(broker, f"sensor-{time.monotonic_ns()}")
    collector.reset(n)
    bodies = [payload(images[i % len(images)], i) for i in range(n)]
    start = time.perf_counter()
    for body in bodies:
        sensor.publish(topic, body, qos=1)
    if not collector.done.wait(timeout):
        raise TimeoutError(f"{len(collector.arrivals)} of {n} arrived")
    took = max(collector.arrivals.values()) - start
    sensor.loop_stop()
    sensor.disconnect()
    return n / took


# what a buggy sensor or a stranger on the broker sends (tests/device_agents/test_protocol_fuzz.py
# holds the full corpus); each must come back as one error, and cost the good messages nothing
HOSTILE = [
    b"[" * 3000 + b"]" * 3000,
    b'{"id": "p", "data": ' + b"[" * 900 + b"1" + b"]" * 900 + b"}",
    json.dumps({"id": "p", "data": {"dtype": "float32", "shape": [2**32, 2**32], "b64": ""}}).encode(),
    json.dumps({"id": "p", "data": {"dtype": "float32", "shape": [2**70], "b64": ""}}).encode(),
    json.dumps({"id": 2**70, "data": [1]}).encode(),
    b"\xff\xfe not json",
    json.dumps({"id": "p", "data": [[1], [1, 2]]}).encode(),
    json.dumps({"id": "p", "data": ["x"]}).encode(),
]


def paced(broker: Mosquitto, topic: str, images: list[list[Any]], collector: Collector,
          rate: float, seconds: float, on_tick: Any = None, poison_every: int = 0,
          errors: Collector | None = None) -> tuple[list[float], int, int]:
    """Publish at `rate`/s for `seconds`; per-message latency (ms) of the good messages to the
    collector, and with `poison_every`, one hostile message in that many: (latencies, hostile
    sent, hostile answered with an error)."""
    sensor = _client(broker, f"paced-{time.monotonic_ns()}")
    n = int(rate * seconds)
    hostile = [i for i in range(n) if poison_every and i % poison_every == poison_every // 2]
    good = n - len(hostile)
    collector.reset(good)
    if errors is not None:
        errors.reset(0)
    sent: dict[int, float] = {}
    start = time.perf_counter()
    next_tick = start + 1
    bad = set(hostile)
    for i in range(n):
        due = start + i / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(0.001, due - now))
        if i in bad:
            sensor.publish(topic, HOSTILE[i % len(HOSTILE)], qos=1)
        else:
            sent[i] = time.perf_counter()
            sensor.publish(topic, payload(images[i % len(images)], i), qos=1)
        if on_tick is not None and now >= next_tick:
            on_tick()
            next_tick += 1
    if not collector.done.wait(60):
        raise TimeoutError(f"{len(collector.arrivals)} of {good} answered")
    deadline = time.monotonic() + 10
    while errors is not None and errors.count < len(hostile) and time.monotonic() < deadline:
        time.sleep(0.05)
    sensor.loop_stop()
    sensor.disconnect()
    return ([(collector.arrivals[i] - sent[i]) * 1000 for i in sent], len(hostile),
            errors.count if errors is not None else 0)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bare_rate(pkg: Path, sample: np.ndarray, seconds: float) -> float:
    """Single-sample session.run calls per second on the same model file and threads."""
    import onnxruntime as ort

    from runtime.package import load_package

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(str(load_package(pkg).model_path), opts,
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feed = {name: sample[np.newaxis].astype(np.float32)}
    for _ in range(5):
        sess.run(None, feed)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sess.run(None, feed)
        n += 1
    return n / (time.perf_counter() - start)


def outbox_rate(workdir: Path, n: int) -> float:
    from device_agents.outbox import Outbox

    box = Outbox(workdir / "bench-outbox.db")
    body = json.dumps({"id": 1, "stream": "cam", "seq": 1, "epoch": 1,
                       "outputs": {"p": [0.1] * 10}, "label": "3", "score": 0.9}).encode()
    done: list[bool] = []
    start = time.perf_counter()
    for _i in range(n):
        box.put(f"{ROOT}/{DEVICE}/out/cam", body, on_durable=done.append)
    box.flush(120)
    rate = n / (time.perf_counter() - start)
    assert len(done) == n
    assert all(done)
    box.close()
    return rate


def run_agent(work: Path, broker: Mosquitto, package: Path, pub: Path, name: str) -> AgentProcess:
    config = write_config(work / f"{name}.toml", device_id=DEVICE, broker_url=broker.url,
                          data_dir=work / f"data-{name}", package=package, keys=[pub])
    agent = AgentProcess(config).start()
    watcher = Collector(broker, f"{ROOT}/{DEVICE}/status")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not watcher.arrivals:
        time.sleep(0.05)
    watcher.close()
    if agent.proc is None or agent.proc.poll() is not None:
        raise RuntimeError(f"agent did not start:\n{agent.logs()}")
    return agent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    quick = args.quick
    n = 2000 if quick else 6000
    load_s = 12.0 if quick else 60.0
    report = Report("agent_throughput", {"quick": quick, "qos": 1, "flood_messages": n,
                                         "load_seconds": load_s, "threads": THREADS,
                                         "max_batch": 32, "max_delay_ms": 2})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        built = build_models(work, quick=True)
        split = built["split"]
        images = [x.tolist() for x in split.x_test[:200]]
        broker = Mosquitto(work / "mq", listener_options="max_queued_messages 0\n")
        broker.start()
        try:
            out = Collector(broker, f"{ROOT}/{DEVICE}/out/#")
            raw = Collector(broker, "bench/raw")
            ceiling = statistics.median([flood(broker, "bench/raw", images, raw, n)
                                         for _ in range(2)])
            raw.close()
            agent = run_agent(work, broker, built["packages"]["tiny_declared"], built["pub"], "tiny")
            try:
                topic = f"{ROOT}/{DEVICE}/in/cam"
                flood(broker, topic, images, out, 300)  # warm-up
                sustained = statistics.median([flood(broker, topic, images, out, n)
                                               for _ in range(2)])
                samples: list[float] = []
                latencies, _, _ = paced(broker, topic, images, out, sustained / 2, load_s,
                                        on_tick=lambda: samples.append(rss_mb(agent.proc.pid)))  # type: ignore[union-attr]
                poisoned: list[float] = []
                errors = Collector(broker, f"{ROOT}/{DEVICE}/error")
                poison_latencies, hostile, refused = paced(
                    broker, topic, images, out, sustained / 2, load_s, poison_every=100,
                    errors=errors, on_tick=lambda: poisoned.append(rss_mb(agent.proc.pid)))  # type: ignore[union-attr]
                errors.close()
            finally:
                agent.stop()
            f = report.figures
            f["raw_ceiling_msgs_per_s"] = round(ceiling, 1)
            f["agent_results_per_s"] = round(sustained, 1)
            f["agent_vs_ceiling"] = round(sustained / ceiling, 3)
            f["half_rate_msgs_per_s"] = round(sustained / 2, 1)
            f["latency_p50_ms"] = round(float(np.percentile(latencies, 50)), 3)
            f["latency_p99_ms"] = round(float(np.percentile(latencies, 99)), 3)
            f["rss_peak_mb"] = round(max(samples), 1)
            f["rss_growth_mb"] = _growth(samples)
            good = int(sustained / 2 * load_s) - hostile
            f["poison_share"] = round(hostile / (good + hostile), 4)
            f["poison_hostile_sent"] = hostile
            f["poison_hostile_unanswered"] = hostile - refused
            f["poison_good_lost"] = good - len(poison_latencies)
            f["poison_latency_p99_ms"] = round(float(np.percentile(poison_latencies, 99)), 3)
            f["poison_p99_vs_clean"] = round(f["poison_latency_p99_ms"] / f["latency_p99_ms"], 3)
            f["poison_rss_growth_mb"] = _growth(poisoned)

            wide_pkg = built["packages"]["wide"]
            wide_images = [np.asarray(x, dtype=np.float32) for x in _upsampled(split.x_test[:50])]
            bare = bare_rate(wide_pkg, wide_images[0], 5 if quick else 10)
            agent = run_agent(work, broker, wide_pkg, built["pub"], "wide")
            try:
                lists = [x.tolist() for x in wide_images]
                flood(broker, topic, lists, out, 50)
                wide_rate = flood(broker, topic, lists, out, 300 if quick else 1000)
            finally:
                agent.stop()
            f["wide_bare_calls_per_s"] = round(bare, 1)
            f["wide_agent_results_per_s"] = round(wide_rate, 1)
            f["wide_agent_vs_bare"] = round(wide_rate / bare, 3)
            out.close()
        finally:
            broker.stop()
        f["outbox_enqueue_per_s"] = round(outbox_rate(work, 20000 if quick else 50000), 1)
    report.targets = [Target("agent_vs_ceiling", ">=", 0.5), Target("latency_p50_ms", "<=", 5),
                      Target("latency_p99_ms", "<=", 25), Target("rss_peak_mb", "<=", 90),
                      Target("rss_growth_mb", "<=", 2), Target("wide_agent_vs_bare", ">=", 0.8),
                      Target("outbox_enqueue_per_s", ">=", 5000),
                      Target("poison_good_lost", "<=", 0), Target("poison_hostile_unanswered", "<=", 0),
                      Target("poison_p99_vs_clean", "<=", 1.5), Target("poison_rss_growth_mb", "<=", 2)]
    report.write()
    return 0


def _growth(samples: list[float]) -> float:
    """RSS of the last third of a run against its middle third (the first is warm-up), MB."""
    third = max(1, len(samples) // 3)
    return round(statistics.mean(samples[-third:])
                 - statistics.mean(samples[third:2 * third] or samples), 2)


def _upsampled(x: np.ndarray) -> np.ndarray:
    from benchmarks.runtime_overhead import _upsample

    return _upsample(x)


if __name__ == "__main__":
    raise SystemExit(main())
