"""`edgefleet linkem`: a user-space TCP link emulator (delay, jitter, bandwidth, loss, outages).

The kernel's netem is not available everywhere, so field conditions are rehearsed in a proxy put
between a client (an agent) and its upstream (the fleet broker).
"""

from device_agents.linkem.profiles import PROFILES, LinkProfile, get_profile
from device_agents.linkem.proxy import Link, LinkEmulator, LinkStats

__all__ = ["PROFILES", "Link", "LinkEmulator", "LinkProfile", "LinkStats", "get_profile"]
