"""The read-ahead socket under paho: pieces come out exactly as sent, and the real client uses it."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agents.config import BrokerConfig
from device_agents.linkem import LinkEmulator
from device_agents.paho_socket import READ_SIZE, Client, ReadAheadSocket
from device_agents.transport import Message, Transport


def test_reads_come_out_in_the_pieces_asked_for_and_pending_counts_what_is_buffered() -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    sock = ReadAheadSocket(b)
    try:
        with pytest.raises(BlockingIOError):  # nothing sent yet: the socket's own signal
            sock.recv(1)
        a.sendall(b"\x30\x05hello\x40\x02\x00\x01")
        assert sock.recv(1) == b"\x30"
        assert sock.pending() == 10
        assert sock.recv(1) == b"\x05"
        assert sock.recv(5) == b"hello"
        assert sock.recv(1) == b"\x40"
        assert sock.recv(100) == b"\x02\x00\x01"  # a short read: what is left
        assert sock.pending() == 0
        big = bytes(range(256)) * (3 * READ_SIZE // 256)  # more than one read-ahead
        sender = threading.Thread(target=a.sendall, args=(big,))
        sender.start()
        got = bytearray()
        while len(got) < len(big):
            try:
                got += sock.recv(7 if len(got) % 2 else 70_000)
            except BlockingIOError:
                continue
        sender.join()
        assert bytes(got) == big
        a.close()
        while True:  # the end of the stream reads as b"", as paho expects
            try:
                assert sock.recv(1) == b""
                break
            except BlockingIOError:
                continue
    finally:
        a.close()
        b.close()


def test_the_transport_reads_through_it_and_loses_nothing(broker: Any) -> None:
    """Thousands of small messages and a few bigger than a read-ahead, through a real broker."""
    topic = f"test/readahead/{uuid.uuid4().hex[:8]}"
    got: list[bytes] = []
    done = threading.Event()
    small = [f"message {i}".encode() for i in range(3000)]
    large = [hashlib.sha256(bytes([i])).digest() * (READ_SIZE // 16) for i in range(3)]
    expected = small + large

    def on_message(msg: Message) -> None:
        got.append(msg.payload)
        if len(got) == len(expected):
            done.set()

    t = Transport(BrokerConfig(url=broker.url), f"ra-{uuid.uuid4().hex[:8]}",
                  subscriptions=[topic], on_message=on_message, max_inflight=100)
    t.start()
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    sender_connects: list[int] = []
    sender.on_connect = lambda *_args: sender_connects.append(1)
    try:
        assert t.wait_connected(15), t.last_error
        assert t.wait_subscribed(15)
        assert isinstance(t._client._sock, ReadAheadSocket)  # the hook in paho is still there
        sender.connect(broker.host, broker.port)
        sender.loop_start()
        for start in range(0, len(expected), 500):  # within a broker's queue per client
            for body in expected[start:start + 500]:
                sender.publish(topic, body, qos=1)
            deadline = time.monotonic() + 30
            while len(got) < min(start + 500, len(expected)) and time.monotonic() < deadline:
                time.sleep(0.01)
        if not done.wait(30):
            pytest.fail(_what_was_lost(expected, got, t.connects, len(sender_connects), broker))
        assert sorted(got) == sorted(expected)
        assert got[:len(small)] == small  # one publisher, one topic: in order
    finally:
        sender.loop_stop()
        sender.disconnect()
        t.stop()


def _what_was_lost(expected: list[bytes], got: list[bytes], connects: int, sender_connects: int,
                   broker: Any) -> str:
    """A failure that says which messages are missing, whether a connection was made again (a
    broker that keeps no session drops what it had in flight then), and what the broker logged."""
    arrived = set(got)
    missing = [i for i, body in enumerate(expected) if body not in arrived]
    log = broker.log_path.read_text(errors="replace") if broker.log_path.exists() else ""
    notes = [line for line in log.splitlines()
             if any(w in line for w in ("WARNING", "ERROR", "Timeout", "failed"))][-20:]
    return (f"{len(got)} of {len(expected)} arrived; missing indices {missing[:20]}; "
            f"receiver connected {connects} time(s), sender {sender_connects}; "
            f"broker {broker.kind} said:\n" + "\n".join(notes))


class TrickleSocket:
    """A socket on a slow link: each send takes a few bytes or none, and lets other threads run
    in the middle, as a real send does when it gives up the GIL."""

    def __init__(self) -> None:
        self.wire = bytearray()
        self.calls = 0

    def send(self, data: bytes) -> int:
        self.calls += 1
        time.sleep(0)  # another thread may write now
        if self.calls % 3 == 0:
            raise BlockingIOError
        n = min(len(data), 1 + self.calls % 7)
        self.wire += data[:n]
        return n

    def close(self) -> None:
        pass


class WakeCounter:
    def __init__(self) -> None:
        self.sent = 0

    def send(self, data: bytes) -> int:
        self.sent += 1
        return len(data)

    def close(self) -> None:
        pass


def _packets(wire: bytes) -> list[bytes]:
    """Split a stream of our test packets (a 2-byte length, then the body)."""
    out, pos = [], 0
    while pos < len(wire):
        size = int.from_bytes(wire[pos:pos + 2], "big")
        out.append(bytes(wire[pos:pos + 2 + size]))
        pos += 2 + size
    return out


def test_threads_writing_at_once_each_write_whole_packets_in_queue_order() -> None:
    client = Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    sock = TrickleSocket()
    client._sock = sock  # type: ignore[assignment]
    client._sockpairW = WakeCounter()  # type: ignore[assignment]
    packets = {k: [len(body).to_bytes(2, "big") + body
                   for body in (f"thread {k} packet {i} ".encode() * (1 + i % 5) for i in range(40))]
               for k in range(6)}

    def send(k: int) -> None:
        for i, packet in enumerate(packets[k]):
            client._packet_queue(0x40, packet, k * 100 + i, 1)  # PUBACK-like

    threads = [threading.Thread(target=send, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    while client.want_write():  # what was left for the network thread
        client.loop_write()
    got = _packets(bytes(sock.wire))
    assert sorted(got) == sorted(p for ps in packets.values() for p in ps)  # whole, each once
    for ps in packets.values():  # one thread's packets keep their order
        assert [p for p in got if p in set(ps)] == ps


def test_the_network_thread_is_woken_only_for_what_is_left_to_write() -> None:
    client = Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        client._sock = a  # type: ignore[assignment]
        wakes = WakeCounter()
        client._sockpairW = wakes  # type: ignore[assignment]
        client._packet_queue(0x40, b"\x00\x02hi", 1, 1)
        assert b.recv(100) == b"\x00\x02hi"  # written by the calling thread
        assert wakes.sent == 0
        assert not client.want_write()
        with client._in_callback_mutex:  # inside a paho callback: the network thread writes
            client._packet_queue(0x40, b"\x00\x02ho", 2, 1)
        assert wakes.sent == 1
        assert client.want_write()
        client.loop_write()
        assert b.recv(100) == b"\x00\x02ho"
    finally:
        a.close()
        b.close()


SENDERS, EACH = 8, 40


def test_publishing_from_many_threads_over_a_full_socket_keeps_every_packet_whole(broker: Any
                                                                                   ) -> None:
    """On a slow link writes are often partial. paho, driven by our own network thread, also
    writes from whichever thread publishes: two threads writing at once could interleave the
    bytes of two packets, which the broker takes for a protocol error and drops the connection.
    A 16 Mbit/s link keeps the socket's buffer full, so partial writes are the rule here."""
    topic = f"test/whole/{uuid.uuid4().hex[:8]}"
    got: list[bytes] = []
    done = threading.Event()
    bodies = [hashlib.sha256(f"{k}-{i}".encode()).digest() * 1024 for k in range(SENDERS)
              for i in range(EACH)]  # 32 KiB each, several times the send buffer below

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        got.append(msg.payload)
        if len(got) >= len(bodies):
            done.set()

    reader = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    reader.on_message = on_message
    reader.connect(broker.host, broker.port)
    reader.subscribe(topic, qos=1)
    reader.loop_start()
    with LinkEmulator((broker.host, broker.port), "none", up_mbps=16) as link:
        host, port = link.address
        t = Transport(BrokerConfig(url=f"mqtt://{host}:{port}"), f"whole-{uuid.uuid4().hex[:8]}",
                      max_inflight=1000)
        t.start()
        try:
            assert t.wait_connected(15), t.last_error
            t._client._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            time.sleep(0.3)  # the reader's SUBSCRIBE is in

            def send(k: int) -> None:
                for body in bodies[k * EACH:(k + 1) * EACH]:
                    assert t.publish(topic, body, qos=1) is not None

            senders = [threading.Thread(target=send, args=(k,)) for k in range(SENDERS)]
            for s in senders:
                s.start()
            for s in senders:
                s.join()
            assert done.wait(60), f"{len(got)} of {len(bodies)} arrived; last error {t.last_error}"
            assert t.connects == 1, f"the connection was dropped (a garbled packet): {t.last_error}"
            assert sorted(got) == sorted(bodies)  # each whole, each once
        finally:
            t.stop()
            reader.loop_stop()
            reader.disconnect()


def test_a_packet_over_the_limit_is_cut_to_its_head_and_its_body_never_held(broker: Any) -> None:
    """max_packet_bytes on a real connection: a larger PUBLISH arrives as its head with its real
    size in `oversize`, each piece of its body read and dropped; the messages around it are whole
    (the hooks `_sock_recv` and `_handle_publish` are in use)."""
    from device_agents.paho_socket import HEAD_BYTES

    topic = f"test/oversize/{uuid.uuid4().hex[:8]}"
    got: list[Message] = []
    t = Transport(BrokerConfig(url=broker.url), f"os-{uuid.uuid4().hex[:8]}",
                  subscriptions=[topic], on_message=got.append, max_packet_bytes=20_000,
                  announce_max_packet=False)
    t.start()
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    reads: list[int] = []
    try:
        assert t.wait_connected(15), t.last_error
        assert t.wait_subscribed(15)
        outer = t._client._sock
        assert isinstance(outer, ReadAheadSocket)

        class Recorder:  # the OS socket under the read-ahead: how much each read asks for
            def __init__(self, sock: Any) -> None:
                self.sock = sock

            def recv(self, size: int) -> bytes:
                reads.append(size)
                return self.sock.recv(size)  # type: ignore[no-any-return]

            def recv_into(self, buf: Any) -> int:
                reads.append(len(buf))
                return self.sock.recv_into(buf)  # type: ignore[no-any-return]

            def __getattr__(self, name: str) -> Any:
                return getattr(self.sock, name)

        outer._sock = Recorder(outer._sock)
        sender.connect(broker.host, broker.port)
        sender.loop_start()
        big = bytes(range(256)) * 4000  # 1 MB
        for body in (b"before", big, b"after", big, b"last"):
            sender.publish(topic, body, qos=1)
        deadline = time.monotonic() + 30
        while len(got) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [m.payload for m in got if not m.oversize] == [b"before", b"after", b"last"]
        cut = [m for m in got if m.oversize]
        assert len(cut) == 2
        for m in cut:
            assert m.oversize > len(big)
            assert len(m.payload) < HEAD_BYTES
            assert big.startswith(m.payload)
            assert m.topic == topic
        assert max(reads) <= READ_SIZE  # never one read of the whole body
    finally:
        sender.loop_stop()
        sender.disconnect()
        t.stop()


def test_an_oversize_message_with_a_long_topic_and_big_properties_is_still_cut_cleanly(
        broker: Any) -> None:
    """The head holds any topic, and the properties it cut are dropped: paho never sees a
    malformed packet, which would drop the link and have the broker redeliver it for ever."""
    root = f"test/oversize/{uuid.uuid4().hex[:8]}"
    long_topic = f"{root}/{'s' * 9000}"
    got: list[Message] = []
    t = Transport(BrokerConfig(url=broker.url), f"os-{uuid.uuid4().hex[:8]}",
                  subscriptions=[f"{root}/#"], on_message=got.append, max_packet_bytes=20_000,
                  announce_max_packet=False)
    t.start()
    v5 = getattr(broker, "mqtt5", True)
    sender = mqtt.Client(CallbackAPIVersion.VERSION2,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    try:
        assert t.wait_connected(15), t.last_error
        assert t.wait_subscribed(15)
        sender.connect(broker.host, broker.port)
        sender.loop_start()
        props = None
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.UserProperty = [("k", "v" * 30_000)]
        sender.publish(long_topic, b"x" * 50_000, qos=1, properties=props)
        sender.publish(f"{root}/after", b"after", qos=1)
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [(m.topic, m.oversize > 50_000, m.payload) for m in got] == [
            (long_topic, True, b""), (f"{root}/after", False, b"after")]
        assert t.connects == 1  # never dropped
    finally:
        sender.loop_stop()
        sender.disconnect()
        t.stop()


def test_a_new_connection_starts_with_no_discard_left_from_the_old_one(broker: Any) -> None:
    client = Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311, max_packet_bytes=1000)
    client._discard, client._truncated = 8027, 20_000  # as a link lost mid-discard leaves them
    client.connect(broker.host, broker.port)
    try:
        assert (client._discard, client._truncated, client.oversize) == (0, 0, 0)
    finally:
        client.disconnect()
