"""Does `edgefleet linkem` deliver the link its profile promises?

For each profile, side by side with its nominal figures: echo round-trip time (p50, p99), bulk
throughput each way, and the MQTT QoS 1 round trip of a paho client publishing to its own
subscription on a real Mosquitto through the link. Plus what the emulator itself adds at zero
configured delay (profile `none`) over a direct loopback connection.

Targets: RTT p50 within 10% (or 2 ms) of nominal, for the echo probe and for the time the link
adds to the MQTT round trip (through the link minus straight to the broker, same run);
throughput within 15% of the cap; the emulator adds < 0.5 ms at zero delay.

    python -m benchmarks.link_profiles [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.common import Report, Target
from device_agents.linkem import PROFILES, LinkEmulator, LinkProfile
from tests.support.mosquitto import Mosquitto
from tests.support.tcp import connect, download, round_trips, serve, upload

SHAPED = ["5g-embb", "5g-urllc", "lte", "nb-iot"]
PROBE_BYTES = 16  # a small probe, as ping's: on NB-IoT every byte costs 0.13 ms of air time


def rtt_figures(echo: tuple[str, int], profile: LinkProfile, samples: int) -> dict[str, float]:
    with LinkEmulator(echo, profile, seed=7) as link, connect(link.address, timeout=30) as sock:
        round_trips(sock, 2)  # the handshake's round trip and first-byte costs are not the link's
        rtts = round_trips(sock, samples, size=PROBE_BYTES)
    return {"p50": statistics.median(rtts), "p99": float(np.percentile(rtts, 99))}


def throughput_mbps(bulk: tuple[str, int], profile: LinkProfile, seconds: float
                    ) -> dict[str, float]:
    out = {}
    for direction, mbps in (("up", profile.up_mbps), ("down", profile.down_mbps)):
        assert mbps is not None
        total = int(mbps * 1e6 / 8 * seconds)
        with LinkEmulator(bulk, profile, seed=7) as link:
            count, rate = (upload if direction == "up" else download)(link.address, total)
        assert count == total, f"{direction}: {count} of {total} bytes arrived"
        out[direction] = rate * 8 / 1e6
    return out


def mqtt_round_trips(broker: Mosquitto, profile: LinkProfile | None, samples: int) -> list[float]:
    """QoS 1 publish -> broker -> back to the same client's subscription (ms), through the
    link, or straight to the broker when profile is None (what paho and Mosquitto cost)."""
    with contextlib.ExitStack() as stack:
        address = (broker.host, broker.port)
        if profile is not None:
            address = stack.enter_context(LinkEmulator(address, profile, seed=7)).address
        got = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.on_message = lambda c, u, m: got.set()
        # paho leaves Nagle's algorithm on: a small packet right behind another waits for its ACK,
        # a whole round trip on a real radio. The agent turns it off; so does this client.
        client.on_socket_open = lambda c, u, sock: sock.setsockopt(  # type: ignore[union-attr,attr-defined]
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.connect(*address)
        client.loop_start()
        stack.callback(client.disconnect)
        stack.callback(client.loop_stop)
        client.subscribe("bench/linkem", qos=1)
        time.sleep((profile.rtt_ms if profile else 0) / 1000 * 3 + 0.3)
        times = []
        for i in range(samples + 2):
            got.clear()
            start = time.perf_counter()
            client.publish("bench/linkem", f"{i}".encode(), qos=1)
            if not got.wait(10):
                raise TimeoutError("a QoS 1 message did not come back within 10 s")
            if i >= 2:
                times.append((time.perf_counter() - start) * 1000)
    return times


def overhead_ms(echo: tuple[str, int], samples: int, rounds: int) -> dict[str, float]:
    """Median RTT direct vs through the emulator with nothing configured, alternating rounds."""
    direct: list[float] = []
    through: list[float] = []
    with LinkEmulator(echo, "none") as link, connect(echo) as d, connect(link.address) as t:
        round_trips(t, 5)
        round_trips(d, 5)
        for _ in range(rounds):
            direct += round_trips(d, samples)
            through += round_trips(t, samples)
    return {"direct": statistics.median(direct), "through": statistics.median(through)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (under 60 s)")
    args = parser.parse_args(argv)
    samples = 15 if args.quick else 40
    seconds = 1.0 if args.quick else 3.0
    report = Report("link_profiles", {"quick": args.quick, "rtt_samples": samples,
                                      "bulk_seconds": seconds, "mqtt_qos": 1})
    with tempfile.TemporaryDirectory() as tmp, serve("echo") as echo, serve("bulk") as bulk:
        broker = Mosquitto(Path(tmp) / "mosquitto")
        broker.start()
        try:
            direct_mqtt = statistics.median(mqtt_round_trips(broker, None, samples))
            report.figures["mqtt_qos1_direct_p50_ms"] = round(direct_mqtt, 3)
            for name in SHAPED:
                profile = PROFILES[name]
                n = max(8, samples // 3) if profile.rtt_ms >= 100 else samples
                rtt = rtt_figures(echo, profile, n)
                bw = throughput_mbps(bulk, profile, seconds)
                mq = mqtt_round_trips(broker, profile, n)
                nominal = profile.rtt_ms
                tolerance = max(2.0, 0.1 * nominal)
                f = report.figures
                f[f"{name}_rtt_nominal_ms"] = nominal
                f[f"{name}_rtt_p50_ms"] = round(rtt["p50"], 2)
                f[f"{name}_rtt_p99_ms"] = round(rtt["p99"], 2)
                f[f"{name}_rtt_p50_dev_ms"] = round(abs(rtt["p50"] - nominal), 2)
                f[f"{name}_mqtt_qos1_p50_ms"] = round(statistics.median(mq), 2)  # whole round trip
                f[f"{name}_mqtt_qos1_p99_ms"] = round(float(np.percentile(mq, 99)), 2)
                # the link's share of the MQTT round trip: minus what paho and Mosquitto take
                # without it, measured in the same run
                added = statistics.median(mq) - direct_mqtt
                f[f"{name}_mqtt_qos1_added_p50_ms"] = round(added, 2)
                f[f"{name}_mqtt_qos1_added_dev_ms"] = round(abs(added - nominal), 2)
                report.targets += [Target(f"{name}_rtt_p50_dev_ms", "<=", tolerance),
                                   Target(f"{name}_mqtt_qos1_added_dev_ms", "<=", tolerance)]
                for direction in ("up", "down"):
                    cap = getattr(profile, f"{direction}_mbps")
                    f[f"{name}_{direction}_cap_mbps"] = cap
                    f[f"{name}_{direction}_mbps"] = round(bw[direction], 4)
                    f[f"{name}_{direction}_dev"] = round(abs(bw[direction] / cap - 1), 4)
                    report.targets.append(Target(f"{name}_{direction}_dev", "<=", 0.15))
                print(f"{name}: rtt p50 {rtt['p50']:.2f} ms (nominal {nominal:g}), "
                      f"mqtt p50 {statistics.median(mq):.2f} ms, up {bw['up']:.3f} / "
                      f"down {bw['down']:.3f} Mbit/s", flush=True)
            over = overhead_ms(echo, 200 if args.quick else 500, 6)
            report.figures["direct_rtt_ms"] = round(over["direct"], 4)
            report.figures["none_rtt_ms"] = round(over["through"], 4)
            report.figures["emulator_added_ms"] = round(over["through"] - over["direct"], 4)
            report.targets.append(Target("emulator_added_ms", "<=", 0.5))
        finally:
            broker.stop()
    report.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
