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
from device_agents.paho_socket import READ_SIZE, ReadAheadSocket
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
        assert done.wait(30), f"{len(got)} of {len(expected)} arrived"
        assert sorted(got) == sorted(expected)
        assert got[:len(small)] == small  # one publisher, one topic: in order
    finally:
        sender.loop_stop()
        sender.disconnect()
        t.stop()
