"""The MQTT connection: the only module that imports paho.

One `Transport` is one MQTT 5 client with a persistent session, run by its own network thread
that reconnects with capped, jittered exponential backoff. paho's callbacks only hand work over
(to the agent's bounded intake queue, or to small bookkeeping) and never block: a slow callback
starves keepalive. Publishing is thread-safe; nothing is published by the agent before CONNACK
(callers check `connected`), and the Last Will is set before every connect.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agents import paho_socket, protocol
from device_agents.config import BrokerConfig
from device_agents.errors import DeviceAgentError

log = logging.getLogger("edgefleet.transport")

# A broker that accepted TCP (and TLS) but has not answered CONNECT by then never will: a
# 3.1.1-only broker that misread an MQTT 5 CONNECT, or a wedged one. Generous for NB-IoT.
CONNACK_TIMEOUT_S = 5.0
# The backoff starts over only after a connection lasted this long: a broker that drops the
# client right after CONNACK (an ACL, a second box with the same client id taking over the
# session) must not be answered with a reconnect every half second.
STABLE_S = 10.0
HEADROOM = 4096  # bytes of a packet besides its payload (topic, properties), at most


class TransportError(DeviceAgentError):
    """The broker settings cannot be used (TLS files, credentials)."""


class PublishRefusedError(DeviceAgentError):
    """A message no broker will ever take (a topic with wildcards or control characters, a
    payload over the limits): retrying it would hold back everything behind it."""


@dataclass(slots=True)
class Message:
    """A received message, with what is needed to answer and acknowledge it."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int  # which connection it came on: an ack is only valid on that one
    response_topic: str | None = None
    correlation_data: bytes | None = None
    token: int | None = None  # its place in the acknowledgement order (see acks.AckSequencer)
    oversize: int = 0  # its real size when over max_packet_bytes: payload holds only its head
    via: Transport | None = None  # the connection it came on: its ack goes back there

    @property
    def stale(self) -> bool:
        """A QoS 1 message of an earlier connection whose session the broker kept: it will be
        delivered again on the new one (and answered then), so work on this copy is wasted, or
        done twice (a rollback)."""
        via = self.via
        return bool(self.qos and via is not None
                    and via.session_since <= self.generation < via.generation)


class Backoff:
    """Capped exponential backoff with jitter (each wait is 50-100% of the capped step), so a
    fleet that lost its broker does not reconnect in lockstep."""

    def __init__(self, first_s: float = 0.5, cap_s: float = 30.0, rng: random.Random | None = None
                 ) -> None:
        self.first_s, self.cap_s = first_s, cap_s
        self.attempt = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        step = min(self.cap_s, self.first_s * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return float(step * self.rng.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.attempt = 0


class Transport:
    """One MQTT connection with a persistent session: MQTT 5, or 3.1.1 when the broker has no 5.

    Callbacks run on the network thread: on_connect(session_present), on_disconnect(reason),
    on_message(Message), on_published(mid), on_subscribed() (every SUBSCRIBE sent so far has its
    SUBACK). They must be quick.
    """

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        subscriptions: list[str] = (),  # type: ignore[assignment]
        will: tuple[str, bytes] | None = None,
        manual_ack: bool = False,
        max_inflight: int = 64,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        on_message: Callable[[Message], None] | None = None,
        on_published: Callable[[int], None] | None = None,
        on_refused: Callable[[int, str], None] | None = None,
        on_subscribed: Callable[[], None] | None = None,
        backoff: Backoff | None = None,
        max_packet_bytes: int = 0,
        announce_max_packet: bool = True,
        max_queued: int = 0,
        quiet_first_connect: bool = False,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self._subscribe_later: set[str] = set()  # changes made while disconnected
        self._unsubscribe_later: set[str] = set()
        self._sub_lock = threading.Lock()
        self._unconfirmed: dict[int, list[str]] = {}  # SUBSCRIBE mid -> topics, until SUBACK
        self._early_subacks: set[int] = set()
        self.backoff = backoff or Backoff()
        self.generation = 0
        self.connects = 0
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_message = on_message
        self._on_published = on_published
        self._on_refused = on_refused  # a PUBACK with a failure reason (MQTT 5); else on_published
        self._on_subscribed = on_subscribed
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first = True
        self._downgrade = False
        self._connack_seen = False
        self.last_error: str | None = None
        self.manual_ack = manual_ack
        self.max_inflight = max_inflight
        self.max_packet_bytes = max_packet_bytes  # 0: no limit; else enforced while reading
        self.announce_max_packet = announce_max_packet  # and told to MQTT 5 brokers at CONNECT
        # a command-line tool reports a failed first connection itself, in one line: the
        # transport logs errors only once it has been connected
        self.quiet_first_connect = quiet_first_connect
        self.max_queued = max_queued  # paho's own queue of outgoing messages; 0: unbounded
        self.callback_errors = 0
        self.session_present = False  # of the latest connection
        # the connection the broker's current session began on (0: before this process): what
        # came on it or later is delivered again if not acknowledged
        self.session_since = 0
        self.peer_max_packet = 0  # the broker's Maximum Packet Size (MQTT 5 CONNACK); 0: none
        self._connected_at = 0.0
        self._will = will
        self.protocol = mqtt.MQTTv5
        self._client = self._build_client(mqtt.MQTTv5)

    def _build_client(self, protocol: MQTTProtocolVersion, *, probe: bool = False
                      ) -> mqtt.Client:
        """A paho client for one protocol version: MQTT 5, or 3.1.1 for a broker without 5.
        A probe has no Will and no callbacks (see _refuses_mqtt5)."""
        broker = self.broker
        client_id = f"{self.client_id}-probe" if probe else self.client_id
        if protocol == mqtt.MQTTv5:
            client = paho_socket.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                        protocol=mqtt.MQTTv5,
                                        max_packet_bytes=self.max_packet_bytes)
        else:  # 3.1.1 has no session expiry: a persistent session is kept until cleaned
            client = paho_socket.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                        protocol=protocol,
                                        clean_session=broker.session_expiry_s == 0,
                                        max_packet_bytes=self.max_packet_bytes)
        client.manual_ack_set(self.manual_ack)
        client.max_inflight_messages_set(self.max_inflight)
        client.max_queued_messages_set(self.max_queued)
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password())
        if broker.tls:
            try:
                client.tls_set(ca_certs=str(broker.ca_file) if broker.ca_file else None,
                               certfile=str(broker.cert_file) if broker.cert_file else None,
                               keyfile=str(broker.key_file) if broker.key_file else None,
                               cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"TLS setup for {broker.url} failed: {exc}") from exc
        client.on_socket_open = _no_delay
        if probe:
            return client
        if self._will is not None:
            client.will_set(self._will[0], self._will[1], qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        return client

    def _fall_back_to_311(self) -> None:
        """The next connect speaks MQTT 3.1.1 (see _connect_once)."""
        log.info("%s does not speak MQTT 5; using MQTT 3.1.1", self.broker.url)
        self._downgrade = True

    def _refuses_mqtt5(self) -> bool:
        """Whether the broker answers a bare MQTT 5 CONNECT with 'unsupported protocol version'.

        Asked when an MQTT 5 connection closed before its CONNACK: a 3.1.1-only broker may
        misread a CONNECT carrying a Will and properties and just hang up (amqtt does), while a
        bare CONNECT gets a clear refusal. A flaky link gets False, so it never downgrades us.

        Only an anonymous connection probes: a broker that names clients by their identity
        (Mosquitto's `use_username_as_clientid`, as `edgefleet pki mosquitto` configures it)
        would give the probe this client's own id, and its clean start would wipe the session
        the broker keeps for us, with every message queued in it.
        """
        if self.broker.username is not None or self.broker.cert_file is not None:
            return False
        answer: list[str] = []
        probe = self._build_client(mqtt.MQTTv5, probe=True)
        probe.on_connect = lambda c, u, f, reason, p: answer.append(str(reason))
        try:
            probe.connect(self.broker.host, self.broker.port, 10, clean_start=True)
            deadline = time.monotonic() + 5
            while not answer and time.monotonic() < deadline:
                if probe.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            with contextlib.suppress(Exception):
                probe.disconnect()
                probe.loop(timeout=0.05)
        except (OSError, ssl.SSLError, ValueError):
            return False
        return answer == ["Unsupported protocol version"]

    @property
    def thread(self) -> threading.Thread | None:
        """The network thread, once started."""
        return self._thread

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"edgefleet-mqtt-{self.client_id}",
                                        daemon=True)
        self._thread.start()

    def set_will(self, topic: str, payload: bytes) -> None:
        """Change the Last Will; it takes effect at the next connect."""
        self._will = (topic, payload)
        self._client.will_set(topic, payload, qos=1, retain=True)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: dict[str, Any] | None = None) -> int | None:
        """Queue a message; returns its mid (for QoS 1, matched by on_published), or None when
        it cannot go now (paho's queue is full). Raises PublishRefusedError for a message that
        can never go: paho raises ValueError for some, and Mosquitto disconnects a client that
        publishes others (control characters in the topic), which a reconnecting agent would
        publish again."""
        try:
            protocol.check_publish_topic(topic)
        except protocol.ProtocolError as exc:
            raise PublishRefusedError(str(exc)) from None
        if not self.fits(topic, payload):  # the broker would drop the connection for it
            raise PublishRefusedError(f"a message of {len(payload)} bytes is over the broker's "
                                      f"maximum packet size ({self.peer_max_packet} bytes)")
        props = None
        if properties and self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            for key, value in properties.items():
                setattr(props, key, value)
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except ValueError as exc:  # paho's checks: topic, payload size, properties
            raise PublishRefusedError(f"paho refused a message to {topic[:80]!r}: {exc}") from None
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return None
        return info.mid

    def ack(self, mid: int, qos: int, generation: int) -> None:
        """Acknowledge a received QoS 1 message (manual ack), if its connection is still up;
        otherwise the broker redelivers it, which is what at-least-once wants."""
        if qos > 0 and generation == self.generation and self.connected:
            self._client.ack(mid, qos)

    def subscribe(self, topics: list[str]) -> None:
        """Subscribe now, or at the next connect if the link is down."""
        with self._sub_lock:
            new = [t for t in topics if t not in self.subscriptions]
            self.subscriptions += new
            self._unsubscribe_later.difference_update(new)
            if not new:
                return
            if not self.connected:
                self._subscribe_later.update(new)
                return
        self._send_subscribe(new)

    def _send_subscribe(self, topics: list[str]) -> None:
        """SUBSCRIBE, remembered until its SUBACK: one lost with a dying connection (sent into a
        dead link before keepalive noticed) is sent again after the reconnect."""
        for i in range(0, len(topics), 100):
            part = topics[i:i + 100]
            _, mid = self._client.subscribe([(t, 1) for t in part])  # never under _sub_lock
            if mid is None:
                continue
            with self._sub_lock:
                if mid not in self._early_subacks:
                    self._unconfirmed[mid] = part
                    continue
                self._early_subacks.discard(mid)  # the SUBACK beat us here
                settled = self._settled()
            if settled:
                self._all_subscribed()

    @property
    def subscribed(self) -> bool:
        """Connected, and every SUBSCRIBE sent has its SUBACK: on a new session a message
        published before that is not routed here."""
        with self._sub_lock:
            return self.connected and self._settled()

    def _settled(self) -> bool:  # under _sub_lock
        return not self._unconfirmed and not self._subscribe_later

    def _all_subscribed(self) -> None:
        """The last SUBACK awaited is in (decided under the lock that matched it, so only one
        caller sees it), or a resumed session needed none: tell on_subscribed."""
        if self._on_subscribed is not None:
            self._guarded("on_subscribed", self._on_subscribed)

    def _guarded(self, name: str, callback: Callable[..., None], *args: Any) -> None:
        """Run one of the owner's callbacks on the network thread: whatever it raises is logged
        with its traceback and counted, and the network thread goes on (paho would otherwise
        raise it out of its loop)."""
        try:
            callback(*args)
        except Exception:
            self.callback_errors += 1
            log.exception("%s callback failed on the MQTT network thread of %s", name,
                          self.client_id)

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """Wait until `subscribed`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.subscribed:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def unsubscribe(self, topics: list[str]) -> None:
        with self._sub_lock:
            gone = [t for t in topics if t in self.subscriptions]
            for t in gone:
                self.subscriptions.remove(t)
            self._subscribe_later.difference_update(gone)
            if not gone:
                return
            if not self.connected:
                self._unsubscribe_later.update(gone)
                return
        self._client.unsubscribe(gone)

    def fits(self, topic: str, payload: bytes) -> bool:
        """Whether a PUBLISH of this topic and payload is within the broker's Maximum Packet
        Size (with room for the fixed header, packet id and properties)."""
        limit = self.peer_max_packet
        return not limit or len(payload) + len(topic.encode()) + HEADROOM <= limit

    def drop(self, reason: str) -> None:
        """Close the connection now (it reconnects after the backoff): for an answer that could
        not be made durable, so the broker redelivers its message instead of the acknowledgement
        order waiting for it forever."""
        log.warning("dropping the connection to %s: %s", self.broker.url, reason)
        with contextlib.suppress(Exception):
            self._client.disconnect()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        self._stop.set()
        if self.connected:
            self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the network thread ------------------------------------------------------------------

    def _run(self) -> None:
        """The network thread. Nothing escapes it: paho raises out of `loop` on a broken
        packet (struct.error) and on whatever a callback raised; each becomes a logged
        reconnect, never a thread that ended while the process looks fine."""
        while not self._stop.is_set():
            try:
                self._run_once()
            except Exception:
                log.exception("MQTT network thread for %s failed; reconnecting", self.broker.url)
                self._connected_at = 0.0  # a connection that failed is no stable one
                self._client_died()
                self._stop.wait(self.backoff.next())
        # flush the DISCONNECT written by stop()
        for _ in range(5):
            try:
                if self._client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            except Exception:
                break

    def _client_died(self) -> None:
        if self._connected.is_set():
            self._handle_disconnect(self._client, None, None, "network thread failed", None)
        with contextlib.suppress(Exception):
            sock = self._client.socket()
            if sock is not None:
                sock.close()

    def _run_once(self) -> None:
        """One connection: connect, loop until it ends, then wait the backoff."""
        try:
            self._connect_once()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._note_error(f"cannot connect to {self.broker.url}: {exc}")
            self._stop.wait(self.backoff.next())
            return
        client = self._client
        connecting_since, probed = time.monotonic(), False
        while not self._stop.is_set():
            rc = client.loop(timeout=0.2)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            waited = time.monotonic() - connecting_since
            if (not self._connack_seen and not probed and waited > 1.0
                    and self.protocol == mqtt.MQTTv5):
                probed = True  # a slow CONNACK: ask whether the broker speaks MQTT 5 at all
                if self._refuses_mqtt5():
                    self._fall_back_to_311()
                    with contextlib.suppress(Exception):
                        client.disconnect()
                    break
            if not self._connack_seen and waited > CONNACK_TIMEOUT_S:
                self._note_error(f"{self.broker.url} accepted the connection but sent no CONNACK "
                                 f"within {CONNACK_TIMEOUT_S:g} s")
                with contextlib.suppress(Exception):
                    client.disconnect()
                break
        if self._connected.is_set():  # paho did not call on_disconnect (e.g. socket error)
            self._handle_disconnect(client, None, None, "connection lost", None)
        elif (not self._connack_seen and not probed and not self._downgrade
              and self.protocol == mqtt.MQTTv5 and not self._stop.is_set()
              and self._refuses_mqtt5()):
            self._fall_back_to_311()
        if self._connected_at and time.monotonic() - self._connected_at >= STABLE_S:
            self.backoff.reset()  # it served a while: come back quickly
        self._connected_at = 0.0
        if not self._stop.is_set():
            self._stop.wait(self.backoff.next())

    def _connect_once(self) -> None:
        self._connack_seen = False
        if self._downgrade:  # the broker refused MQTT 5: speak 3.1.1 from now on
            self._downgrade = False
            self.protocol = mqtt.MQTTv311
            # paho's disconnect() sends nothing on a connection that never got its CONNACK and
            # leaves the socket open; closed later by the garbage collector, the broker would
            # end the session our new connection holds by then. Close it now.
            old = self._client.socket()
            if old is not None:
                with contextlib.suppress(OSError):
                    old.close()
            self._client = self._build_client(mqtt.MQTTv311)
            self._first = True
            self.backoff.reset()
        if self._first:
            if self.protocol == mqtt.MQTTv5:
                props = None  # no expiry is MQTT 5's default: a bare CONNECT
                announce = self.announce_max_packet and self.max_packet_bytes
                if self.broker.session_expiry_s or announce:
                    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    if self.broker.session_expiry_s:
                        props.SessionExpiryInterval = self.broker.session_expiry_s
                    if announce:  # the broker never sends a larger packet
                        props.MaximumPacketSize = self.max_packet_bytes
                self._client.connect(self.broker.host, self.broker.port, self.broker.keepalive_s,
                                     clean_start=not self.broker.session_expiry_s,
                                     properties=props)
            else:
                self._client.connect(self.broker.host, self.broker.port, self.broker.keepalive_s)
            self._first = False
        else:
            self._client.reconnect()

    def _note_error(self, message: str) -> None:
        if message != self.last_error and (self.connects or not self.quiet_first_connect):
            log.warning("%s", message)
        self.last_error = message

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                        properties: Any) -> None:
        self._connack_seen = True
        if reason.is_failure:
            if self.protocol == mqtt.MQTTv5 and reason == "Unsupported protocol version":
                # A 3.1.1-only broker (amqtt, older Mosquitto). Everything the agent needs works
                # over 3.1.1; MQTT 5 response topics and shared subscriptions do not.
                self._fall_back_to_311()
                client.disconnect()
                return
            self._note_error(f"{self.broker.url} refused the connection: {reason}")
            return
        self.session_present = bool(flags.session_present)
        limit = getattr(properties, "MaximumPacketSize", 0)
        self.peer_max_packet = limit if isinstance(limit, int) and limit > 0 else 0
        self.generation += 1
        if not self.session_present:  # a new session: nothing of the earlier ones comes again
            self.session_since = self.generation
        self.connects += 1
        self._connected_at = time.monotonic()  # the backoff resets once this lasted STABLE_S
        self.last_error = None
        # A new session: subscribe to everything. A resumed one still has its subscriptions and
        # the broker redelivers what was not acknowledged; subscribing again would also resend
        # every retained message (model chunks) a second time. Only the changes made while the
        # link was down are sent.
        with self._sub_lock:
            if flags.session_present:
                unconfirmed = {t for topics in self._unconfirmed.values() for t in topics}
                subscribe = [t for t in self.subscriptions
                             if t in self._subscribe_later or t in unconfirmed]
                unsubscribe = list(self._unsubscribe_later)
            else:
                subscribe, unsubscribe = list(self.subscriptions), []
            self._unconfirmed.clear()
            self._early_subacks.clear()
            self._subscribe_later.clear()
            self._unsubscribe_later.clear()
            self._connected.set()  # under the lock: a subscribe from now on is sent directly
        if subscribe:
            self._send_subscribe(subscribe)
        if unsubscribe:
            client.unsubscribe(unsubscribe)
        log.info("connected to %s (session present: %s)", self.broker.url, flags.session_present)
        if self._on_connect is not None:
            self._guarded("on_connect", self._on_connect, bool(flags.session_present))
        if not subscribe:  # a resumed session holds every subscription: no SUBACK will come
            self._all_subscribed()

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                           properties: Any) -> None:
        if not self._connected.is_set():
            return
        self._connected.clear()
        (log.info if self._stop.is_set() else log.warning)(
            "disconnected from %s: %s", self.broker.url, reason)
        if self._on_disconnect is not None:
            self._guarded("on_disconnect", self._on_disconnect, str(reason))

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._on_message is None:
            return
        props = getattr(msg, "properties", None)
        # paho raises on reading `topic` when its bytes are not UTF-8 (only a broker can send
        # such a topic): decoded leniently, it matches no topic of ours and is acknowledged
        topic = bytes(msg._topic).decode("utf-8", "replace")
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        self._guarded("on_message", self._on_message, Message(
            topic, bytes(msg.payload), msg.qos, msg.mid, self.generation,
            response_topic if isinstance(response_topic, str) else None,
            bytes(correlation) if isinstance(correlation, bytes | bytearray) else None,
            oversize=getattr(client, "oversize", 0), via=self))

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                          properties: Any) -> None:
        with self._sub_lock:
            if self._unconfirmed.pop(mid, None) is None:
                self._early_subacks.add(mid)
                return
            settled = self._settled()
        if settled:
            self._all_subscribed()

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                        properties: Any) -> None:
        if self._on_refused is not None and getattr(reason, "is_failure", False):
            self._guarded("on_refused", self._on_refused, mid, str(reason))
        elif self._on_published is not None:
            self._guarded("on_published", self._on_published, mid)


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Nagle's algorithm would hold a small message until the previous one is acknowledged: a
    round trip per message on a radio link. Results are small; latency comes first."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
