"""`edgefleet fleet status`: one row per device, from retained status and live telemetry."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from device_agents import protocol
from device_agents.fleet.client import FleetClient


@dataclass
class DeviceRow:
    device: str
    status: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    status_at: float = 0.0
    telemetry_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        tele, inference = self.telemetry, self.telemetry.get("inference") or {}
        return {
            "device": self.device, "state": self.status.get("state", "unknown"),
            "epoch": self.status.get("epoch"), "groups": self.status.get("groups", []),
            "models": [f"{m.get('name')}:{m.get('version')}" for m in self.status.get("models", [])],
            "outbox_depth": (tele.get("outbox") or {}).get("depth"),
            "p50_ms": inference.get("p50_ms"),
            "last_telemetry_s": round(time.time() - self.telemetry_at, 1) if self.telemetry_at else None,
            "since": self.status.get("ts"),
        }


class FleetView:
    """Keeps the latest status and telemetry of every device as they arrive."""

    def __init__(self, client: FleetClient) -> None:
        self.rows: dict[str, DeviceRow] = {}
        self._lock = threading.Lock()
        self._client = client
        self._last_status = 0.0  # monotonic time of the latest status message
        client.listen(f"{protocol.ROOT}/+/status", f"{protocol.ROOT}/", self._on)
        client.listen(f"{protocol.ROOT}/+/telemetry", f"{protocol.ROOT}/", self._on)

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
                waiting = any(r.status.get("state") == "online" and not r.telemetry_at
                              for r in self.rows.values())
            if quiet and not waiting:
                return
            time.sleep(0.02)

    def _on(self, topic: str, doc: Any) -> None:
        parts = topic.split("/")
        if len(parts) != 4 or not isinstance(doc, dict) or parts[3] not in ("status", "telemetry"):
            return
        with self._lock:
            row = self.rows.setdefault(parts[2], DeviceRow(parts[2]))
            if parts[3] == "status":
                row.status, row.status_at = doc, time.time()
                self._last_status = time.monotonic()
            else:
                row.telemetry, row.telemetry_at = doc, time.time()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self.rows[d].as_dict() for d in sorted(self.rows)]
