"""An MQTT client (paho) reaching a real Mosquitto through the link emulator, across outages,
and the `edgefleet linkem` command driven from another process."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from device_agents.linkem import LinkEmulator
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.tcp import connect, round_trips, serve


class Watcher:
    """A paho client that records connects, disconnects and messages."""

    def __init__(self, host: str, port: int, topic: str, keepalive: int = 60,
                 v5: bool = True) -> None:
        self.connects = 0
        self.disconnects = 0
        self.connected = threading.Event()
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda c, u, m: self.messages.put(m.payload)
        self.topic = topic
        self.client.connect(host, port, keepalive=keepalive)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connects += 1
        client.subscribe(self.topic, qos=1)
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                       props: Any) -> None:
        self.disconnects += 1
        self.connected.clear()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish(broker: Mosquitto, topic: str, payload: bytes) -> None:
    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
                    "-t", topic, "-m", payload], check=True, timeout=10)


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_mqtt_client_reconnects_after_an_outage(broker: Mosquitto, unique_topic: str,
                                                mode: str) -> None:
    topic = f"{unique_topic}/t"
    with LinkEmulator((broker.host, broker.port), "5g-embb", seed=1) as link:
        watcher = Watcher(*link.address, topic, keepalive=1, v5=broker.mqtt5)
        try:
            assert watcher.connected.wait(10)
            time.sleep(0.2)  # SUBACK
            publish(broker, topic, b"before")
            assert watcher.messages.get(timeout=10) == b"before"

            link.cut(mode)  # type: ignore[arg-type]
            # reset: the broker connection is closed at once; blackhole: paho's keepalive
            # (1 s) notices the silence, as it would behind a dead radio
            assert wait_for(lambda: watcher.disconnects >= 1, 10), "paho never noticed the outage"
            link.restore()
            assert wait_for(lambda: watcher.connects >= 2, 15), "paho did not reconnect"
            time.sleep(0.3)
            publish(broker, topic, b"after")
            received = [watcher.messages.get(timeout=10)]
            while received[-1] != b"after":
                received.append(watcher.messages.get(timeout=10))
            assert received[-1] == b"after"
            stats = link.stats()
            assert stats.outages == 1
            assert stats.connections >= 2
        finally:
            watcher.close()


def _linkem(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "linkem", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ctl(control: int, command: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "edgefleet.cli", "linkem", "--control",
                          f"127.0.0.1:{control}", "--send", command],
                         capture_output=True, text=True, timeout=30)
    reply: dict[str, Any] = json.loads(out.stdout)
    return reply


def test_linkem_command_with_control_port_and_signals() -> None:
    with serve("echo") as echo:
        listen, control = free_port(), free_port()
        proc = _linkem("--listen", f"127.0.0.1:{listen}", "--upstream", f"{echo[0]}:{echo[1]}",
                       "--profile", "5g-urllc", "--control", f"127.0.0.1:{control}", "--json")
        try:
            assert wait_for(lambda: _port_open(control), 20), proc.stderr and proc.stderr.read()
            with connect(("127.0.0.1", listen)) as sock:
                assert len(round_trips(sock, 5)) == 5
                assert _ctl(control, "cut")["stats"]["state"] == "cut (blackhole)"
                assert _ctl(control, "restore")["stats"]["outages"] == 1
                os.kill(proc.pid, signal.SIGUSR1)
                assert wait_for(lambda: _ctl(control, "stats")["stats"]["outages"] == 2, 5)
                os.kill(proc.pid, signal.SIGUSR2)
                assert wait_for(lambda: _ctl(control, "stats")["stats"]["state"] == "up", 5)
                assert len(round_trips(sock, 2)) == 2
            bad = _ctl(control, "explode")
            assert bad["ok"] is False
            assert "unknown command" in bad["error"]
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    stats = json.loads(out)
    assert stats["bytes_up"] == stats["bytes_down"] == 7 * 64
    assert stats["outages"] == 2
    assert stats["connections"] == 1
    assert "5g-urllc" in err


def _port_open(port: int) -> bool:
    try:
        connect(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "nowhere", "--upstream", "127.0.0.1:1"], "--listen 'nowhere' is not HOST:PORT"),
    (["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--outage-every", "3"],
     "--outage-every and --outage-for go together"),
    (["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--rtt-ms", "-5"], "rtt_ms must be >= 0"),
    (["--send", "cut"], "--send needs --control"),
    (["--control", "127.0.0.1:1", "--send", "cut"], "cannot reach the link emulator's control port"),
])
def test_linkem_bad_usage_is_one_line(args: list[str], message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "edgefleet.cli", "linkem", *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
