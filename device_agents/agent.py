"""The edge agent: wiring and lifecycle.

Data flows one way: transport (paho thread) -> intake queue -> intake worker (parse, route,
submit) -> batcher callback (build the answer) -> disk outbox -> publisher -> transport. A QoS 1
message is acknowledged to the broker only when its answer is durable, in arrival order (acks),
so a crash at any point leaves it either answered on disk or still held by the broker.

The agent's threads (each guarded: an unexpected exception is logged with its traceback and the
worker restarted, or the process ends with exit code 70 for systemd to restart; see supervise):

| thread | owns | may call |
|---|---|---|
| `edgefleet-mqtt-{id}` (paho) | a connection | `_on_message` (offers only), acks, publisher.on_published |
| `edgefleet-intake` | intake queue, result seq | parser, batcher.submit/run_queued, outbox.put |
| `edgefleet-batcher-*` (runtime) | a model's batch queue | onnxruntime, the answer callbacks (outbox.put) |
| `edgefleet-outbox` | the SQLite writer | its commit callbacks: publisher.after_commit, acks.done |
| `edgefleet-publisher` | the publish window | outbox.take/ack, transport.publish |
| `edgefleet-requests` | request queue | router handlers, outbox.put (responses) |
| `edgefleet-delivery` | deliveries in progress | chunk store, model store, inference.activate |
| `edgefleet-telemetry` | the telemetry timer | transport.publish (QoS 0), heap trim |
| `edgefleet-watchdog` | systemd notifications | supervisor.healthy |
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from device_agents import protocol, requests
from device_agents.acks import AckSequencer
from device_agents.chunks import CHUNK_MAX, ChunkStore
from device_agents.commands import CommandGuard, open_ledger
from device_agents.config import AgentConfig
from device_agents.delivery import DeliveryManager
from device_agents.durable import write_atomic
from device_agents.health import ProcessStats, release_free_heap
from device_agents.inference import InferenceService
from device_agents.intake import Intake
from device_agents.outbox import Outbox
from device_agents.protocol import Topics
from device_agents.publisher import PUBLISH_WINDOW, Publisher
from device_agents.quarantine import check_data_dir
from device_agents.requests import RequestWorker
from device_agents.router import Router
from device_agents.store import ModelStore
from device_agents.supervise import Supervisor, SystemdNotifier, Watchdog
from device_agents.transport import HEADROOM, Message, Transport
from runtime.errors import EdgefleetError
from runtime.signing import load_public_key

log = logging.getLogger("edgefleet.agent")

AGENT_VERSION = "edgefleet-agent/0.1"
SENSORS_READY_S = 30.0  # longest "online" waits for a sensor broker of its own to take the SUBSCRIBE
HEAP_TRIM_S = 1.0  # how often freed heap is handed back to the OS (cheap: see health)
BEAT_S = 30.0  # a worker that has not beaten for this long is stalled (see supervise)
# A message unanswered this long holds every acknowledgement behind it: whatever the cause, the
# watchdog stops pinging, systemd restarts the agent, and the broker delivers the message again.
ACK_STALL_S = 300.0
PAHO_QUEUE = 4 * PUBLISH_WINDOW  # paho's own queue: rows wait in the outbox, not in memory


class Agent:
    def __init__(self, config: AgentConfig, supervisor: Supervisor | None = None) -> None:
        self.config = config
        self.topics = Topics(config.device_id)
        self.data_dir = config.data_path
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # before anything opens them: an unreadable file is moved aside, never a crash loop
        self.quarantined = check_data_dir(self.data_dir)
        self.faults: list[dict[str, Any]] = [
            {"type": "quarantined", "file": q.path, "moved_to": q.moved_to, "reason": q.reason}
            for q in self.quarantined]
        self.epoch, self.run = _next_epoch(self.data_dir / "state.json")
        self.process = ProcessStats()
        self.counters: Counter[str] = Counter()
        self.supervisor = supervisor or Supervisor("agent")
        self._stopping = threading.Event()
        self._fault_lock = threading.Lock()
        self._storage_fault: dict[str, Any] | None = None  # since the disk refused an answer
        ob = config.outbox
        self.outbox = Outbox(self.data_dir / "outbox.db", max_bytes=ob.max_bytes, ttl_s=ob.ttl_s,
                             on_full=ob.on_full)  # on_commit: set once the uplink exists
        keys = [load_public_key(Path(p)) for p in config.security.trusted_keys]
        self.store = ModelStore(self.data_dir / "models", keys, config.security.require_signed)
        self.inference = InferenceService(config.runtime, config.agent.max_queue)
        self.chunks = ChunkStore(self.data_dir / "chunks")
        self.streams: dict[str, list[str] | None] = {}
        self._install_configured_models()
        self._load_active_models()
        for fault in self.faults:  # published once connected; they wait in the outbox
            kind = fault["type"]
            self.outbox.put(self.topics.event, protocol.event(
                kind, **{k: v for k, v in fault.items() if k != "type"}), qos=1)

        limits = config.agent
        # a packet the broker may send us: the largest payload we take (a delivery chunk at
        # least), with room for its topic and properties. It is enforced while reading (a larger
        # PUBLISH is answered from its head, its body dropped unread into memory) and not
        # announced as MQTT 5's Maximum Packet Size: Mosquitto 2.0.11 (Debian 12) drops an
        # oversize QoS 1 message but keeps it in the client's inflight window, so with
        # max_inflight_messages 1 nothing more ever reaches the agent (tests/device_agents/
        # test_poison.py), and each such message costs a slot of the default 20.
        max_packet = max(limits.max_payload_bytes, CHUNK_MAX) + HEADROOM
        shared = config.sensors is None
        self.uplink = Transport(
            config.uplink, config.device_id,
            subscriptions=[self.topics.requests] + ([self.topics.inputs] if shared else []),
            will=(self.topics.status, protocol.offline(self.epoch)), manual_ack=True,
            max_inflight=PUBLISH_WINDOW, max_packet_bytes=max_packet, announce_max_packet=False,
            max_queued=PAHO_QUEUE,
            on_connect=self._uplink_connected,
            on_disconnect=lambda reason: self._on_disconnect(self.uplink),
            on_message=self._on_message, on_published=lambda mid: self.publisher.on_published(mid),
            on_refused=lambda mid, reason: self.publisher.on_refused(mid, reason))
        self.sensors = self.uplink if shared else Transport(
            config.sensors, f"{config.device_id}-sensors",  # type: ignore[arg-type]
            subscriptions=[self.topics.inputs], manual_ack=True, max_packet_bytes=max_packet,
            announce_max_packet=False, max_queued=PAHO_QUEUE, on_connect=lambda present: None,
            on_disconnect=lambda reason: self._on_disconnect(self.sensors),
            on_message=self._on_message, on_subscribed=self._sensors_ready)
        self._birth_lock = threading.Lock()
        self._birth_waiting = False
        self.sensor_acks = AckSequencer(self.sensors)
        self.uplink_acks = self.sensor_acks if shared else AckSequencer(self.uplink)
        self.publisher = Publisher(self.outbox, self.uplink, self.topics,
                                   beat=lambda: self.supervisor.beat("publisher"))
        self.intake = Intake(config, self.topics, self.inference, self.outbox, self.epoch,
                             self.counters, handled=self._handled, unstored=self._unstored,
                             beat=lambda: self.supervisor.beat("intake"), fits=self.uplink.fits,
                             run=self.run)
        self.router = Router()
        requests.add_agent_requests(self.router, self)
        self.requests = RequestWorker(self.router, self.topics, self.outbox,
                                      limits.max_payload_bytes, handled=self._handled,
                                      unstored=self._unstored,
                                      beat=lambda: self.supervisor.beat("requests"),
                                      fits=self.uplink.fits, guard=self._command_guard())
        self.delivery = DeliveryManager(
            self.data_dir, self.store, self.chunks, self.inference, self.uplink, self.topics,
            publish_state=self._publish_model_state, streams_of=self.streams.get,
            on_models_changed=self._publish_birth, handled=self._handled)
        self.router.add("deploy", self.delivery.deploy)
        self.outbox.on_commit = self.publisher.after_commit  # the uplink exists now
        self.watchdog = Watchdog(self.supervisor, SystemdNotifier(), extra_check=self._problems)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        # A message crosses four threads (network, intake, batcher, outbox) on its way to a
        # result. With CPython's default 5 ms switch interval, each hop can wait that long for
        # the GIL behind a busy thread; 1 ms keeps hops short at a small cost in switching.
        sys.setswitchinterval(0.001)
        log.info("starting %s epoch %d with models %s", self.config.device_id, self.epoch,
                 [f"{m['name']}:{m['version']}" for m in self.inference.models_summary()])
        spawn = self.supervisor.spawn
        spawn("intake", self.intake.loop, heartbeat_s=BEAT_S)
        spawn("publisher", self.publisher.loop, heartbeat_s=BEAT_S)
        spawn("telemetry", self._telemetry_loop, heartbeat_s=BEAT_S)
        spawn("requests", self.requests.loop, heartbeat_s=BEAT_S)
        spawn("delivery", lambda: self.delivery.loop(lambda: self.supervisor.beat("delivery")),
              heartbeat_s=2 * BEAT_S)  # a step may assemble and self-test a large model
        self.delivery.start()  # resumes interrupted deliveries: their work goes to that worker
        self.uplink.start()
        if self.sensors is not self.uplink:
            self.sensors.start()
        self.watchdog.start()
        self.watchdog.ready()  # serving locally: the uplink may come later (or never, offline)

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop intake, finish accepted work, flush the outbox while connected, say offline."""
        log.info("stopping: finishing accepted messages and flushing the outbox")
        self._stopping.set()
        self.supervisor.stop()
        self.watchdog.stop()
        self.intake.stop()
        self.supervisor.join("intake", drain_timeout)
        self.inference.close()
        self.delivery.stop()
        self.outbox.flush(drain_timeout)
        deadline = time.monotonic() + drain_timeout
        while self.uplink.connected and self.outbox.stats().depth and time.monotonic() < deadline:
            self.publisher.wake()
            time.sleep(0.05)
        if self.uplink.connected:
            self.uplink.publish(self.topics.status, protocol.offline(self.epoch), qos=1,
                                retain=True)
            time.sleep(0.2)
        if self.sensors is not self.uplink:
            self.sensors.stop()
        self.uplink.stop()
        self.publisher.stop()
        self.requests.stop()
        for name in ("publisher", "telemetry", "requests", "delivery"):
            self.supervisor.join(name, 2)
        left = self.outbox.stats().depth
        self.outbox.close()
        log.info("stopped; %d messages left in the outbox for the next start", left)

    def _command_guard(self) -> CommandGuard:
        """Who this device obeys: the command keys, with replays refused across restarts."""
        security = self.config.security
        keys = [load_public_key(Path(p)) for p in security.command_keys]
        ledger = open_ledger(self.data_dir / "commands.db") if keys else None
        return CommandGuard(self.config.device_id, keys, security.commands_signed, ledger)

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopping.wait(timeout)

    def _problems(self) -> list[str]:
        """For the watchdog: the threads the supervisor does not run, alive."""
        if self._stopping.is_set():
            return []
        threads = {"uplink": self.uplink.thread, "sensors": self.sensors.thread,
                   "outbox writer": self.outbox.writer}
        problems = [f"{name} thread is not running" for name, thread in threads.items()
                    if thread is not None and not thread.is_alive()]
        for name, acks in (("sensor", self.sensor_acks), ("uplink", self.uplink_acks)):
            if acks.oldest_wait_s() > ACK_STALL_S:
                problems.append(f"{name} acknowledgements stalled: none for over "
                                f"{ACK_STALL_S:g} s while a message waits")
        return problems

    # -- models ------------------------------------------------------------------------------

    def _install_configured_models(self) -> None:
        for entry in self.config.models:
            installed = self.store.install(Path(entry.package))
            self.streams[installed.name] = entry.streams
            if not self.store.entry(installed.name).get("active"):
                self.store.activate(installed.name, installed.version)

    def _load_active_models(self) -> None:
        """Every active model into service. One that no longer loads (a damaged file, a key no
        longer trusted) gives way to its previous version, or is left out: the others serve."""
        for installed in self.store.active():
            try:
                model = self.inference.load(self.store.verify(installed.path))
            except EdgefleetError as exc:
                model = self._fall_back(installed.name, installed.version, str(exc))
                if model is None:
                    continue
            self.inference.activate(model, self.streams.get(installed.name))

    def _fall_back(self, name: str, version: str, reason: str) -> Any:
        """The previous version of a model whose active one does not load, or None."""
        previous = self.store.entry(name).get("previous")
        fault: dict[str, Any] = {"type": "model_unloadable", "model": name, "version": version,
                                 "reason": reason[:500], "fallback": None}
        self.faults.append(fault)
        if previous:
            try:
                model = self.inference.load(self.store.verify(self.store.path(name, previous)))
            except EdgefleetError as exc:
                log.error("%s %s does not load (%s), nor does %s (%s): %s is out of service",
                          name, version, reason, previous, exc, name)
                return None
            self.store.rollback(name)
            fault["fallback"] = previous
            log.error("%s %s does not load (%s): serving the previous version %s", name, version,
                      reason, previous)
            return model
        log.error("%s %s does not load (%s) and has no previous version: out of service", name,
                  version, reason)
        return None

    # -- paho's thread: hand over, never block -----------------------------------------------

    def _on_message(self, msg: Message) -> None:
        if self._stopping.is_set():
            return  # not acknowledged: the broker keeps it for the next start
        if msg.qos:  # acknowledgements go out in arrival order, whatever finishes first
            msg.token = self._acks_for(msg).register(msg)
        try:
            self._dispatch(msg)
        except Exception:  # it must still end, or every later acknowledgement waits for it
            log.exception("unexpected failure dispatching %s", msg.topic[:120])
            self.counters["dispatch_failed"] += 1
            self._handled(msg)

    def _dispatch(self, msg: Message) -> None:
        stream = self.topics.stream_of(msg.topic)
        if stream is not None:
            self.intake.offer(msg, stream)
        elif self.topics.command_of(msg.topic) is not None:
            self.requests.offer(msg)
        elif self.delivery.wants(msg.topic):
            self.delivery.receive(msg)
        else:
            self._handled(msg)

    def _acks_for(self, msg: Message) -> AckSequencer:
        """The order of the connection the message came on (not the one its topic suggests: a
        session kept from another configuration may bring sensor topics on the uplink)."""
        return self.sensor_acks if msg.via is self.sensors else self.uplink_acks

    def _handled(self, msg: Message) -> None:
        """The message is dealt with (answer durable, or refused for good): acknowledge it."""
        if msg.token is not None:
            self._acks_for(msg).done(msg.token)
        if self._storage_fault is not None:
            self._storage_recovered()

    def _storage_recovered(self) -> None:
        """The disk takes answers again after failing: say so once, on `event` (the event could
        not have been stored while it failed)."""
        with self._fault_lock:
            fault, self._storage_fault = self._storage_fault, None
        if fault is None:
            return
        lasted = time.monotonic() - fault["since"]
        log.warning("the disk takes answers again after %.1f s and %d refused writes", lasted,
                    fault["refused"])
        self.outbox.put(self.topics.event, protocol.event(
            "storage_recovered", refused=fault["refused"], lasted_s=round(lasted, 3)), qos=1)

    def _unstored(self, msg: Message) -> None:
        """Its answer could not be stored (the disk failed or fell behind): a QoS 1 message is
        not acknowledged, and its connection is dropped, so the broker delivers it again instead
        of every later acknowledgement waiting behind it. A QoS 0 message is never delivered
        again: it is counted, and the connection kept."""
        self.counters["unstored"] += 1
        with self._fault_lock:
            if self._storage_fault is None:
                self._storage_fault = {"since": time.monotonic(), "refused": 0}
            self._storage_fault["refused"] += 1
        if msg.qos:
            (msg.via or self.uplink).drop("an answer could not be stored; the broker will "
                                          "redeliver")

    def _on_disconnect(self, transport: Transport) -> None:
        (self.sensor_acks if transport is self.sensors else self.uplink_acks).reset()

    def _uplink_connected(self, session_present: bool) -> None:
        """Birth first, then the outbox: the fleet sees the device online before its backlog.

        "online" tells sensors they may send. With a sensor broker of its own, not before that
        connection holds its subscription: a broker without sessions (the embedded one) drops
        what comes earlier. Then the birth goes out from that SUBACK (`_sensors_ready`; at once
        for a resumed session), or after SENSORS_READY_S if the sensor broker stays away.
        Nothing here waits: this is paho's network thread.
        """
        if self.sensors is self.uplink:
            self._publish_birth()
        else:
            with self._birth_lock:
                self._birth_waiting = True
            if self.sensors.subscribed:  # already, or its SUBACK came in just now
                self._sensors_ready()
            else:
                timer = threading.Timer(SENSORS_READY_S, self._sensors_ready)
                timer.daemon = True
                timer.start()
        self.publisher.wake()

    def _sensors_ready(self) -> None:
        """The sensor connection holds its subscriptions (or SENSORS_READY_S passed): a birth
        waiting for them goes out now."""
        with self._birth_lock:
            due, self._birth_waiting = self._birth_waiting, False
        if due and self.uplink.connected:
            self._publish_birth()

    def _publish_birth(self) -> None:
        """The retained status: after every connect, and whenever the models in service change."""
        self.uplink.publish(self.topics.status, protocol.birth(
            self.epoch, AGENT_VERSION, self.config.groups, self.inference.models_summary()),
            qos=1, retain=True)

    def _publish_model_state(self, name: str, doc: dict[str, Any]) -> None:
        """model/{name}/state, retained, through the outbox: it survives outages and restarts."""
        self.outbox.put(self.topics.model_state(name), protocol.encode(doc), qos=1, retain=True)

    # -- telemetry ---------------------------------------------------------------------------

    def telemetry(self) -> dict[str, Any]:
        ob = self.outbox.stats()
        doc: dict[str, Any] = {
            "ts": protocol.now(), "uptime_s": round(self.process.uptime_s(), 3),
            "rss_bytes": self.process.rss_bytes(), "cpu_percent": self.process.cpu_percent(),
            "outbox": ob.as_telemetry(), "inference": dict(self.inference.metrics()),
            "epoch": self.epoch, "intake": {"received": self.counters["received"],
                                            "served": self.counters["served"],
                                            "queued": self.intake.queue.qsize(),
                                            "queued_bytes": self.intake.queue.bytes},
            "errors": {k.removeprefix("error_"): v for k, v in self.counters.items()
                       if k.startswith("error_")},
            "link": {"connected": self.uplink.connected, "connects": self.uplink.connects},
            "faults": {"dead_letters": self.publisher.dead_letters,
                       "unstored": self.counters["unstored"],
                       "outbox_refused": self.outbox.refused_pending,
                       "dispatch_failed": self.counters["dispatch_failed"],
                       "quarantined": len(self.quarantined),
                       "storage_failing": self._storage_fault is not None,
                       "model_fallbacks": sum(f["type"] == "model_unloadable" for f in self.faults),
                       "responses_refused": self.requests.refused,
                       "callback_errors": self.uplink.callback_errors
                       + (self.sensors.callback_errors if self.sensors is not self.uplink else 0),
                       "unacknowledged": self.sensor_acks.waiting()
                       + (self.uplink_acks.waiting() if self.uplink_acks is not self.sensor_acks
                          else 0)},
        }
        doc["outbox"]["dropped_by"] = ob.dropped_by
        doc["outbox"]["write_errors"] = ob.write_errors
        return doc

    def _telemetry_loop(self) -> None:
        """Telemetry every telemetry_interval_s; between, every HEAP_TRIM_S, the heap freed by
        the last burst goes back to the OS, so RSS comes down after a burst (see health)."""
        interval = self.config.agent.telemetry_interval_s
        due = time.monotonic() + interval
        while not self._stopping.wait(max(0.0, min(HEAP_TRIM_S, due - time.monotonic()))):
            self.supervisor.beat("telemetry")
            release_free_heap()
            if time.monotonic() < due:
                continue
            due = time.monotonic() + interval
            if self.uplink.connected:
                self.uplink.publish(self.topics.telemetry, protocol.encode(self.telemetry()), qos=0)


def _next_epoch(path: Path) -> tuple[int, str]:
    """Read, increase and persist the epoch (atomically, fsynced) before anything is served,
    with the run id: random, made once per data_dir (CONTRACT 5.3), so a wiped or re-flashed box
    whose epochs start again at 1 is still told apart from its earlier life."""
    epoch, run = 0, None
    if path.exists():
        try:
            doc = json.loads(path.read_text())
            epoch = int(doc.get("epoch", 0))
            run = doc.get("run") if isinstance(doc.get("run"), str) else None
        except (ValueError, OSError, AttributeError):
            log.warning("state file %s is unreadable; epochs restart above the outbox's", path)
    run = run or secrets.token_hex(8)
    epoch += 1
    write_atomic(path, json.dumps({"epoch": epoch, "run": run}).encode())
    return epoch, run
