"""Small real TCP peers for link tests: an echo server and a bulk source/sink."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            pass


class _Bulk(socketserver.BaseRequestHandler):
    """First line from the client: 'send N' (the server sends N bytes) or 'sink' (the server
    counts what it receives and answers with the count and the seconds between first and last
    byte once the client half-closes)."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        command = b""
        while not command.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                return
            command += chunk
        words = command.decode().split()
        if words[0] == "send":
            total, block = int(words[1]), b"x" * 65536
            while total > 0:
                sock.sendall(block[:total])
                total -= min(total, len(block))
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)
        else:
            received, seconds, rate_bytes = _receive_all(sock)
            sock.sendall(f"{received} {seconds:.6f} {rate_bytes}\n".encode())


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


@contextmanager
def serve(kind: str) -> Iterator[tuple[str, int]]:
    """Run an 'echo' or 'bulk' server on a free loopback port for the duration."""
    handler = _Echo if kind == "echo" else _Bulk
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        server.server_close()


def connect(address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def round_trips(sock: socket.socket, count: int, size: int = 64) -> list[float]:
    """Echo round-trip times in ms for `count` messages sent one after another."""
    times = []
    for i in range(count):
        payload = bytes([i % 256]) * size
        start = time.perf_counter()
        sock.sendall(payload)
        assert recv_exactly(sock, size) == payload
        times.append((time.perf_counter() - start) * 1000)
    return times


def _receive_all(sock: socket.socket) -> tuple[int, float, int]:
    """Read to EOF: (bytes received, seconds from the first to the last arrival, bytes that
    arrived after the first arrival). The rate is the last over the second: the first arrival's
    bytes came before the clock started."""
    received, first, last, first_bytes = 0, 0.0, 0.0, 0
    while data := sock.recv(262144):
        last = time.perf_counter()
        if not received:
            first, first_bytes = last, len(data)
        received += len(data)
    return received, last - first, received - first_bytes


def upload(address: tuple[str, int], total: int) -> tuple[int, float]:
    """Send `total` bytes to a bulk server; return (bytes it counted, measured bytes/s)."""
    with connect(address, timeout=60) as sock:
        sock.sendall(b"sink\n")
        block = b"y" * 65536
        sent = 0
        while sent < total:
            sock.sendall(block[:total - sent])
            sent += min(len(block), total - sent)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(100):
            reply += chunk
    count, seconds, rate_bytes = reply.split()
    return int(count), int(rate_bytes) / float(seconds)


def download(address: tuple[str, int], total: int) -> tuple[int, float]:
    """Ask a bulk server for `total` bytes; return (bytes received, measured bytes/s)."""
    with connect(address, timeout=60) as sock:
        sock.sendall(f"send {total}\n".encode())
        received, seconds, rate_bytes = _receive_all(sock)
    return received, rate_bytes / seconds
