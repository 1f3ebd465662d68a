"""Named radio-link profiles and the per-direction settings the emulator shapes traffic with.

Directions are seen from the device: `up` is client -> upstream (device to fleet broker), `down`
is upstream -> client. The figures are the contract's nominal ones; flags override each field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from device_agents.errors import LinkError


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """What a link does to a TCP connection, both ways.

    rtt_ms is split evenly between the directions. Jitter adds a uniform offset in
    [-jitter/2, +jitter/2] to each direction, so the round trip stays within rtt +- jitter and its
    median at rtt. A bandwidth of None means uncapped. `loss` is the fraction of TCP segments lost;
    what TCP shows above it is a retransmission delay (one RTO) and head-of-line blocking.
    """

    name: str
    rtt_ms: float
    jitter_ms: float = 0.0
    down_mbps: float | None = None
    up_mbps: float | None = None
    loss: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.rtt_ms < 0:
            problems.append(f"rtt_ms must be >= 0, got {self.rtt_ms}")
        if not 0 <= self.jitter_ms <= self.rtt_ms and self.jitter_ms != 0:
            problems.append(f"jitter_ms must be between 0 and rtt_ms ({self.rtt_ms:g}), "
                            f"got {self.jitter_ms:g}")
        for field in ("down_mbps", "up_mbps"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                problems.append(f"{field} must be > 0 (omit it for no cap), got {value}")
        if not 0 <= self.loss < 1:
            problems.append(f"loss must be in [0, 1), got {self.loss}")
        if problems:
            raise LinkError(f"link profile {self.name!r}: " + "; ".join(problems))

    def with_overrides(self, **fields: float | None) -> LinkProfile:
        """This profile with the given fields replaced (None values are left as they are)."""
        changed = {k: v for k, v in fields.items() if v is not None}
        if not changed:
            return self
        return dataclasses.replace(self, name=f"{self.name}*", **changed)

    def describe(self) -> str:
        def bw(mbps: float | None) -> str:
            if mbps is None:
                return "uncapped"
            return f"{mbps * 1000:g} kbit/s" if mbps < 1 else f"{mbps:g} Mbit/s"

        text = (f"{self.name}: RTT {self.rtt_ms:g} ms +- {self.jitter_ms:g} ms, "
                f"down {bw(self.down_mbps)}, up {bw(self.up_mbps)}")
        return text + (f", loss {self.loss:.2%}" if self.loss else "")


PROFILES: dict[str, LinkProfile] = {
    p.name: p for p in (
        LinkProfile("5g-embb", rtt_ms=20, jitter_ms=5, down_mbps=100, up_mbps=50),
        LinkProfile("5g-urllc", rtt_ms=2, jitter_ms=0.5, down_mbps=20, up_mbps=20),
        LinkProfile("lte", rtt_ms=50, jitter_ms=10, down_mbps=20, up_mbps=10),
        LinkProfile("nb-iot", rtt_ms=300, jitter_ms=0, down_mbps=0.06, up_mbps=0.06),
        # No shaping at all: what the proxy itself costs.
        LinkProfile("none", rtt_ms=0),
    )
}


def get_profile(name: str) -> LinkProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise LinkError(f"unknown link profile {name!r}; choose one of: "
                        f"{', '.join(PROFILES)}") from None
