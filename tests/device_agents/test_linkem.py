"""The link emulator, measured through real sockets: delay, bandwidth, order, outages, control.

Tolerances are wide enough for a shared 2-core machine; the benchmark (benchmarks/link_profiles.py)
holds the tight targets.
"""

from __future__ import annotations

import contextlib
import re
import socket
import statistics
import threading
import time

import pytest

from device_agents.errors import LinkError
from device_agents.linkem import PROFILES, LinkEmulator, LinkProfile
from tests.support.tcp import connect, download, recv_exactly, round_trips, serve, upload


@pytest.fixture
def echo():  # type: ignore[no-untyped-def]
    with serve("echo") as address:
        yield address


@pytest.fixture
def bulk():  # type: ignore[no-untyped-def]
    with serve("bulk") as address:
        yield address


def test_added_rtt_matches_the_profile(echo) -> None:  # type: ignore[no-untyped-def]
    with connect(echo) as sock:
        direct = statistics.median(round_trips(sock, 20))
    with LinkEmulator(echo, rtt_ms=20) as link, connect(link.address) as sock:
        through = statistics.median(round_trips(sock, 30))
    added = through - direct
    assert 19 <= added <= 23, f"added RTT {added:.2f} ms, configured 20 ms"


def test_jitter_varies_rtt_around_its_median(echo) -> None:  # type: ignore[no-untyped-def]
    with LinkEmulator(echo, rtt_ms=30, jitter_ms=10, seed=1) as link, connect(link.address) as sock:
        rtts = round_trips(sock, 60)
    assert 27 <= statistics.median(rtts) <= 34
    assert min(rtts) >= 20 - 0.5, "a round trip below rtt - jitter"
    assert max(rtts) - min(rtts) >= 4, "jitter made no difference"


def test_upload_throughput_is_capped(bulk) -> None:  # type: ignore[no-untyped-def]
    with LinkEmulator(bulk, up_mbps=8) as link:
        count, rate = upload(link.address, 1_500_000)
    assert count == 1_500_000
    mbps = rate * 8 / 1e6
    assert 8 * 0.85 <= mbps <= 8 * 1.05, f"{mbps:.2f} Mbit/s through an 8 Mbit/s cap"


def test_download_throughput_is_capped_and_separate_from_upload(bulk) -> None:  # type: ignore[no-untyped-def]
    with LinkEmulator(bulk, down_mbps=16, up_mbps=1) as link:
        count, rate = download(link.address, 3_000_000)
    assert count == 3_000_000
    mbps = rate * 8 / 1e6
    assert 16 * 0.85 <= mbps <= 16 * 1.05, f"{mbps:.2f} Mbit/s through a 16 Mbit/s cap"


def test_order_is_kept_under_jitter_and_loss(echo) -> None:  # type: ignore[no-untyped-def]
    payload = b"".join(i.to_bytes(4, "big") for i in range(20_000))
    with (LinkEmulator(echo, rtt_ms=10, jitter_ms=10, loss=0.05, seed=3) as link,
          connect(link.address, timeout=20) as sock):
        sender = threading.Thread(target=lambda: [sock.sendall(payload[i:i + 997])
                                                  for i in range(0, len(payload), 997)])
        sender.start()
        echoed = recv_exactly(sock, len(payload))
        sender.join()
    assert echoed == payload


def test_loss_shows_as_retransmission_delay(echo) -> None:  # type: ignore[no-untyped-def]
    with LinkEmulator(echo, rtt_ms=2, loss=0.1, seed=5) as link, connect(link.address) as sock:
        rtts = round_trips(sock, 30)
    assert sum(r > 150 for r in rtts) >= 3, "no round trip paid a retransmission timeout"
    assert statistics.median(rtts) < 150


def test_many_connections_at_once(echo) -> None:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []

    def client(k: int, address: tuple[str, int]) -> None:
        try:
            with connect(address, timeout=20) as sock:
                payload = bytes([k]) * 20_000
                sock.sendall(payload)
                assert recv_exactly(sock, len(payload)) == payload
        except BaseException as exc:  # reported below
            errors.append(exc)

    with LinkEmulator(echo, profile="5g-embb", seed=2) as link:
        threads = [threading.Thread(target=client, args=(k, link.address)) for k in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = link.stats()
    assert not errors, errors[:3]
    assert stats.connections == 40
    assert stats.bytes_up == stats.bytes_down == 40 * 20_000


def test_blackhole_stalls_then_delivers_everything(echo) -> None:  # type: ignore[no-untyped-def]
    with LinkEmulator(echo, rtt_ms=4) as link, connect(link.address) as sock:
        round_trips(sock, 2)
        link.cut()
        sock.settimeout(0.5)
        sock.sendall(b"held")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        late = connect(link.address)  # the local handshake completes; nothing crosses the link
        late.settimeout(0.3)
        late.sendall(b"late")
        with pytest.raises(TimeoutError):
            late.recv(10)
        assert link.stats().state == "cut (blackhole)"
        link.restore()
        sock.settimeout(5)
        late.settimeout(5)
        assert recv_exactly(sock, 4) == b"held"
        assert recv_exactly(late, 4) == b"late"
        late.close()
        stats = link.stats()
    assert stats.outages == 1
    assert 0.5 <= stats.outage_s < 5
    assert stats.state == "up"


def test_reset_closes_connections_and_refuses_new_ones(echo) -> None:  # type: ignore[no-untyped-def]
    with LinkEmulator(echo) as link:
        sock = connect(link.address)
        round_trips(sock, 1)
        link.cut("reset")
        with pytest.raises((ConnectionError, AssertionError)):
            round_trips(sock, 1)  # reset by peer, or closed: recv_exactly raises either way
        sock.close()
        refused = connect(link.address)
        refused.settimeout(2)
        with contextlib.suppress(ConnectionResetError):
            assert refused.recv(10) == b""
        refused.close()
        link.restore()
        with connect(link.address) as sock:
            assert round_trips(sock, 2)
        stats = link.stats()
    assert stats.resets == 1
    assert stats.refused == 1


def test_scheduled_outages(echo) -> None:  # type: ignore[no-untyped-def]
    with LinkEmulator(echo) as link, connect(link.address) as sock:
        link.schedule_outages(0.3, 0.3)
        time.sleep(1.5)
        assert recv_exactly_after(sock, b"ping") == b"ping"
        stats = link.stats()
    assert stats.outages >= 2
    assert 0.4 <= stats.outage_s <= 1.0


def recv_exactly_after(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def test_upstream_down_closes_the_client(echo) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead = spare.getsockname()
    with LinkEmulator(dead) as link, connect(link.address) as sock:
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(10) == b""
        for _ in range(50):
            if link.stats().upstream_failures:
                break
            time.sleep(0.02)
        assert link.stats().upstream_failures == 1


@pytest.mark.parametrize(("fields", "message"), [
    ({"rtt_ms": -1}, "rtt_ms must be >= 0"),
    ({"rtt_ms": 10, "jitter_ms": 30}, "jitter_ms must be between 0 and rtt_ms"),
    ({"rtt_ms": 10, "up_mbps": 0}, "up_mbps must be > 0"),
    ({"rtt_ms": 10, "loss": 1.5}, "loss must be in [0, 1)"),
])
def test_bad_profile_values(fields: dict[str, float], message: str) -> None:
    with pytest.raises(LinkError, match=re.escape(message)):
        LinkProfile("custom", **fields)


def test_profiles_match_the_contract() -> None:
    assert {k: (p.rtt_ms, p.jitter_ms, p.down_mbps, p.up_mbps) for k, p in PROFILES.items()
            if k != "none"} == {
        "5g-embb": (20, 5, 100, 50), "5g-urllc": (2, 0.5, 20, 20), "lte": (50, 10, 20, 10),
        "nb-iot": (300, 0, 0.06, 0.06)}
