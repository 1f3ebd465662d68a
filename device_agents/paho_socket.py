"""The socket paho reads through: one large recv serves many packets.

paho-mqtt reads every packet with at least three `recv` calls (the command byte, each byte of
the remaining length, then the body) and ends each read burst on a `recv` that raises
BlockingIOError. At a few thousand messages a second each of those is a syscall and a Python
exception on the agent's busiest thread. `ReadAheadSocket` reads up to `READ_SIZE` bytes at a
time and hands paho the pieces it asks for; its `pending()` tells paho's loop that bytes are
already waiting, the hook paho has for TLS sockets, so nothing waits in `select` while buffered
data is unread. Writes go straight through.

`Client` is paho's client with that socket, and with writes made safe from any thread. The
transport runs paho's loop on a thread of its own, so paho (which only guards `loop_start`'s
thread) lets every thread that publishes write to the socket itself. On a slow link a write is
often partial, and two threads writing at once then interleave the bytes of two packets: the
broker drops the connection as a protocol error. One lock around `loop_write` keeps each packet
whole and the packets in the order they were queued. paho also wakes its network thread for
every packet queued, although the publishing thread has just written it itself; `Client` wakes
it only when something is left to write (a full socket, or a packet queued inside a callback),
which saves one thread switch per packet sent.

`Client` also enforces a maximum packet size on what it reads (`max_packet_bytes`). MQTT 5
brokers are told the limit at CONNECT and never send more; a 3.1.1 broker cannot be told, so a
larger PUBLISH is read as a head (topic and packet id, HEAD_BYTES) and its body is discarded as it
arrives, never held in memory. The message is delivered with that head only and `oversize` set to
its real size, so the agent answers it with an error and acknowledges it: dropping the
connection instead would have the broker redeliver the same message after every reconnect.

It overrides paho's `_create_socket`, `_packet_queue`, `_sock_recv` and `_handle_publish`
(paho-mqtt < 2.3 is pinned for this); tests check each hook is in use, so a paho release that
moves them fails loudly instead of silently losing what they give.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

READ_SIZE = 64 * 1024  # bytes per recv: many small packets at once, a modest buffer
# What is kept of an oversize PUBLISH: enough for any topic (2 + 65,535 bytes) and its packet id.
HEAD_BYTES = 2 + 65535 + 2
CONTROL_MAX = 64 * 1024  # any other packet larger than this (a hostile broker's): drop the link
_PUBLISH = 0x30
_DISCONNECT = 0xE0


class ReadAheadSocket:
    """A paho `SocketLike` that buffers reads (see the module docstring).

    One buffer per connection, filled with `recv_into`: no large bytes object is allocated and
    freed for every read, which would fragment the heap of a long-running daemon.
    """

    __slots__ = ("_end", "_mem", "_pos", "_sock", "_view")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._mem = bytearray(READ_SIZE)
        self._view = memoryview(self._mem)
        self._pos = 0
        self._end = 0

    def recv(self, size: int) -> bytes:
        pos, end = self._pos, self._end
        if pos >= end:
            if size >= READ_SIZE:  # a large body: straight into its own bytes, no copy
                data: bytes = self._sock.recv(size)
                return data
            end = self._sock.recv_into(self._mem)  # raises as recv would; 0 at end of stream
            if end == 0:
                return b""
            pos = 0
            self._end = end
        stop = min(pos + size, end)
        self._pos = stop
        return bytes(self._view[pos:stop])

    def pending(self) -> int:
        """Bytes readable without waiting: ours, plus what a TLS socket has decrypted."""
        inner = getattr(self._sock, "pending", None)
        return self._end - self._pos + (inner() if inner is not None else 0)

    def send(self, data: bytes | bytearray) -> int:
        sent: int = self._sock.send(data)
        return sent

    def fileno(self) -> int:
        fd: int = self._sock.fileno()
        return fd

    def close(self) -> None:
        self._sock.close()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:  # setsockopt, getpeername, ...: the socket's own
        return getattr(self._sock, name)


def _head_only(command: int, head: bytes, v5: bool) -> bytes:
    """The variable header of a PUBLISH cut to its head: topic and packet id, no properties
    (MQTT 5: an empty property list), no payload. The head always holds the topic (HEAD_BYTES)."""
    topic_end = 2 + int.from_bytes(head[:2], "big")
    end = topic_end + (2 if command & 0x06 else 0)  # QoS 1 and 2 carry a packet id
    return head[:end] + (b"\x00" if v5 else b"")


class Client(mqtt.Client):
    """paho's MQTT client reading through a ReadAheadSocket, writing under one lock."""

    def __init__(self, *args: Any, max_packet_bytes: int = 0, **kwargs: Any) -> None:
        # reentrant: a QoS 0 on_publish (called while writing) may publish again
        self._write_lock = threading.RLock()
        self.max_packet_bytes = max_packet_bytes  # 0: no limit
        self._discard = 0  # body bytes of an oversize packet still to be read and dropped
        self._truncated = 0  # real size of the packet being read, when only its head is kept
        self.oversize = 0  # real size of the PUBLISH being handled, when it was over the limit
        super().__init__(*args, **kwargs)

    def _sock_recv(self, bufsize: int) -> bytes:
        """paho's read, except that an oversize PUBLISH body is cut to its head and the rest
        dropped as it arrives (see the module docstring)."""
        packet = self._in_packet
        if self._discard and packet["command"] == 0:  # the head was handled: drop the rest
            while self._discard:
                dropped = super()._sock_recv(min(self._discard, READ_SIZE))  # may raise "again"
                if not dropped:
                    return b""
                self._discard -= len(dropped)
                with self._msgtime_mutex:  # bytes are flowing: not a dead link for keepalive
                    self._last_bytes_received = time.monotonic()
        limit = self.max_packet_bytes
        if (limit and packet["have_remaining"] and bufsize > limit
                and bufsize == packet["to_process"] == packet["remaining_length"]):
            if packet["command"] & 0xF0 != _PUBLISH:
                if bufsize > CONTROL_MAX:  # no control packet of ours comes near this
                    return b""  # read as the end of the connection
            else:
                head = min(bufsize, HEAD_BYTES)
                self._discard, self._truncated = bufsize - head, bufsize
                packet["remaining_length"] = packet["to_process"] = bufsize = head
        data: bytes = super()._sock_recv(bufsize)
        return data

    def _handle_publish(self) -> MQTTErrorCode:
        """paho's, with an oversize PUBLISH rebuilt first from its topic and packet id alone
        (its properties and payload are not all here: paho would call it malformed, drop the
        connection, and the broker would deliver it again after every reconnect)."""
        self.oversize, self._truncated = self._truncated, 0
        if self.oversize:
            self._in_packet["packet"] = bytearray(_head_only(
                self._in_packet["command"], bytes(self._in_packet["packet"]),
                self._protocol == mqtt.MQTTv5))
        try:
            rc: MQTTErrorCode = super()._handle_publish()
            return rc
        finally:
            self.oversize = 0

    def _create_socket(self) -> Any:
        """A new connection: nothing of an oversize packet cut on the old one carries over."""
        self._discard = self._truncated = self.oversize = 0
        return ReadAheadSocket(super()._create_socket())

    def _calls_back_on_write(self) -> bool:
        """Whether writing what is queued makes paho call back (on_publish for a QoS 0 PUBLISH,
        on_disconnect for DISCONNECT) under its callback lock, taken blocking. Such a write is
        left to the network thread: done inline, by a thread holding a lock the network thread
        waits for inside a callback (the acknowledgement order's), it would deadlock."""
        # tuple(): copied in one step under the GIL while other threads append and pop
        return any(p["command"] == _DISCONNECT
                   or (p["command"] & 0xF0 == _PUBLISH and p["qos"] == 0)
                   for p in tuple(self._out_packet))

    def loop_write(self) -> MQTTErrorCode:
        """One writer at a time: a packet is written whole before the next one starts."""
        with self._write_lock:
            rc: MQTTErrorCode = super().loop_write()
            return rc

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: mqtt.MQTTMessageInfo | None = None) -> MQTTErrorCode:
        """paho's, except that the network thread is woken only for what is left to write."""
        self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0,
                                 "to_process": len(packet), "packet": packet, "info": info})
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        if (self._thread is None and self._on_socket_register_write is None
                and not self._calls_back_on_write()
                and self._in_callback_mutex.acquire(False)):  # not inside a paho callback
            self._in_callback_mutex.release()
            rc = self.loop_write()
        else:
            self._call_socket_register_write()
        if self.want_write():  # the socket is full, or we are in a callback: the thread's turn
            wake = self._sockpairW
            if wake is not None:  # (it may be full of wake-ups, or closed by a reconnect)
                with contextlib.suppress(OSError):
                    wake.send(b"0")
        return rc
