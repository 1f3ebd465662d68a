"""A simulated sensor: publishes a dataset's samples to a device's input stream at a steady
rate, and optionally scores the answers (matched by message id) for accuracy and latency.

One MQTT connection through `Transport`, with a unique client id and no persistent session: a
sensor run is a one-off, and a leftover session would make the broker queue results for nobody.
Everything runs on the caller's thread except paho's callbacks, which only timestamp and queue
what arrives (a slow callback starves keepalive); the bookkeeping happens between publishes.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import msgspec
import numpy as np

from device_agents import protocol
from device_agents.config import STREAM, BrokerConfig
from device_agents.errors import DeviceAgentError
from device_agents.sensors.datasets import Dataset
from device_agents.transport import Message, Transport

ENCODINGS: Final = ("lists", "b64")
WINDOW: Final = 64  # messages handed to paho but not yet to the broker (= Transport's max_inflight)
# Messages awaiting their answer, at most. A broker queues a bounded number of QoS 1 messages for
# a subscriber that lags (Mosquitto: max_queued_messages 1000) and drops the rest; a burst of
# results arriving while this process is busy publishing would be counted as lost.
MAX_UNANSWERED: Final = 500
_STREAM_RE: Final = re.compile(STREAM)
_decoder = msgspec.json.Decoder()


class SensorError(DeviceAgentError):
    """The simulation cannot run: bad settings, or the broker is unreachable or went away."""


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot while running, for progress bars (counts so far)."""

    count: int
    sent: int
    answered: int
    errors: int
    accuracy: float | None
    p50_ms: float | None
    version: str | None  # the model version of the latest answer


@dataclass(slots=True)
class Summary:
    """What a run did. answered/errors/lost/duplicates are None when results were not awaited."""

    device: str
    stream: str
    dataset: str
    count: int
    rate_hz: float
    qos: int
    encoding: str
    sent: int
    seconds: float  # from the first publish to the last
    unconfirmed: int  # publishes the client could not hand to the broker (QoS 1: no PUBACK)
    reconnects: int
    interrupted: bool = False  # Ctrl-C: sending stopped early, answers were not waited for
    answered: int | None = None
    errors: int | None = None
    lost: int | None = None
    duplicates: int | None = None
    error_codes: dict[str, int] = field(default_factory=dict)
    accuracy: float | None = None
    accuracy_by_version: dict[str, float] = field(default_factory=dict)
    answered_by_version: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] | None = None  # p50 and p99, publish -> result received

    @property
    def achieved_rate_hz(self) -> float | None:
        return self.sent / self.seconds if self.seconds > 0 and self.sent > 1 else None

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        rate = self.achieved_rate_hz
        doc["achieved_rate_hz"] = None if rate is None else round(rate, 2)
        return doc


class _Tally:
    """Answers and errors by message id; duplicates (at-least-once delivery) count once."""

    def __init__(self) -> None:
        self.sent_at: dict[str, float] = {}
        self.truth: dict[str, str | None] = {}
        self.latency_s: dict[str, float] = {}  # id -> first result's round trip
        self.error_code: dict[str, str] = {}
        self.duplicates = 0
        self.correct = 0
        self.scored = 0
        self.by_version: dict[str, list[int]] = {}  # version -> [answers, scored, correct]
        self.last_version: str | None = None

    @property
    def resolved(self) -> int:
        return len(self.latency_s) + len(self.error_code)

    def on_result(self, doc: dict[str, Any], received: float) -> None:
        msg_id = doc.get("id")
        if msg_id not in self.sent_at:
            return  # another sensor's message on the same stream
        if msg_id in self.latency_s:
            self.duplicates += 1
            return
        self.error_code.pop(msg_id, None)  # an answer beats an earlier error report
        self.latency_s[msg_id] = received - self.sent_at[msg_id]
        model = doc.get("model")
        version = str(model.get("version")) if isinstance(model, dict) else "?"
        self.last_version = version
        counts = self.by_version.setdefault(version, [0, 0, 0])
        counts[0] += 1
        truth = self.truth.get(msg_id)
        predicted = _predicted(doc)
        if truth is not None and predicted is not None:
            hit = int(predicted == truth)
            self.scored += 1
            self.correct += hit
            counts[1] += 1
            counts[2] += hit

    def on_error(self, doc: dict[str, Any]) -> None:
        msg_id = doc.get("id")
        if msg_id not in self.sent_at:
            return
        if msg_id in self.latency_s or msg_id in self.error_code:
            self.duplicates += 1
            return
        self.error_code[msg_id] = str(doc.get("code"))


def _predicted(doc: dict[str, Any]) -> str | None:
    """The result's label; for a model without labels, the index of the first output's max."""
    label = doc.get("label")
    if label is not None:
        return str(label)
    outputs = doc.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        return None
    try:
        first = np.asarray(next(iter(outputs.values())), dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return str(int(np.argmax(first.reshape(-1)))) if first.size else None


class SensorSimulator:
    """Publish `count` samples of `dataset` to `edgefleet/v1/{device}/in/{stream}` at `rate_hz`
    (0: as fast as possible), cycling through the dataset; `run()` returns a `Summary`.

    With `wait_results`, the device's `out/{stream}` and `error` topics are subscribed before
    the first publish, and `run()` waits up to `timeout` seconds after the last publish for the
    answers still missing. `on_progress` is called on the caller's thread about every
    `progress_interval_s` (the demo uses it to act mid-stream).
    """

    def __init__(self, broker: BrokerConfig, device: str, stream: str, dataset: Dataset, *,
                 rate_hz: float = 10.0, count: int = 100, qos: int = 1,
                 wait_results: bool = False, timeout: float = 30.0, encoding: str = "lists",
                 connect_timeout: float = 10.0,
                 on_progress: Callable[[Progress], None] | None = None,
                 progress_interval_s: float = 0.1) -> None:
        problems = _check(device, stream, rate_hz, count, qos, timeout, encoding, connect_timeout)
        if problems:
            raise SensorError("; ".join(problems))
        # no persistent session, whatever the caller's config says (see the module docstring)
        self.broker = msgspec.structs.replace(broker, session_expiry_s=0)
        self.device, self.stream, self.dataset = device, stream, dataset
        self.rate_hz, self.count, self.qos = float(rate_hz), count, qos
        self.wait_results, self.timeout, self.encoding = wait_results, timeout, encoding
        self.connect_timeout = connect_timeout
        self.on_progress = on_progress
        self.progress_interval_s = progress_interval_s
        self.run_id = uuid.uuid4().hex[:8]
        self.topics = protocol.Topics(device)
        self._inbox: queue.SimpleQueue[tuple[float, str, bytes]] = queue.SimpleQueue()
        self._ready = threading.Event()  # connected, and our SUBSCRIBEs are on the wire
        self._confirmed = 0
        self._dropped = 0  # QoS 0 messages published into a dead connection
        self._confirm = threading.Condition()
        self._tally = _Tally()
        self._open: dict[str, float] = {}  # unanswered id -> publish time, oldest first
        self._next_progress = 0.0

    # -- paho's network thread: timestamp, queue, return ---------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        self._ready.set()

    def _on_disconnect(self, reason: str) -> None:
        self._ready.clear()

    def _on_message(self, msg: Message) -> None:
        self._inbox.put((time.perf_counter(), msg.topic, msg.payload))

    def _on_published(self, mid: int) -> None:
        # paho reports QoS 0 messages when written to the socket, QoS 1 at PUBACK
        with self._confirm:
            self._confirmed += 1
            self._confirm.notify_all()

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> Summary:
        subscriptions = [self.topics.output(self.stream), self.topics.error] if self.wait_results \
            else []
        transport = Transport(self.broker, f"edgefleet-sensor-{self.run_id}",
                              subscriptions=subscriptions, on_connect=self._on_connect,
                              on_disconnect=self._on_disconnect, on_message=self._on_message,
                              on_published=self._on_published, max_inflight=WINDOW)
        transport.start()
        interrupted = False
        try:
            self._connect(transport)
            started = time.perf_counter()
            try:
                for i in range(self.count):
                    if self.rate_hz > 0:
                        self._idle_until(started + i / self.rate_hz)
                    else:
                        self._drain()
                    self._publish(transport, i)
            except KeyboardInterrupt:  # the operator stopped early: report what was done
                interrupted = True
            seconds = time.perf_counter() - started
            try:
                self._finish(time.monotonic() + (1.0 if interrupted else self.timeout))
            except KeyboardInterrupt:
                interrupted = True
        finally:
            transport.stop()
        summary = self._summary(seconds, max(0, transport.connects - 1))
        summary.interrupted = interrupted
        return summary

    def _connect(self, transport: Transport) -> None:
        # `_ready` rather than `wait_connected`: the transport sends our SUBSCRIBEs just before
        # calling on_connect, so a PUBLISH can never overtake them (and the broker handles one
        # client's packets in order: the answer to the first message finds us subscribed).
        if self._ready.wait(self.connect_timeout):
            return
        transport.stop(1)
        reason = transport.last_error or (f"cannot connect to the broker at {self.broker.url} "
                                          f"within {self.connect_timeout:g} s")
        raise SensorError(f"{reason} (is the broker running? check --broker)")

    def _publish(self, transport: Transport, i: int) -> None:
        if not self._ready.is_set() and not self._ready.wait(self.timeout):
            raise SensorError(f"lost the connection to {self.broker.url} after {i} message(s); "
                              f"it did not come back within {self.timeout:g} s")
        if self.wait_results:
            self._wait_answers()
        self._wait_window(i)
        sample, truth = self.dataset.sample(i)
        msg_id = f"{self.run_id}-{i}"
        data = protocol.encode_tensor(sample) if self.encoding == "b64" else sample.tolist()
        payload = protocol.encode({"id": msg_id, "ts": protocol.now(), "data": data})
        self._tally.truth[msg_id] = truth
        self._tally.sent_at[msg_id] = time.perf_counter()
        if self.wait_results:
            self._open[msg_id] = self._tally.sent_at[msg_id]
        if transport.publish(self.topics.input(self.stream), payload, qos=self.qos) is None:
            raise SensorError(f"the MQTT client refused message {i} ({len(payload)} bytes)")
        if self.qos == 0 and not transport.connected:
            with self._confirm:  # paho drops a QoS 0 message it cannot write: no on_published
                self._dropped += 1

    def _wait_answers(self) -> None:
        """Hold back while MAX_UNANSWERED messages await an answer; a message unanswered for
        `timeout` seconds stops counting (it is lost, and must not stall the run)."""
        while True:
            now = time.perf_counter()
            while self._open and now - next(iter(self._open.values())) > self.timeout:
                del self._open[next(iter(self._open))]
            if len(self._open) < MAX_UNANSWERED:
                return
            self._maybe_progress()
            with contextlib.suppress(queue.Empty):
                self._handle(*self._inbox.get(timeout=self.progress_interval_s))

    def _wait_window(self, i: int) -> None:
        """At most WINDOW messages on their way: beyond paho's inflight limit it would only
        queue them in memory, and `--rate 0` would measure that queue instead of the broker."""
        with self._confirm:
            if self._confirm.wait_for(lambda: i - self._confirmed - self._dropped < WINDOW,
                                      self.timeout):
                return
        raise SensorError(f"the broker at {self.broker.url} took none of the last {WINDOW} "
                          f"messages within {self.timeout:g} s (after {i} sent)")

    def _idle_until(self, due: float) -> None:
        """Handle what arrives until `due` (perf_counter time): the pacing sleep does the work."""
        while True:
            self._maybe_progress()
            wait = due - time.perf_counter()
            if wait <= 0:
                self._drain()
                return
            with contextlib.suppress(queue.Empty):
                self._handle(*self._inbox.get(timeout=min(wait, self.progress_interval_s)))

    def _drain(self) -> None:
        self._maybe_progress()
        while True:
            try:
                self._handle(*self._inbox.get_nowait())
            except queue.Empty:
                return

    def _finish(self, deadline: float) -> None:
        """Wait for the broker to take every message, and for the answers when asked to."""
        while True:
            self._drain()
            with self._confirm:
                handed_over = self._confirmed + self._dropped >= len(self._tally.sent_at)
            answered = not self.wait_results or self._tally.resolved >= len(self._tally.sent_at)
            remaining = deadline - time.monotonic()
            if (handed_over and answered) or remaining <= 0:
                self._maybe_progress(force=True)
                return
            with contextlib.suppress(queue.Empty):
                self._handle(*self._inbox.get(timeout=min(remaining, self.progress_interval_s)))

    def _handle(self, received: float, topic: str, payload: bytes) -> None:
        try:
            doc = _decoder.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            return  # not an answer to us: every id we send is a string
        self._open.pop(doc["id"], None)
        if topic == self.topics.error:
            self._tally.on_error(doc)
        else:
            self._tally.on_result(doc, received)

    def _maybe_progress(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.perf_counter()
        if not force and now < self._next_progress:
            return
        self._next_progress = now + self.progress_interval_s
        t = self._tally
        recent = list(t.latency_s.values())[-500:]
        self.on_progress(Progress(
            count=self.count, sent=len(t.sent_at), answered=len(t.latency_s),
            errors=len(t.error_code), accuracy=t.correct / t.scored if t.scored else None,
            p50_ms=float(np.median(recent)) * 1000 if recent else None, version=t.last_version))

    def _summary(self, seconds: float, reconnects: int) -> Summary:
        t = self._tally
        sent = len(t.sent_at)
        with self._confirm:
            unconfirmed = max(0, sent - self._confirmed)
        summary = Summary(self.device, self.stream, self.dataset.name, self.count, self.rate_hz,
                          self.qos, self.encoding, sent, round(seconds, 3), unconfirmed, reconnects)
        if not self.wait_results:
            return summary
        summary.answered, summary.errors = len(t.latency_s), len(t.error_code)
        summary.lost = sent - summary.answered - summary.errors
        summary.duplicates = t.duplicates
        for code in t.error_code.values():
            summary.error_codes[code] = summary.error_codes.get(code, 0) + 1
        if t.scored:
            summary.accuracy = round(t.correct / t.scored, 4)
        for version, (answers, scored, correct) in sorted(t.by_version.items()):
            summary.answered_by_version[version] = answers
            if scored:
                summary.accuracy_by_version[version] = round(correct / scored, 4)
        if t.latency_s:
            ms = np.fromiter(t.latency_s.values(), dtype=np.float64) * 1000
            summary.latency_ms = {"p50": round(float(np.percentile(ms, 50)), 3),
                                  "p99": round(float(np.percentile(ms, 99)), 3)}
        return summary


def _check(device: str, stream: str, rate_hz: float, count: int, qos: int, timeout: float,
           encoding: str, connect_timeout: float) -> list[str]:
    """Every problem with the settings at once, each naming the option to fix."""
    problems = []
    if not protocol.NAME_RE.match(device):
        problems.append(f"--device {device!r} is not a device id (letters, digits, _ . -; "
                        "at most 64)")
    if not _STREAM_RE.match(stream):
        problems.append(f"--stream {stream!r} is not a stream name (letters, digits, _ . -)")
    if not rate_hz >= 0:  # also refuses NaN
        problems.append(f"--rate must be 0 (as fast as possible) or more Hz, got {rate_hz}")
    if count < 1:
        problems.append(f"--count must be at least 1, got {count}")
    if qos not in (0, 1):
        problems.append(f"--qos must be 0 or 1, got {qos}")
    if not timeout >= 0:
        problems.append(f"--timeout must be 0 or more seconds, got {timeout}")
    if not connect_timeout > 0:
        problems.append(f"--connect-timeout must be more than 0 seconds, got {connect_timeout}")
    if encoding not in ENCODINGS:
        problems.append(f"--encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    return problems
