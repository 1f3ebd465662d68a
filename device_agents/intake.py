"""Sensor messages in, answers out: parse, route, submit to the micro-batcher, and put the
result or the error in the outbox, where its durability acknowledges the message.

paho's network thread only `offer`s a message (never blocks: a full queue answers it as
overloaded at once). The intake worker parses and submits; the batcher's callback builds the
answer. Whatever a message holds, it ends in exactly one answer: a result, or one error on the
`error` topic (CONTRACT 5.3).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from device_agents import answers, protocol
from device_agents.config import AgentConfig
from device_agents.inference import InferenceService
from device_agents.outbox import Outbox
from device_agents.protocol import ProtocolError, Topics
from device_agents.queues import BudgetFull, ByteBudgetQueue
from device_agents.transport import Message
from runtime.batching import MicroBatcher, Pending
from runtime.errors import ClosedError

log = logging.getLogger("edgefleet.intake")

MESSAGE_OVERHEAD = 256  # bytes a queued message costs besides its payload and topic
IDLE_BEAT_S = 1.0  # an idle worker still shows it is alive this often (see supervise)


def message_size(msg: Message) -> int:
    """What a queued message costs: its payload, topic and MQTT 5 response properties."""
    return (len(msg.payload) + len(msg.topic) + len(msg.response_topic or "")
            + len(msg.correlation_data or b"") + MESSAGE_OVERHEAD)


class Intake:
    def __init__(self, config: AgentConfig, topics: Topics, inference: InferenceService,
                 outbox: Outbox, epoch: int, counters: Counter[str],
                 handled: Callable[[Message], None], unstored: Callable[[Message], None],
                 beat: Callable[[], None] = lambda: None,
                 fits: Callable[[str, bytes], bool] = lambda topic, payload: True,
                 run: str = "") -> None:
        self.limits = config.agent
        self.run = run  # this data_dir's random id, in every result
        self.topics, self.inference, self.outbox = topics, inference, outbox
        self.epoch, self.counters, self.beat = epoch, counters, beat
        self.handled = handled  # its answer is durable: acknowledge it
        self.unstored = unstored  # its answer could not be stored (a full disk)
        self.fits = fits  # whether the uplink's broker takes a message this size
        self.queue: ByteBudgetQueue[Message] = ByteBudgetQueue(
            config.agent.max_queue, config.agent.max_queue_bytes, message_size)
        self._seq = itertools.count(1)
        self._stopping = threading.Event()
        self._ident = 0  # the intake worker's thread, once it runs (see _to_outbox)

    # -- paho's thread: hand over, never block -----------------------------------------------

    def offer(self, msg: Message, stream: str) -> None:
        self.counters["received"] += 1
        if msg.oversize:
            self.error(msg, stream, protocol.BAD_PAYLOAD, f"message of {msg.oversize} bytes is "
                       f"over the {self.limits.max_payload_bytes}-byte limit")
            return
        try:
            self.queue.put_nowait(msg)
        except BudgetFull as exc:
            self.error(msg, stream, protocol.OVERLOADED, f"intake queue is full: {exc}",
                       protocol.peek_id(msg.payload, self.limits.max_payload_bytes))

    def stop(self) -> None:
        self._stopping.set()
        self.queue.put_nowait(None)  # wakes the worker, which drains what is queued, then ends

    # -- the intake worker -------------------------------------------------------------------

    def loop(self) -> None:
        """Serve what is queued; when the queue runs dry, run what the batchers were fed since,
        here: nothing more is coming now, so no batch waits for batch-mates (max_delay) in light
        traffic, and no batch is handed to the batcher's thread and back. Its results are then
        committed here too when the outbox's writer is idle: not handing them to the writer
        saves a thread switch and the wait for its commit in progress. A busy writer takes them
        instead: waiting for it stalled intake under a flood. Under load the queue does not run
        dry: full batches go to the batcher's thread, their results to the writer, and this one
        parses on."""
        self._ident = threading.get_ident()
        fed: set[MicroBatcher] = set()
        while True:
            self.beat()
            try:
                msg = self.queue.get_nowait()
            except queue.Empty:
                for batcher in fed:
                    batcher.run_queued()
                fed.clear()
                self.outbox.commit_deferred()
                try:
                    msg = self.queue.get(IDLE_BEAT_S)
                except queue.Empty:
                    if self._stopping.is_set():  # its wake-up was taken before the last message
                        return
                    continue
            if msg is None:
                if self._stopping.is_set() and self.queue.empty():
                    return  # stop() flushes the outbox: deferred results included
                continue
            if msg.stale:  # delivered again on the new connection: that copy is answered
                self.counters["stale_skipped"] += 1
                continue
            stream = self.topics.stream_of(msg.topic) or ""
            try:
                used = self._serve(msg, stream)
            except Exception as exc:  # one message never stops the worker, and still ends
                log.exception("unexpected failure handling %s", msg.topic[:120])
                self.error(msg, stream, protocol.BAD_PAYLOAD, f"could not be handled: {exc!r}")
                continue
            if used is not None:
                fed.add(used)

    def _serve(self, msg: Message, stream: str) -> MicroBatcher | None:
        """Parse and submit one sensor message; the batcher it went to, if any."""
        ts_in = time.time()
        try:
            sensor = protocol.parse_sensor(msg.payload, self.limits.max_payload_bytes)
        except ProtocolError as exc:  # echo the id when the message has a readable one
            self.error(msg, stream, exc.code, str(exc),
                       protocol.peek_id(msg.payload, self.limits.max_payload_bytes))
            return None
        if not protocol.STREAM_RE.match(stream):
            self.error(msg, stream, protocol.UNKNOWN_STREAM, f"stream name {stream[:80]!r} is not "
                       f"one of the contract ({protocol.STREAM_PATTERN})", sensor.id)
            return None
        batcher = self.inference.route(stream)
        if batcher is None:
            self.error(msg, stream, protocol.UNKNOWN_STREAM,
                       f"no model serves stream {stream!r}", sensor.id)
            return None
        pending = batcher.submit(sensor.inputs, wake=False)  # run_queued, when the queue is dry
        pending.add_done_callback(lambda p: self._answer(msg, stream, sensor.id, ts_in, p))
        return batcher

    def _answer(self, msg: Message, stream: str, msg_id: Any, ts_in: float, pending: Pending) -> None:
        """On the batcher's thread (or the intake worker's): the result or the error goes to the
        outbox. An answer that cannot be built (a model whose outputs cannot be scored or
        encoded) is the model's error, still one answer."""
        try:
            self._build_answer(msg, stream, msg_id, ts_in, pending)
        except Exception as exc:
            log.exception("the answer to %s could not be built", msg.topic[:120])
            if pending.exception(0) is None:  # the model answered: its answer is the fault
                pending.result(0).model.metrics.record_error()
            self.error(msg, stream, protocol.MODEL_ERROR, f"the model's answer could not be "
                       f"made into a result: {exc!r}", msg_id)

    def _build_answer(self, msg: Message, stream: str, msg_id: Any, ts_in: float,
                      pending: Pending) -> None:
        error = pending.exception(0)
        if error is not None:
            if isinstance(error, ClosedError):
                return  # shutting down: not acknowledged, redelivered at the next start
            self.error(msg, stream, answers.error_code(error), str(error), msg_id)
            return
        result = pending.result(0)
        model = result.model
        if answers.non_finite(result):
            model.metrics.record_error()  # counts against the version's health window
            self.error(msg, stream, protocol.MODEL_ERROR,
                       f"model {model.name} {model.version} produced NaN or Inf", msg_id)
            return
        topic = self.topics.output(stream)
        payload = answers.result_payload(result, msg_id=msg_id, stream=stream, seq=next(self._seq),
                                         epoch=self.epoch, run=self.run, ts_in=ts_in)
        if not self.fits(topic, payload):  # published, it would cost the connection, again and again
            self.error(msg, stream, protocol.MODEL_ERROR, f"the result ({len(payload)} bytes) is "
                       "over the broker's maximum packet size", msg_id)
            return
        self.counters["served"] += 1
        self._to_outbox(msg, topic, payload)

    def error(self, msg: Message, stream: str | None, code: str, message: str,
              msg_id: Any = None) -> None:
        self.counters[f"error_{code}"] += 1
        self._to_outbox(msg, self.topics.error, protocol.error_payload(msg_id, stream, code, message))

    def _to_outbox(self, msg: Message, topic: str, payload: bytes) -> None:
        """Put the answer in the outbox; the sensor message is acknowledged once it is durable.

        On the intake worker the put is deferred: the worker commits it when its queue runs dry
        (see loop). From any other thread (the batcher's, paho's) the writer takes it.
        """
        def durable(stored: bool) -> None:
            (self.handled if stored else self.unstored)(msg)

        self.outbox.put(topic, payload, qos=1, on_durable=durable,
                        defer=threading.get_ident() == self._ident, bounded=not msg.qos)
