"""How does the fleet side scale: `fleet status` over 500 devices, `fleet collect` ingest?

Side by side on loopback with one Mosquitto; everything that plays the fleet (simulated devices,
result publishers, collectors) runs in its own process, so no client shares a GIL with the one
being measured:
1. status: 500 simulated devices (one process: each device's retained birth on `status`, then
   telemetry every second, in the agent's protocol); the `fleet status` view (FleetClient +
   FleetView, as `edgefleet fleet status --json` builds it) has every device within 2 s of
   connecting (target <= 2 s), and the real command's wall time is shown beside it;
2. collect: publisher processes (2) publish QoS 1 results while the collectors are away; their
   persistent sessions keep the backlog, which `edgefleet fleet collect` (the real command, in
   its own process) then drains: the collectors' own capacity, no publisher sharing the CPU.
   One collector >= 5,000 results/s into SQLite; two in one share group (a file each) against
   one, in interleaved rounds (target two/one >= 1.3); two sharing one file; nothing stored
   twice. Beside them, to show where the limit is: a bare paho subscriber draining the same
   backlog (broker + Python MQTT client, nothing else), the bare SQLite insert rate of the same
   rows (ResultStore.write), CPU per process while rows flow, one collector against Mosquitto's
   default in-flight window (20) instead of 1,000, and (full run) one collector live while the
   publishers flood on the same cores; (full run) two collectors sharing one file.
3. deploy: a group deploy reaches 50 simulated devices (benchmarks/sim_devices.py: the agent's
   delivery protocol over the agent's Transport, 2 processes, chunks in memory, no onnxruntime)
   among 500 other retained statuses. The operator path as `edgefleet fleet deploy --group` runs
   it (resolve_targets, then deploy() of a signed 450 KB package): every device active and
   healthy (target); wall time beside one device alone; bytes the broker was asked to retain
   once against bytes it delivered; a head-only update to the same group (only changed chunks
   travel); the span of deploy()'s device-by-device request loop beside a bare request round
   trip, which is where the time goes; (full run) a 200-device group, to show how it grows.

Sections are functions in SECTIONS.

    python -m benchmarks.fleet_scale [--quick] [--only status|collect|deploy]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.common import Report, Target
from device_agents import protocol
from tests.support.mosquitto import Mosquitto

DEVICES = 500
PUBLISHERS = 2
# no cap on what Mosquitto queues for a busy subscriber (default 1,000: past it QoS 1 messages
# are dropped), and an in-flight window a collector that acknowledges after commit can fill
BROKER_OPTIONS = "max_queued_messages 0\nmax_inflight_messages 1000\n"
DEFAULT_WINDOW_OPTIONS = "max_queued_messages 0\n"


@dataclass
class Context:
    work: Path
    quick: bool
    figures: dict[str, Any]
    params: dict[str, Any]


def _client(host: str, port: int, name: str, on_message: Any = None) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    if on_message is not None:
        client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} could not connect to {host}:{port}")
        time.sleep(0.01)
    return client


# -- 1. fleet status over 500 devices ----------------------------------------------------------

def simulate_fleet(host: str, port: int, devices: int, ready: Any, stop: Any) -> None:
    """A process playing `devices` agents: retained births, then telemetry every second."""
    client = _client(host, port, "sim-fleet")
    names = [f"sim-{i:04d}" for i in range(devices)]
    infos = [client.publish(protocol.Topics(d).status, protocol.birth(
        1, "edgefleet-agent/sim", ["sim"], [{"name": "digits", "version": "1", "sha256": "0" * 64}]),
        qos=1, retain=True) for d in names]
    for info in infos:
        info.wait_for_publish(30)
    ready.set()
    while not stop.is_set():
        for d in names:
            client.publish(protocol.Topics(d).telemetry, protocol.encode({
                "ts": protocol.now(), "uptime_s": 1.0, "rss_bytes": 50 << 20, "cpu_percent": 3.0,
                "outbox": {"depth": 0, "bytes": 0, "oldest_s": 0.0, "dropped": 0},
                "inference": {"count": 10, "errors": 0, "p50_ms": 0.4, "p99_ms": 1.1}}), qos=0)
        stop.wait(1.0)
    client.loop_stop()
    client.disconnect()


def section_status(ctx: Context) -> None:
    from device_agents.config import BrokerConfig
    from device_agents.fleet.client import FleetClient
    from device_agents.fleet.status import FleetView

    broker = Mosquitto(ctx.work / "mq-status", listener_options=BROKER_OPTIONS)
    broker.start()
    spawn = mp.get_context("spawn")
    ready, stop = spawn.Event(), spawn.Event()
    sim = spawn.Process(target=simulate_fleet, args=(broker.host, broker.port, DEVICES, ready, stop))
    sim.start()
    try:
        if not ready.wait(60):
            raise TimeoutError("the simulated fleet did not publish its births")
        time.sleep(1.5)  # a round of telemetry is flowing
        t0 = time.perf_counter()
        seen_all = with_telemetry = None
        with FleetClient(BrokerConfig(url=broker.url, session_expiry_s=0), "status") as client:
            view = FleetView(client)
            while time.perf_counter() - t0 < 10 and with_telemetry is None:
                rows = view.snapshot()
                online = [r for r in rows if r["state"] == "online"]
                if seen_all is None and len(online) >= DEVICES:
                    seen_all = time.perf_counter() - t0
                if len(online) >= DEVICES and all(r["outbox_depth"] is not None for r in online):
                    with_telemetry = time.perf_counter() - t0
                time.sleep(0.01)
        ctx.figures["status_devices"] = DEVICES
        ctx.figures["status_view_all_devices_s"] = round(seen_all or float("inf"), 3)
        ctx.figures["status_view_with_telemetry_s"] = round(with_telemetry or float("inf"), 3)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "edgefleet.cli", "fleet", "status", "--json",
                              "--broker", broker.url], capture_output=True, text=True, timeout=60)
        ctx.figures["status_cli_wall_s"] = round(time.perf_counter() - t0, 3)
        ctx.figures["status_cli_rows"] = len(json.loads(out.stdout)) if out.returncode == 0 else 0
    finally:
        stop.set()
        sim.join(10)
        broker.stop()


# -- 2. fleet collect ingest -------------------------------------------------------------------

def result_payload(device: str, seq: int, epoch: int = 1) -> bytes:
    """A digits result as the agent publishes it (about 400 bytes)."""
    now = protocol.now()
    probs = [round(0.01 * ((seq + k) % 10), 6) for k in range(10)]
    return protocol.encode({
        "id": f"{device}-{seq}", "stream": "camera0", "seq": seq, "epoch": epoch,
        "model": {"name": "digits", "version": "1"}, "outputs": {"probs": [probs]},
        "label": str(seq % 10), "score": 0.9,
        "top": [{"label": str((seq + k) % 10), "score": 0.9 - k / 10} for k in range(3)],
        "latency_ms": {"queue": 0.08, "inference": 0.35, "total": 0.61}, "ts_in": now, "ts_out": now})


def publish_results(host: str, port: int, device: str, count: int, epoch: int, go: Any,
                    out: Any) -> None:
    """A process publishing `count` QoS 1 results of one device as fast as it can; reports its
    rate (first publish to last PUBACK)."""
    client = _client(host, port, f"pub-{device}")
    bodies = [result_payload(device, seq, epoch) for seq in range(1, count + 1)]
    topic = protocol.Topics(device).output("camera0")
    go.wait()
    t0 = time.perf_counter()
    infos = [client.publish(topic, body, qos=1) for body in bodies]
    for info in infos:
        info.wait_for_publish(300)
    out.put(count / (time.perf_counter() - t0))
    client.loop_stop()
    client.disconnect()


class BareSubscriber:
    """A plain paho QoS 1 subscriber with a persistent session (paho acknowledges on arrival):
    the broker + Python MQTT client ceiling, with nothing else per message."""

    def __init__(self, broker: Mosquitto, name: str) -> None:
        self.broker, self.name = broker, name
        self.times: list[float] = []
        self.client = self._connect()
        self.client.subscribe(protocol.ALL_RESULTS, qos=1)
        time.sleep(0.3)

    def _connect(self) -> mqtt.Client:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.name, protocol=mqtt.MQTTv5)
        client.on_message = lambda c, u, m: self.times.append(time.perf_counter())
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 600
        client.connect(self.broker.host, self.broker.port, clean_start=False, properties=props)
        client.loop_start()
        while not client.is_connected():
            time.sleep(0.01)
        return client

    def pause(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def resume(self) -> None:
        self.client = self._connect()

    def rate(self, count: int, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while len(self.times) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        self.pause()
        return count / (self.times[count - 1] - self.times[0]) if len(self.times) >= count else 0.0


def flood(broker: Mosquitto, total: int, tag: str, epoch: int = 1
          ) -> tuple[Any, Callable[[], float]]:
    """Start the publisher processes, ready to go; returns (go event, wait for their total rate)."""
    spawn = mp.get_context("spawn")
    go, rates = spawn.Event(), spawn.Queue()
    procs = [spawn.Process(target=publish_results, args=(
        broker.host, broker.port, f"{tag}-{i}", total // PUBLISHERS, epoch, go, rates))
        for i in range(PUBLISHERS)]
    for p in procs:
        p.start()

    def finish() -> float:
        got = [rates.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(30)
        return float(sum(got))

    return go, finish


class Collectors:
    """`edgefleet fleet collect` processes in one share group, each restricted to this run's
    devices (an earlier run's sessions get nothing queued)."""

    def __init__(self, broker: Mosquitto, dbs: list[Path], tag: str) -> None:
        self.broker, self.dbs, self.tag = broker, dbs, tag
        self.procs: list[subprocess.Popen[str]] = []
        self.cpu: dict[str, float] = {}

    def command(self, i: int, *extra: str) -> list[str]:
        devices = [a for k in range(PUBLISHERS) for a in ("--device", f"{self.tag}-{k}")]
        return [sys.executable, "-m", "edgefleet.cli", "fleet", "collect", "--db",
                str(self.dbs[i]), "--broker", self.broker.url, "--group", self.tag, "--name",
                f"{self.tag}-{i}", *devices, *extra]

    def prime(self) -> None:
        """Run each once, briefly: their persistent sessions now hold their share of what comes."""
        procs = [subprocess.Popen(self.command(i, "--duration", "0.2"), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for i in range(len(self.dbs))]
        for proc in procs:
            if proc.wait(60) != 0:
                raise RuntimeError(f"{self.tag}: collector did not start")

    def start(self) -> None:
        """All at once (a backlog is drained by all of them together), then wait until each has
        printed its first progress line: connected."""
        self.procs = [subprocess.Popen(self.command(i, "--json", "--duration", "600"),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                      for i in range(len(self.dbs))]
        for proc in self.procs:
            assert proc.stderr is not None
            proc.stderr.readline()

    def finish(self, total: int, epoch: int = 1) -> tuple[float, list[dict[str, Any]]]:
        """Wait for `total` rows of this epoch; stop the collectors (SIGTERM); the rate from
        first to last commit. CPU use while rows flow goes to self.cpu: where the time goes."""
        where = f"FROM results WHERE epoch = {int(epoch)}"
        deadline = time.monotonic() + 300
        pids = {"broker": self.broker.proc.pid if self.broker.proc else 0,
                **{f"collector{i}": p.pid for i, p in enumerate(self.procs)}}
        flowing: CpuSample | None = None
        while (stored := sum(_query(db, f"SELECT count(*) {where}") for db in set(self.dbs))
               ) < total:
            if flowing is None and stored > 0:
                flowing = CpuSample.take(pids)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.tag}: the collectors did not store {total} results")
            time.sleep(0.05)
        self.cpu = CpuSample.take(pids).since(flowing) if flowing is not None else {}
        summaries = []
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
            summaries.append(json.loads(out))
        first = min(_query(db, f"SELECT min(received_at) {where}") for db in self.dbs)
        last = max(_query(db, f"SELECT max(received_at) {where}") for db in self.dbs)
        return total / (last - first), summaries

    def drain(self, total: int, epoch: int) -> tuple[float, list[dict[str, Any]]]:
        """A backlog of `total` results published while the collectors were away (their
        sessions keep it), then drained: their own capacity, no publisher sharing the CPU."""
        go, finish = flood(self.broker, total, self.tag, epoch)
        go.set()
        finish()
        self.start()
        return self.finish(total, epoch)


@dataclass
class CpuSample:
    """Jiffies of the whole machine and of some processes, from /proc (Linux)."""

    wall: float
    busy: int
    total: int
    procs: dict[str, int]

    @staticmethod
    def take(pids: dict[str, int]) -> CpuSample:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        procs = {}
        for name, pid in pids.items():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                procs[name] = int(stat[11]) + int(stat[12])  # utime + stime
            except (OSError, IndexError):
                procs[name] = 0
        return CpuSample(time.monotonic(), sum(fields) - idle, sum(fields), procs)

    def since(self, before: CpuSample) -> dict[str, float]:
        """Busy fraction of all cores, and each process's use in cores (1.0 = one core)."""
        hz, wall = os.sysconf("SC_CLK_TCK"), self.wall - before.wall
        out = {"machine_busy": round((self.busy - before.busy) / max(1, self.total - before.total), 3)}
        for name, ticks in self.procs.items():
            out[f"{name}_cores"] = round((ticks - before.procs.get(name, 0)) / hz / wall, 2)
        return out


def _query(db: Path, sql: str) -> float:
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return float(conn.execute(sql).fetchone()[0] or 0)
    except sqlite3.OperationalError:  # not created yet
        return 0.0


def sqlite_rate(work: Path, total: int, batch: int, synchronous: str) -> float:
    """ResultStore.write alone, on the same rows: the disk side's ceiling."""
    from device_agents.fleet.results_db import ResultStore

    store = ResultStore(work / f"bare-{batch}-{synchronous}.db", synchronous=synchronous)
    topic = protocol.Topics("bare").output("camera0")
    items = [(topic, result_payload("bare", seq)) for seq in range(1, total + 1)]
    t0 = time.perf_counter()
    for i in range(0, total, batch):
        store.write(items[i:i + batch], time.time())
    rate = total / (time.perf_counter() - t0)
    store.close()
    return rate


def section_collect(ctx: Context) -> None:
    total = 10_000 if ctx.quick else 50_000
    rounds = 2 if ctx.quick else 3
    ctx.params.update({"collect_results": total, "collect_rounds": rounds,
                       "publisher_processes": PUBLISHERS,
                       "broker_options": BROKER_OPTIONS.strip().split("\n"),
                       "sqlite": "WAL, synchronous=NORMAL",
                       "payload_bytes": len(result_payload("dev-0", 1))})
    f, work = ctx.figures, ctx.work
    broker = Mosquitto(work / "mq-collect", listener_options=BROKER_OPTIONS)
    broker.start()
    try:
        bare = BareSubscriber(broker, "bare")  # the ceiling: a drained backlog, no collector
        bare.pause()
        go, finish = flood(broker, total, "bare")
        go.set()
        finish()
        bare.resume()
        f["bare_subscriber_per_s"] = round(bare.rate(total), 1)
        setups = {"one": [work / "one.db"], "two": [work / "two-a.db", work / "two-b.db"]}
        if not ctx.quick:  # one round of it takes 7 s: --quick keeps within 60 s without it
            setups["shared"] = [work / "shared.db"] * 2
        runs = {name: Collectors(broker, dbs, name) for name, dbs in setups.items()}
        for c in runs.values():
            c.prime()
        rates: dict[str, list[float]] = {name: [] for name in runs}
        summaries: list[dict[str, Any]] = []
        for r in range(rounds):  # interleaved, so a noisy neighbour slows all alike
            for name, c in runs.items():
                if name == "shared" and r > 0:
                    continue  # one round is enough for the shared-file variant
                rate, summary = c.drain(total, epoch=r + 1)
                rates[name].append(rate)
                summaries += summary
                if r == 0 and name in ("one", "two"):
                    f.update({f"cpu_{name}_{k}": v for k, v in c.cpu.items()})
        one, two = statistics.median(rates["one"]), statistics.median(rates["two"])
        f["collect_one_per_s"] = round(one, 1)
        f["collect_one_vs_bare_subscriber"] = round(one / f["bare_subscriber_per_s"], 3)
        f["collect_two_per_s"] = round(two, 1)
        f["collect_two_vs_one"] = round(two / one, 3)
        f["collect_two_split"] = [s["stored"] for s in summaries if s["name"].startswith("two")][:2]
        if "shared" in rates:
            f["collect_two_shared_file_per_s"] = round(rates["shared"][0], 1)
        f["collect_duplicates"] = sum(s["duplicates"] for s in summaries)
        if not ctx.quick:  # live: publishers flooding while one collector ingests, same cores
            live = Collectors(broker, [work / "live.db"], "live")
            live.start()
            go, finish = flood(broker, total, "live")
            go.set()
            f["collect_one_live_per_s"] = round(live.finish(total)[0], 1)
            f["live_publishers_per_s"] = round(finish(), 1)
    finally:
        broker.stop()
    narrow = Mosquitto(work / "mq-window20", listener_options=DEFAULT_WINDOW_OPTIONS)
    narrow.start()
    try:
        w20 = Collectors(narrow, [work / "w20.db"], "w20")
        w20.prime()
        f["collect_one_window20_per_s"] = round(w20.drain(total // 2, 1)[0], 1)
    finally:
        narrow.stop()
    f["sqlite_batch1000_per_s"] = round(sqlite_rate(work, total, 1000, "NORMAL"), 1)
    f["sqlite_batch20_per_s"] = round(sqlite_rate(work, total, 20, "NORMAL"), 1)
    f["sqlite_batch20_full_sync_per_s"] = round(sqlite_rate(work, total // 5, 20, "FULL"), 1)


# -- 3. a group deploy to simulated devices -----------------------------------------------------

GROUP_DEVICES = 50
WIDE_DEVICES = 200  # full run: a second, wider group, to show how the wall time grows
SIM_PROCESSES = 2  # simulated devices run in this many processes, each its own connection
GROUP_HIDDEN = 300  # image_mlp width: a package of about 450 KB, some 13 chunks


def group_packages(work: Path) -> tuple[Path, Path, Path]:
    """A signed package of about 450 KB, the same network with only its last layer changed
    (version 2: a head-only retrain), and the public key the devices trust."""
    from runtime.package import write_package
    from runtime.signing import generate_keypair, load_private_key
    from tests.support.onnx_models import image_mlp

    key_path, pub, _ = generate_keypair(work / "keys")
    key = load_private_key(key_path)
    paths = []
    for version, head_seed in (("1", None), ("2", 6)):
        model = image_mlp(work / f"groupnet-{version}.onnx", seed=5, head_seed=head_seed,
                          hidden=GROUP_HIDDEN)
        paths.append(write_package(work / f"pkg-groupnet-{version}", model, name="groupnet",
                                   version=version, sign_key=key).path)
    return paths[0], paths[1], pub


def publish_births(host: str, port: int, count: int, group: str) -> None:
    """Retained births of `count` devices outside the group deployed to: what resolve_targets
    reads through."""
    client = _client(host, port, "sim-others")
    infos = [client.publish(protocol.Topics(f"other-{i:04d}").status, protocol.birth(
        1, "edgefleet-agent/sim", [group], []), qos=1, retain=True) for i in range(count)]
    for info in infos:
        info.wait_for_publish(30)
    client.loop_stop()
    client.disconnect()


def counting_client(url: str) -> Any:
    """The operator's FleetClient, counting the chunk bytes it asks the broker to retain."""
    from device_agents.config import BrokerConfig
    from device_agents.fleet.client import FleetClient

    class Counting(FleetClient):
        retained_bytes = 0
        retained_chunks = 0

        def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
            if retain and payload and topic.startswith(protocol.BLOBS_PREFIX):
                self.retained_bytes += len(payload)
                self.retained_chunks += 1
            super().publish(topic, payload, retain)

    return Counting(BrokerConfig(url=url, session_expiry_s=0), "bench")


@dataclass
class GroupRun:
    """One `deploy()` as the operator runs it, and what it cost."""

    deployment: str
    package_bytes: int
    package_chunks: int
    outcomes: list[Any]
    wall: float
    cpu: dict[str, float]
    retained_bytes: int
    retained_chunks: int


def group_deploy(client: Any, package: Path, targets: list[str], pids: dict[str, int]
                 ) -> GroupRun:
    from device_agents.fleet.deploy import deploy, plan

    client.retained_bytes = client.retained_chunks = 0
    the_plan = plan(package, health_window_s=0, max_error_rate=0.2)
    before = CpuSample.take(pids)
    t0 = time.perf_counter()
    outcomes = deploy(client, the_plan, targets, timeout=120)
    wall = time.perf_counter() - t0
    return GroupRun(the_plan.descriptor["deployment"], the_plan.total_bytes,
                    len(the_plan.chunks), outcomes, wall,
                    CpuSample.take(pids).since(before), client.retained_bytes,
                    client.retained_chunks)


def group_figures(name: str, run: GroupRun, stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of one group deploy: outcome, wall time, bytes retained once against bytes the
    broker delivered, and where the time went (deploy() asks the devices one after another)."""
    mine = [s for s in stats if s["deployment"] == run.deployment]
    asked = sorted(s["requested_at"] for s in mine)
    device_s = [s["active_at"] - s["requested_at"] for s in mine if s["active_at"]]
    delivered = sum(s["chunk_bytes"] for s in mine)
    loop = asked[-1] - asked[0] if asked else float("nan")
    return {
        f"{name}_devices": len(run.outcomes),
        f"{name}_active": sum(o.ok and o.healthy for o in run.outcomes),
        f"{name}_s": round(run.wall, 3),
        f"{name}_package_bytes": run.package_bytes,
        f"{name}_package_chunks": run.package_chunks,
        f"{name}_retained_bytes": run.retained_bytes,
        f"{name}_retained_chunks": run.retained_chunks,
        f"{name}_delivered_bytes": delivered,
        f"{name}_fanout": round(delivered / run.retained_bytes, 2) if run.retained_bytes else 0,
        f"{name}_request_loop_s": round(loop, 3),
        f"{name}_request_ms_per_device": round(1000 * loop / max(1, len(asked) - 1), 1),
        f"{name}_last_active_after_loop_s": round(
            max(s["active_at"] for s in mine) - asked[-1], 3) if device_s else None,
        f"{name}_device_to_active_median_s": round(statistics.median(device_s), 3)
        if device_s else None,
        f"{name}_bad_chunks": sum(s["bad_chunks"] for s in mine),
        # CPU time comes in 10 ms ticks: a run much shorter than a second says little
        **({f"{name}_cpu_{k}": v for k, v in run.cpu.items()} if run.wall >= 0.4 else {}),
    }


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def section_deploy(ctx: Context) -> None:
    from benchmarks.sim_devices import SimFleet
    from device_agents.fleet.deploy import resolve_targets

    names = [f"bench-{i:03d}" for i in range(GROUP_DEVICES)]
    v1, v2, pub = group_packages(ctx.work)
    ctx.params.update({
        "group_devices": GROUP_DEVICES, "group_wide_devices": 0 if ctx.quick else WIDE_DEVICES,
        "group_sim_processes": SIM_PROCESSES, "group_other_statuses": DEVICES,
        "group_package": f"image_mlp hidden={GROUP_HIDDEN}, signed; v2 retrains the last layer",
        "group_health_window_s": 0, "group_broker": "Mosquitto defaults"})
    f = ctx.figures
    broker = Mosquitto(ctx.work / "mq-deploy")  # Mosquitto's defaults: what a fleet would run
    broker.start()
    fleet = SimFleet(broker.url, {"solo-000": ["solo"], **{n: ["bench"] for n in names}}, pub,
                     SIM_PROCESSES)
    stats: list[dict[str, Any]] = []
    runs: dict[str, GroupRun] = {}
    try:
        publish_births(broker.host, broker.port, DEVICES, "sim")
        fleet.start()
        with counting_client(broker.url) as client:
            t0 = time.perf_counter()
            targets = resolve_targets(client, (), "bench")
            f["group_resolve_s"] = round(time.perf_counter() - t0, 3)  # mostly its 1 s listen
            f["group_resolve_found"] = len(targets)
            f["group_resolve_exact"] = int(targets == names)  # the group, and nobody else
            pids = {"broker": broker.proc.pid if broker.proc else 0, "fleet": os.getpid(),
                    **fleet.pids}
            # one device alone, side by side with the group: what the group adds
            runs["group_solo"] = group_deploy(client, v1, ["solo-000"], pids)
            runs["group_deploy"] = group_deploy(client, v1, targets, pids)
            runs["group_update"] = group_deploy(client, v2, targets, pids)
            # a bare request round trip to each device in turn: what deploy()'s loop pays
            pings = [_timed(functools.partial(client.request, d, "ping", timeout=10))
                     for d in targets]
            f["group_ping_ms_median"] = round(1000 * statistics.median(pings), 1)
        stats += fleet.stop()
        if not ctx.quick:
            wide_names = [f"wide-{i:03d}" for i in range(WIDE_DEVICES)]
            fleet = SimFleet(broker.url, {n: ["wide"] for n in wide_names}, pub, SIM_PROCESSES)
            fleet.start()
            with counting_client(broker.url) as client:
                wide = resolve_targets(client, (), "wide")
                pids = {"broker": broker.proc.pid if broker.proc else 0, "fleet": os.getpid(),
                        **fleet.pids}
                runs["group_wide"] = group_deploy(client, v1, wide, pids)
            stats += fleet.stop()
    finally:
        fleet.kill()
        broker.stop()
    for name, run in runs.items():
        f.update(group_figures(name, run, stats))
    f["group_deploy_vs_solo"] = round(runs["group_deploy"].wall / runs["group_solo"].wall, 2)
    if "group_wide" in runs:
        f["group_wide_vs_group"] = round(runs["group_wide"].wall / runs["group_deploy"].wall, 2)
    f["group_unwanted_bytes"] = sum(s["unwanted_bytes"] for s in stats)
    f["group_sim_errors"] = [s["error"] for s in stats if s["error"]][:3]
    f["group_not_active"] = [o.as_dict() for run in runs.values() for o in run.outcomes
                             if not (o.ok and o.healthy)][:3]


# -- the report ---------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[Context], None]] = {
    "status": section_status,
    "collect": section_collect,
    "deploy": section_deploy,
}
TARGETS: dict[str, list[Target]] = {
    "status": [Target("status_view_all_devices_s", "<=", 2.0),
               Target("status_cli_rows", ">=", DEVICES)],
    "collect": [Target("collect_one_per_s", ">=", 5000), Target("collect_two_vs_one", ">=", 1.3),
                Target("collect_duplicates", "<=", 0)],
    "deploy": [Target("group_resolve_exact", ">=", 1),
               Target("group_deploy_active", ">=", GROUP_DEVICES)],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS),
                        help="Run only this section (repeatable).")
    args = parser.parse_args(argv)
    chosen = args.only or list(SECTIONS)
    report = Report("fleet_scale", {"quick": args.quick, "sections": chosen, "devices": DEVICES})
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(Path(tmp), args.quick, report.figures, report.params)
        for name in chosen:
            t0 = time.perf_counter()
            SECTIONS[name](ctx)
            report.figures[f"{name}_section_s"] = round(time.perf_counter() - t0, 1)
            report.targets += TARGETS.get(name, [])
    report.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
