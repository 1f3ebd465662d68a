"""`edgefleet fleet status`: one row per device, from retained status and live telemetry.

A status or telemetry that breaks the contract never takes the view down: its device shows as
`invalid` with the reason in `error`, and a topic that names no device is kept in `bad_topics`
for the command to warn about. Every other device is shown as usual.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Final

from device_agents import protocol
from device_agents.fleet.client import ALL_STATUS, ALL_TELEMETRY, FleetClient

INVALID: Final = "invalid"  # the state of a device whose retained status could not be read
MAX_BAD_TOPICS: Final = 1000  # kept for the warnings; a flood of them stays bounded


@dataclass
class DeviceRow:
    device: str
    status: protocol.Status | None = None
    telemetry: protocol.Telemetry | None = None
    status_error: str | None = None  # why the latest status could not be read
    telemetry_error: str | None = None  # why the latest telemetry could not be read
    status_at: float = 0.0
    telemetry_at: float = 0.0  # of the latest telemetry, readable or not

    @property
    def state(self) -> str:
        if self.status_error is not None:
            return INVALID
        return self.status.state if self.status is not None else "unknown"

    @property
    def error(self) -> str | None:
        errors = [self.status_error] if self.status_error else []
        if self.telemetry_error:
            errors.append(f"telemetry: {self.telemetry_error}")
        return "; ".join(errors) or None

    def as_dict(self) -> dict[str, Any]:
        status, tele = self.status, self.telemetry
        return {
            "device": self.device, "state": self.state,
            "epoch": status.epoch if status else None,
            "groups": list(status.groups) if status else [],
            "models": [f"{m.name}:{m.version}" for m in status.models] if status else [],
            "outbox_depth": tele.outbox.depth if tele else None,
            "p50_ms": tele.inference.p50_ms if tele else None,
            "last_telemetry_s": round(time.time() - self.telemetry_at, 1) if self.telemetry_at else None,
            "since": status.ts if status else None,
            "error": self.error,
        }


class FleetView:
    """Keeps the latest status and telemetry of every device as they arrive."""

    def __init__(self, client: FleetClient) -> None:
        self.rows: dict[str, DeviceRow] = {}
        self.bad_topics: dict[str, str] = {}  # topic -> why it is not a device topic
        self._lock = threading.Lock()
        self._client = client
        self._last_status = 0.0  # monotonic time of the latest status message
        client.on_bad_topic(self.on_bad_topic)
        client.listen(ALL_STATUS, "status", self.on_message)
        client.listen(ALL_TELEMETRY, "telemetry", self.on_message)

    def settle(self, max_s: float, quiet_s: float = 0.25) -> None:
        """Wait until the view is as complete as it will get soon, at most `max_s` seconds:
        the retained statuses arrived (none for `quiet_s` after the SUBACK) and every online
        device sent telemetry. Telemetry is not retained: a device that reports every 30 s
        shows its figures only if it reports within `max_s`, or in `--watch`."""
        deadline = time.monotonic() + max_s
        self._client.transport.wait_subscribed(max_s)
        subscribed = time.monotonic()
        while time.monotonic() < deadline:
            with self._lock:
                quiet = time.monotonic() - max(self._last_status, subscribed) >= quiet_s
                waiting = any(r.state == "online" and not r.telemetry_at
                              for r in self.rows.values())
            if quiet and not waiting:
                return
            time.sleep(0.02)

    def on_message(self, where: protocol.DeviceTopic, payload: bytes) -> None:
        """One status or telemetry message (the client routed it by kind); never raises."""
        if where.kind == "status":
            self._on_status(where.device, payload)
        elif where.kind == "telemetry":
            self._on_telemetry(where.device, payload)

    def on_bad_topic(self, topic: str, reason: str) -> None:
        with self._lock:
            if len(self.bad_topics) < MAX_BAD_TOPICS:
                self.bad_topics[topic] = reason

    def _on_status(self, device: str, payload: bytes) -> None:
        status, error = None, None
        if payload:
            try:
                status = protocol.parse_status(payload)
            except protocol.ProtocolError as exc:
                error = str(exc)
        with self._lock:
            self._last_status = time.monotonic()
            if not payload:  # its retained status was cleared: the device left the fleet
                self.rows.pop(device, None)
                return
            row = self.rows.setdefault(device, DeviceRow(device))
            row.status, row.status_error, row.status_at = status, error, time.time()

    def _on_telemetry(self, device: str, payload: bytes) -> None:
        try:
            telemetry, error = protocol.parse_telemetry(payload), None
        except protocol.ProtocolError as exc:
            telemetry, error = None, str(exc)
        with self._lock:
            row = self.rows.setdefault(device, DeviceRow(device))
            if telemetry is not None:  # a bad one keeps the last good figures
                row.telemetry = telemetry
            row.telemetry_error, row.telemetry_at = error, time.time()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self.rows[d].as_dict() for d in sorted(self.rows)]

    def problems(self) -> list[str]:
        """One line per device that sent what breaks the contract, and per bad topic."""
        with self._lock:
            lines = [f"{d}: {self.rows[d].error}" for d in sorted(self.rows) if self.rows[d].error]
            lines += [f"ignored a message: {reason}" for _, reason in sorted(self.bad_topics.items())]
        return lines
