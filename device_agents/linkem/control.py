"""Cutting and restoring a running emulator from another process: a line protocol on TCP.

One command per line (`cut`, `cut reset`, `restore`, `stats`), one JSON object back per line:
`{"ok": true, "stats": {...}}` or `{"ok": false, "error": "..."}`. Bound to loopback by default;
anyone who can reach it can cut the link, so it is meant for the test bench, not the field.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from device_agents.errors import LinkError
from device_agents.linkem.proxy import CUT_MODES, Link

COMMANDS = ("cut [blackhole|reset]", "restore", "stats")


def execute(link: Link, line: str) -> dict[str, Any]:
    """Run one control command against the link and say what happened."""
    words = line.split()
    try:
        if not words:
            raise LinkError("empty command")
        command, args = words[0].lower(), words[1:]
        if command == "cut" and len(args) <= 1:
            mode = args[0] if args else "blackhole"
            if mode not in CUT_MODES:
                raise LinkError(f"unknown cut mode {mode!r}; choose blackhole or reset")
            link.cut(mode)  # type: ignore[arg-type]  # checked just above
        elif command == "restore" and not args:
            link.restore()
        elif command != "stats" or args:
            raise LinkError(f"unknown command {line.strip()!r}; commands: {', '.join(COMMANDS)}")
    except LinkError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "stats": link.snapshot().as_dict()}


async def serve(link: Link, host: str, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = execute(link, line.decode("utf-8", "replace"))
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_server(handle, host, port, reuse_address=True)
    except OSError as exc:
        raise LinkError(f"cannot listen for control on {host}:{port}: {exc.strerror or exc}") from exc


def send(address: tuple[str, int], command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to a running emulator's control port and return its reply."""
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(command.strip().encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise LinkError(f"cannot reach the link emulator's control port at "
                        f"{address[0]}:{address[1]}: {exc.strerror or exc}") from exc
    reply: dict[str, Any] = json.loads(data)
    return reply
