"""The socket paho reads through: one large recv serves many packets.

paho-mqtt reads every packet with at least three `recv` calls (the command byte, each byte of
the remaining length, then the body) and ends each read burst on a `recv` that raises
BlockingIOError. At a few thousand messages a second each of those is a syscall and a Python
exception on the agent's busiest thread. `ReadAheadSocket` reads up to `READ_SIZE` bytes at a
time and hands paho the pieces it asks for; its `pending()` tells paho's loop that bytes are
already waiting, the hook paho has for TLS sockets, so nothing waits in `select` while buffered
data is unread. Writes go straight through.

`Client` is paho's client with that socket. It overrides paho's `_create_socket`, the one place
paho builds its socket; a test checks that the wrapper is in use, so a paho release that moves
that hook fails loudly instead of silently going back to byte-sized reads.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt

READ_SIZE = 64 * 1024  # bytes per recv: many small packets at once, a modest buffer


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


class Client(mqtt.Client):
    """paho's MQTT client reading through a ReadAheadSocket."""

    def _create_socket(self) -> Any:
        return ReadAheadSocket(super()._create_socket())
