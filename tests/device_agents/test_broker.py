"""`edgefleet broker` (amqtt) and the transport's MQTT 3.1.1 fallback, against real brokers."""

from __future__ import annotations

import subprocess
import time
import uuid

import paho.mqtt.client as mqtt
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from device_agents.config import BrokerConfig
from device_agents.transport import Transport
from edgefleet.cli import cli
from tests.support.embedded import EmbeddedBrokerProcess
from tests.support.mosquitto import Mosquitto


def _transport(url: str, expiry: int, will: bool) -> Transport:
    return Transport(BrokerConfig(url=url, session_expiry_s=expiry), f"t-{uuid.uuid4().hex[:8]}",
                     will=("edgefleet/v1/x/status", b'{"state":"offline"}') if will else None)


def test_transport_falls_back_to_311_on_the_embedded_broker_and_keeps_5_on_mosquitto(
        embedded_broker: EmbeddedBrokerProcess, mosquitto: Mosquitto) -> None:
    mosquitto.start()
    embedded_broker.start()
    # an agent's connection (Will + session expiry: amqtt hangs up or never answers) and a fleet
    # tool's (a bare CONNECT: amqtt refuses it as an unsupported protocol version)
    for expiry, will in ((3600, True), (0, False)):
        for broker, expected in ((embedded_broker, mqtt.MQTTv311), (mosquitto, mqtt.MQTTv5)):
            t = _transport(broker.url, expiry, will)
            t.start()
            try:
                assert t.wait_connected(15), t.last_error
                assert t.protocol == expected, (broker.kind, expiry, will)
            finally:
                t.stop()


def test_a_client_gets_only_retained_messages_of_its_own_filters(
        embedded_broker: EmbeddedBrokerProcess) -> None:
    """amqtt 0.12 replays, to a client that connects, the retained messages matching every other
    client's filters; the embedded broker fixes that."""
    embedded_broker.start()
    root = f"test/{uuid.uuid4().hex[:8]}"
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    watcher.connect(embedded_broker.host, embedded_broker.port)
    watcher.loop_start()
    watcher.subscribe(f"{root}/#", 1)
    watcher.publish(f"{root}/status", b"retained", qos=1, retain=True).wait_for_publish(5)
    got: list[str] = []
    other = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    other.on_message = lambda c, u, m: got.append(m.topic)
    other.connect(embedded_broker.host, embedded_broker.port)
    other.loop_start()
    other.subscribe(f"{root}/out/x", 1)
    time.sleep(1.0)
    watcher.publish(f"{root}/out/x", b"live", qos=1).wait_for_publish(5)
    time.sleep(1.0)
    for c in (watcher, other):
        c.loop_stop()
        c.disconnect()
    assert got == [f"{root}/out/x"]  # the live message, not the other client's retained status


def test_broker_cli_port_in_use_is_one_line_exit_2(embedded_broker: EmbeddedBrokerProcess) -> None:
    embedded_broker.start()
    result = CliRunner().invoke(cli, ["broker", "--port", str(embedded_broker.port)])
    assert result.exit_code == 2
    assert "cannot listen on" in result.output
    assert "Traceback" not in result.output


def test_broker_cli_serves_and_stops_on_sigterm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    broker = EmbeddedBrokerProcess(tmp_path)
    broker.start()
    try:
        out = subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
                              "-t", "a/b", "-m", "hello"], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
    finally:
        proc = broker.proc
        broker.stop()
    assert proc is not None
    assert proc.returncode == 0
    assert "listening on" in broker.log_path.read_text()
