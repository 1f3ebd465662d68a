"""What does a model update cost over a 5G link, and what does it do to serving?

Through `edgefleet linkem --profile 5g-embb` (100 Mbit/s down, 20 ms RTT) between the agent's
uplink and Mosquitto (sensors on the local side), with the agent serving a digits CNN:
1. full delivery and activation of a large package (full run: all-MiniLM-L6-v2 quantized to int8,
   about 23 MB; --quick: a 6 MB synthetic MLP), timed from the deploy request until the device
   reports the version active, against the link's bandwidth bound (the model's bytes on the wire
   / the link rate); target <= 1.5x. Clearing the chunks left retained on the broker afterwards
   is housekeeping, reported apart (full_cleanup_seconds);
2. a head-only retrained digits CNN (only the last layer trained again): bytes sent <= 10% of the
   package;
3. the same large update to a second device with a 10 s outage in the middle: bytes sent <= 1.1x
   those of (1);
4. result latency p99 while an update flows <= 2x the p99 without one.

One Mosquitto plays the fleet broker and the sensors' local broker. Its files go to tmpfs
(/dev/shm) when there is one: a fleet broker does not share the edge box's disk, and this one,
saving its 23 MB of retained chunks every second, would otherwise stall the agent's own fsyncs
(its outbox commits among them) by about 50 ms each time, which no device would see.

    python -m benchmarks.model_update [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.agent_throughput import Collector, _client, payload
from benchmarks.common import Report, Target
from device_agents.config import BrokerConfig
from device_agents.fleet.client import FleetClient
from device_agents.fleet.deploy import Outcome, deploy, plan
from device_agents.linkem import LinkEmulator
from tests.support.agent import ROOT, AgentProcess, write_config
from tests.support.mosquitto import Mosquitto

PROFILE = "5g-embb"
RATE_HZ = 50


def broker_dir(work: Path) -> Path:
    """The broker's files: on tmpfs when the machine has one (see the module docstring)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="edgefleet-bench-broker-", dir=shm))
    return work / "mq"


def digits_pair(work: Path, key: Any) -> tuple[Path, Path, Any]:
    """A digits CNN (about 1.1 MB) and the same network with only its last layer retrained."""
    import torch

    from compress.examples import digits
    from runtime.package import write_package

    split = digits.load_digits_split()
    model = digits.build_cnn(width=32, hidden=256)
    digits.train(model, split, epochs=3)
    v1 = digits.export_onnx(model, work / "digits-v1.onnx")
    for p in model.parameters():
        p.requires_grad = False
    head = list(model.children())[-1]
    assert isinstance(head, torch.nn.Linear)
    for p in head.parameters():
        p.requires_grad = True
    digits.train(model, split, epochs=2, seed=1)
    v2 = digits.export_onnx(model, work / "digits-v2.onnx")
    common = {"name": "digits", "labels": digits.LABELS, "preprocess": digits.preprocess(),
              "postprocess": "softmax", "sign_key": key}
    return (write_package(work / "pkg-digits-1", v1, version="1", **common).path,
            write_package(work / "pkg-digits-2", v2, version="2", **common).path, split)


def big_package(work: Path, key: Any, quick: bool) -> Path:
    from runtime.package import write_package

    if quick:
        from tests.support.onnx_models import image_mlp

        onnx_path = image_mlp(work / "bulk.onnx", seed=11, hidden=1200)
        return write_package(work / "pkg-bulk", onnx_path, name="bulk", version="1",
                             sign_key=key).path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from compress.examples import minilm

    fp32 = minilm.export_onnx(work / "minilm.onnx")
    int8 = work / "minilm-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gather"])
    return write_package(work / "pkg-minilm", int8, name="minilm", version="1", sign_key=key).path


class Stream:
    """A sensor at RATE_HZ on the local broker; latencies (ms) of its results, by phase."""

    def __init__(self, broker: Mosquitto, device: str, images: list[Any]) -> None:
        self.sensor = _client(broker, f"sensor-{device}")
        self.collector = Collector(broker, f"{ROOT}/{device}/out/#")
        self.collector.reset(10**9)
        self.topic = f"{ROOT}/{device}/in/cam"
        self.images = images
        self.sent: dict[int, tuple[float, str]] = {}
        self.phase = "idle"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        start = time.perf_counter()
        while not self._stop.is_set():
            due = start + i / RATE_HZ
            while (now := time.perf_counter()) < due:
                time.sleep(min(0.002, due - now))
            self.sent[i] = (time.perf_counter(), self.phase)
            self.sensor.publish(self.topic, payload(self.images[i % len(self.images)], i), qos=1)
            i += 1

    def p99(self, *phases: str) -> float:
        lat = [(self.collector.arrivals[i] - t) * 1000 for i, (t, ph) in self.sent.items()
               if ph in phases and i in self.collector.arrivals]
        return float(np.percentile(lat, 99)) if lat else float("nan")

    def lost(self) -> int:
        return sum(1 for i in self.sent if i not in self.collector.arrivals)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        time.sleep(2)  # the last answers
        self.sensor.disconnect()
        self.sensor.loop_stop()
        self.collector.close()


def start_agent(work: Path, name: str, broker: Mosquitto, link: LinkEmulator, package: Path,
                pub: Path) -> AgentProcess:
    host, port = link.address
    config = write_config(work / f"{name}.toml", device_id=name, broker_url=f"mqtt://{host}:{port}",
                          data_dir=work / f"data-{name}", package=package, keys=[pub],
                          extra=f'\n[sensors]\nurl = "{broker.url}"\n')
    agent = AgentProcess(config).start()
    with FleetClient(BrokerConfig(url=broker.url, session_expiry_s=0), "probe") as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if client.devices(0.5).get(name, {}).get("state") == "online":
                return agent
    raise RuntimeError(f"agent {name} did not come online:\n{agent.logs()}")


PHASES: dict[str, float] = {}  # phase -> seconds after the deploy started (first seen)


def run_deploy(broker: Mosquitto, package: Path, device: str,
               on_update: Any = None) -> tuple[Outcome, float, float]:
    """(outcome, seconds until the device reported the version active, seconds until `deploy`
    returned: it also clears the chunks it left retained on the broker)."""
    the_plan = plan(package, health_window_s=0, max_error_rate=0.5)
    PHASES.clear()
    with FleetClient(BrokerConfig(url=broker.url, session_expiry_s=0), "bench") as client:
        start = time.perf_counter()

        def update(out: Outcome) -> None:
            PHASES.setdefault(out.phase, time.perf_counter() - start)
            if on_update is not None:
                on_update(out)

        outcome = deploy(client, the_plan, [device], timeout=600, wait_healthy=False,
                         on_update=update)[0]
    total = time.perf_counter() - start
    return outcome, PHASES.get("active", total), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    from runtime.signing import generate_keypair, load_private_key

    report = Report("model_update", {"quick": args.quick, "profile": PROFILE,
                                     "sensor_rate_hz": RATE_HZ, "outage_s": 10})
    f = report.figures
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, pub, _ = generate_keypair(work / "keys")
        key = load_private_key(work / "keys" / "fleet.key")
        digits_v1, digits_v2, split = digits_pair(work, key)
        big = big_package(work, key, args.quick)
        big_bytes = (big / "model.onnx").stat().st_size
        images = [x.tolist() for x in split.x_test[:100]]
        broker = Mosquitto(broker_dir(work), listener_options="max_queued_messages 0\n")
        broker.start()
        agents: list[AgentProcess] = []
        try:
            with LinkEmulator((broker.host, broker.port), PROFILE, seed=1) as link:
                agents.append(start_agent(work, "edge-a", broker, link, digits_v1, pub))
                stream = Stream(broker, "edge-a", images)
                time.sleep(4 if args.quick else 10)  # the latency without an update
                stream.phase = "update"
                before = link.stats().bytes_down

                def split(out: Outcome) -> None:  # transfer vs verify/load/self-test/activate
                    if out.phase != "downloading" and stream.phase == "update":
                        stream.phase = "update-activation"

                outcome, seconds, returned = run_deploy(broker, big, "edge-a", on_update=split)
                full_sent = link.stats().bytes_down - before
                stream.phase = "after"
                assert outcome.ok, outcome
                rate = 100e6 / 8  # 5g-embb down, bytes/s
                bound = big_bytes * (1 + 40 / 1460) / rate
                f["big_package_bytes"] = big_bytes
                f["full_seconds"] = round(seconds, 3)
                f["full_bound_seconds"] = round(bound, 3)
                f["full_vs_bound"] = round(seconds / bound, 3)
                f["full_bytes_down"] = full_sent
                f["full_transfer_seconds"] = round(PHASES.get("verifying", float("nan")), 3)
                f["full_activation_seconds"] = round(seconds - PHASES.get("verifying", 0), 3)
                f["full_cleanup_seconds"] = round(returned - seconds, 3)
                before = link.stats().bytes_down
                head, _, _ = run_deploy(broker, digits_v2, "edge-a")
                head_sent = link.stats().bytes_down - before
                assert head.ok, head
                v2_bytes = (digits_v2 / "model.onnx").stat().st_size
                f["head_package_bytes"] = v2_bytes
                f["head_chunk_bytes_needed"] = head.need_bytes
                f["head_bytes_down"] = head_sent
                f["head_sent_fraction"] = round(head_sent / v2_bytes, 4)
                stream.stop()
                f["p99_ms_no_update"] = round(stream.p99("idle"), 2)
                f["p99_ms_during_update"] = round(stream.p99("update", "update-activation"), 2)
                f["p99_ms_during_transfer"] = round(stream.p99("update"), 2)
                f["p99_ms_during_activation"] = round(stream.p99("update-activation"), 2)
                f["p99_update_ratio"] = round(f["p99_ms_during_update"] / f["p99_ms_no_update"], 3)
                f["results_lost"] = stream.lost()
            with LinkEmulator((broker.host, broker.port), PROFILE, seed=2) as link2:
                agents.append(start_agent(work, "edge-b", broker, link2, digits_v1, pub))
                cut = threading.Event()

                def outage(out: Outcome) -> None:
                    if out.phase == "downloading" and out.progress >= 0.4 and not cut.is_set():
                        cut.set()
                        link2.cut("blackhole")
                        threading.Timer(10, link2.restore).start()

                before = link2.stats().bytes_down
                outcome, seconds, _ = run_deploy(broker, big, "edge-b", on_update=outage)
                assert outcome.ok, outcome
                f["outage_happened"] = cut.is_set()
                f["outage_bytes_down"] = link2.stats().bytes_down - before
                f["outage_seconds"] = round(seconds, 2)
                f["outage_bytes_ratio"] = round(f["outage_bytes_down"] / full_sent, 3)
        finally:
            for agent in agents:
                agent.stop()
            broker.stop()
            if broker.workdir.parent == Path("/dev/shm"):
                shutil.rmtree(broker.workdir, ignore_errors=True)
    report.targets = [Target("full_vs_bound", "<=", 1.5), Target("head_sent_fraction", "<=", 0.10),
                      Target("outage_bytes_ratio", "<=", 1.1), Target("p99_update_ratio", "<=", 2.0),
                      Target("results_lost", "<=", 0)]
    report.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
