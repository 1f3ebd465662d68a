"""The broker fixtures are real brokers: independent clients talk through them, and Mosquitto
survives restarts."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.mosquitto import Mosquitto

pytestmark = pytest.mark.broker


def _pub(broker: Mosquitto, topic: str, payload: str, *extra: str) -> None:
    subprocess.run([_tool("mosquitto_pub"), "-h", broker.host, "-p", str(broker.port), "-t", topic,
                    "-m", payload, "-q", "1", *extra], check=True, timeout=10)


def _sub_one(broker: Mosquitto, topic: str) -> str:
    out = subprocess.run([_tool("mosquitto_sub"), "-h", broker.host, "-p", str(broker.port),
                          "-t", topic, "-C", "1", "-W", "5"], check=True, timeout=10,
                         capture_output=True, text=True)
    return out.stdout.strip()


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} missing: apt-get install -y mosquitto-clients"
    return path


def test_retained_message_reaches_an_independent_client(broker: Mosquitto, unique_topic: str):
    _pub(broker, f"{unique_topic}/status", '{"state":"online"}', "-r")
    assert _sub_one(broker, f"{unique_topic}/status") == '{"state":"online"}'


@pytest.mark.mosquitto_only(reason="the embedded broker keeps retained messages in memory")
def test_broker_restart_keeps_retained_state(broker: Mosquitto, unique_topic: str):
    _pub(broker, f"{unique_topic}/status", "before-restart", "-r")
    port = broker.port
    broker.stop()
    assert not broker.running
    broker.start()
    assert broker.port == port
    assert _sub_one(broker, f"{unique_topic}/status") == "before-restart"


def test_paho_client_round_trip(broker: Mosquitto, unique_topic: str):
    import queue
    import threading

    import paho.mqtt.client as mqtt

    got: queue.Queue[bytes] = queue.Queue()
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         protocol=mqtt.MQTTv5 if broker.mqtt5 else mqtt.MQTTv311)
    client.on_message = lambda _c, _u, msg: got.put(msg.payload)
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(f"{unique_topic}/#", qos=1)
        assert subscribed.wait(5), "no SUBACK from the broker"
        client.publish(f"{unique_topic}/x", b"hello", qos=1).wait_for_publish(5)
        assert got.get(timeout=5) == b"hello"
    finally:
        client.loop_stop()
        client.disconnect()
