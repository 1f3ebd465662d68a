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
    """A paho `SocketLike` that buffers reads (see the module docstring)."""

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            data: bytes = self._sock.recv(max(size, READ_SIZE))  # raises as the socket would
            if len(data) <= size:
                return data  # all of it goes out at once (b"" at the end of the stream)
            buf, pos = data, 0
            self._buf = data
        end = pos + size
        self._pos = end
        if pos == 0 and end >= len(buf):
            return buf
        return buf[pos:end]

    def pending(self) -> int:
        """Bytes readable without waiting: ours, plus what a TLS socket has decrypted."""
        ours = len(self._buf) - self._pos
        inner = getattr(self._sock, "pending", None)
        return max(ours, 0) + (inner() if inner is not None else 0)

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
