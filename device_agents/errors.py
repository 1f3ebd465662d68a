"""The device side's error tree: config, transport, link emulator, delivery.

Rooted in runtime's EdgefleetError, so the CLI prints any of them as one line with exit code 2.
"""

from __future__ import annotations

from runtime.errors import EdgefleetError


class DeviceAgentError(EdgefleetError):
    """Root of the errors raised by device_agents."""


class LinkError(DeviceAgentError):
    """The link emulator cannot start or was given bad settings (profile, address, control)."""
