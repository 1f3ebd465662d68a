"""`edgefleet pki`: the files it writes, and a real Mosquitto 2 started from the configuration it
generates, with MQTT 5 clients holding the certificates it issued (so PUBACK reason codes show
what the ACL refused: 0x87 Not authorized)."""

from __future__ import annotations

import getpass
import json
import os
import pwd
import queue
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agents.fleet import mosquitto_conf, pki
from edgefleet.cli import cli
from runtime.package import write_package
from runtime.signing import load_private_key
from tests.support.agent import AgentProcess, write_config
from tests.support.mosquitto import free_port, stop_process, wait_listening
from tests.support.onnx_models import linear_model

NOT_AUTHORIZED = 0x87
OK = {0x00, 0x10}  # Success, No matching subscribers
SENSOR = "test-sensor"  # a test-only identity allowed to publish sensor messages (see the broker)
SHA = "ab" * 32


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(cli, ["pki", *args])


def cert_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["init"], ["issue"], ["mosquitto"]])
def test_every_pki_command_has_help_with_an_example(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.output


def test_init_writes_the_fleet_identities_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    result = run_cli("init", "--out", str(out), "--host", "fleet.example", "--host", "10.0.0.5")
    assert result.exit_code == 0, result.output
    for name in pki.INIT_FILES:
        assert mode_of(out / name) == (0o600 if name.endswith(".key") else 0o644), name
    broker = cert_of(out / "broker.pem")
    sans = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1",
                                                                            "10.0.0.5"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fleet.example"}
    broker.verify_directly_issued_by(cert_of(out / "ca.pem"))
    operator = cert_of(out / "operator.pem")
    assert operator.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "operator"
    operator.verify_directly_issued_by(cert_of(out / "operator-ca.pem"))
    assert isinstance(broker.public_key(), ec.EllipticCurvePublicKey)
    assert broker.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]

    ca_before = (out / "ca.pem").read_bytes()
    again = run_cli("init", "--out", str(out))
    assert again.exit_code == 2
    assert again.output.count("\n") == 1
    assert "already exists" in again.output
    assert "--force" in again.output
    assert "Traceback" not in again.output
    assert (out / "ca.pem").read_bytes() == ca_before
    assert run_cli("init", "--out", str(out), "--force").exit_code == 0
    assert (out / "ca.pem").read_bytes() != ca_before


@pytest.mark.parametrize("bad", ["edge/B", "edge+", "edge#", "#", "edge\n", "ed\x00ge", "ed\x1bge",
                                 "", "-edge", "e" * 65, "operator", "blobs", "edgé",
                                 "edgefleet-collect-main"])
def test_issue_refuses_ids_that_are_not_names(tmp_path: Path, bad: str) -> None:
    assert run_cli("init", "--out", str(tmp_path)).exit_code == 0
    result = run_cli("issue", "--pki", str(tmp_path), "--device", bad)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: device id ")
    assert result.output.count("\n") == 1
    assert list((tmp_path / "devices").iterdir()) == []


def test_issue_writes_a_client_certificate(tmp_path: Path) -> None:
    assert run_cli("init", "--out", str(tmp_path), "--days", "30").exit_code == 0
    result = run_cli("issue", "--pki", str(tmp_path), "--device", "edge-7", "--json")
    assert result.exit_code == 0, result.output
    [issued] = json.loads(result.output)
    cert = cert_of(Path(issued["cert"]))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-7"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(cert_of(tmp_path / "ca.pem"))
    assert mode_of(tmp_path / "devices" / "edge-7.key") == 0o600
    assert cert.not_valid_after_utc <= cert_of(tmp_path / "ca.pem").not_valid_after_utc
    again = run_cli("issue", "--pki", str(tmp_path), "--device", "edge-7")
    assert again.exit_code == 2
    assert "--force" in again.output
    missing = run_cli("issue", "--pki", str(tmp_path / "nope"), "--device", "edge-7")
    assert missing.exit_code == 2
    assert "pki init" in missing.output


def test_mosquitto_config_points_at_the_pki(tmp_path: Path) -> None:
    assert run_cli("init", "--out", str(tmp_path / "pki")).exit_code == 0
    result = run_cli("mosquitto", "--pki", str(tmp_path / "pki"), "--port", "8883", "--out",
                     str(tmp_path / "mq"), "--user", getpass.getuser())
    assert result.exit_code == 0, result.output
    conf = (tmp_path / "mq" / "mosquitto.conf").read_text()
    device_listener, operator_listener = conf.split("listener ")[1:]
    assert device_listener.startswith("8883\n")
    assert operator_listener.startswith("8884\n")
    for line in (f"certfile {tmp_path}/pki/broker.pem", f"keyfile {tmp_path}/pki/broker.key",
                 "require_certificate true", "use_identity_as_username true"):
        assert line in device_listener
        assert line in operator_listener
    assert f"cafile {tmp_path}/mq/clients-ca.pem" in device_listener
    assert f"cafile {tmp_path}/pki/operator-ca.pem" in operator_listener
    assert "use_username_as_clientid true" in device_listener
    assert "use_username_as_clientid" not in operator_listener
    for line in ("allow_anonymous false", f"acl_file {tmp_path}/mq/acl", "persistence true",
                 f"persistence_location {tmp_path}/mq/"):
        assert f"\n{line}\n" in conf
    bad = run_cli("mosquitto", "--pki", str(tmp_path / "nope"), "--port", "8883", "--out",
                  str(tmp_path / "mq2"))
    assert bad.exit_code == 2
    assert "pki init" in bad.output


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand files to another user")
def test_as_root_the_broker_user_gets_its_key_and_directory(tmp_path: Path) -> None:
    try:
        account = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user")
    pki.init_pki(tmp_path / "pki")
    files = mosquitto_conf.write_mosquitto(tmp_path / "pki", tmp_path / "mq", 8883)
    key = tmp_path / "pki" / "broker.key"
    assert key.stat().st_uid == account.pw_uid
    assert mode_of(key) == 0o600
    assert (tmp_path / "mq").stat().st_uid == account.pw_uid
    assert "user mosquitto\n" in files.conf.read_text()
    assert any("cannot enter" in note for note in files.notes)  # pytest's temp dirs are 0700


# -- a real broker -------------------------------------------------------------------------------

@dataclass
class Fleet:
    pki: Path
    host: str
    port: int  # devices
    operator_port: int
    log: Path

    def device(self, name: str) -> tuple[Path, Path]:
        return self.pki / "devices" / f"{name}.pem", self.pki / "devices" / f"{name}.key"

    @property
    def operator(self) -> tuple[Path, Path]:
        return self.pki / "operator.pem", self.pki / "operator.key"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Mosquitto started from `pki mosquitto`'s files. Changes, all for the test: the user is
    this one (as root, Mosquitto would switch to `mosquitto`, who cannot enter pytest's 0700
    temp dirs), it logs to a file, and the ACL gets a sensor identity (CN test-sensor) so there
    is someone who may publish on a device's in/ topics; nobody may in the generated one."""
    root = tmp_path_factory.mktemp("pki")
    pki.init_pki(root / "pki")
    for name in ("edge-A", "edge-B", "edge-e2e", SENSOR):
        pki.issue_device(root / "pki", name)
    port, operator_port = free_port(), free_port()
    files = mosquitto_conf.write_mosquitto(root / "pki", root / "mq", port, operator_port,
                                           user=getpass.getuser())
    log = root / "mq" / "mosquitto.log"
    with files.conf.open("a") as fh:
        fh.write(f"log_dest file {log}\nlog_type all\n")
    with files.acl.open("a") as fh:
        fh.write(f"\nuser {SENSOR}\ntopic write edgefleet/v1/+/in/+\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(files.conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        for listening in (port, operator_port):
            wait_listening(proc, "127.0.0.1", listening, 10, "mosquitto",
                           lambda: log.read_text() if log.exists() else "", lambda: None)
        yield Fleet(root / "pki", "127.0.0.1", port, operator_port, log)
    finally:
        stop_process(proc)


class Client:
    """An MQTT 5 client over TLS with a certificate; records what the broker answers."""

    def __init__(self, fleet: Fleet, cert: tuple[Path, Path] | None, client_id: str, *,
                 port: int | None = None, host: str | None = None, ca: Path | None = None,
                 persistent: bool = False, will: str | None = None) -> None:
        self.connacks: queue.Queue[int] = queue.Queue()
        self.acks: dict[int, int] = {}  # mid -> PUBACK reason code
        self.grants: dict[int, list[int]] = {}  # mid -> SUBACK reason codes
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.disconnects = 0
        self._answered = threading.Condition()
        self.mqtt = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=mqtt.MQTTv5)
        self.mqtt.tls_set(ca_certs=str(ca or fleet.pki / "ca.pem"),
                          certfile=str(cert[0]) if cert else None,
                          keyfile=str(cert[1]) if cert else None,
                          cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            self.mqtt.will_set(will, b'{"state":"offline","epoch":1}', qos=1, retain=False)
        self.mqtt.on_connect = lambda c, u, f, reason, p: self.connacks.put(reason.value)
        self.mqtt.on_disconnect = self._on_disconnect
        self.mqtt.on_publish = self._on_publish
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 600
        self.error: Exception | None = None  # a TLS or socket error while connecting
        try:
            self.mqtt.connect(host or fleet.host, port or fleet.port, 30,
                              clean_start=not persistent, properties=props)
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
            return
        self.mqtt.loop_start()

    def _on_disconnect(self, *args: Any) -> None:
        self.disconnects += 1
        self.connacks.put(-1)  # a refused TLS handshake ends here, with no CONNACK

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._answered:
            self.acks[mid] = reason.value
            self._answered.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any,
                      props: Any) -> None:
        with self._answered:
            self.grants[mid] = [r.value for r in reasons]
            self._answered.notify_all()

    def connected(self, timeout: float = 5) -> bool:
        try:
            return self.connacks.get(timeout=timeout) == 0
        except queue.Empty:
            return False

    def publish(self, topic: str, payload: bytes = b"{}", retain: bool = False) -> int:
        """The PUBACK's reason code."""
        mid = self.mqtt.publish(topic, payload, qos=1, retain=retain).mid
        with self._answered:
            assert self._answered.wait_for(lambda: mid in self.acks, 5), f"no PUBACK for {topic}"
            return self.acks[mid]

    def subscribe(self, *topics: str) -> list[int]:
        _, mid = self.mqtt.subscribe([(t, 1) for t in topics])
        assert mid is not None
        with self._answered:
            assert self._answered.wait_for(lambda: mid in self.grants, 5)
            return self.grants[mid]

    def received(self, quiet_s: float = 0.5) -> list[tuple[str, bytes]]:
        """Everything that arrived, once nothing more came for `quiet_s`."""
        got = []
        while True:
            try:
                got.append(self.messages.get(timeout=quiet_s))
            except queue.Empty:
                return got

    def close(self) -> None:
        if self.error is None:
            self.mqtt.disconnect()
            self.mqtt.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def connect(made: list[Client], fleet: Fleet, cert: tuple[Path, Path] | None, client_id: str,
            **kwargs: Any) -> Client:
    client = Client(fleet, cert, client_id, **kwargs)
    made.append(client)
    return client


def test_no_certificate_or_another_ca_cannot_connect(fleet: Fleet, clients: list[Client],
                                                     tmp_path: Path) -> None:
    anonymous = connect(clients, fleet, None, "anon-1")
    assert not anonymous.connected()
    other = tmp_path / "other"
    pki.init_pki(other)
    pki.issue_device(other, "edge-A")  # the same name from a CA the broker does not trust
    stranger = connect(clients, fleet, (other / "devices/edge-A.pem", other / "devices/edge-A.key"),
                       "edge-A")
    assert not stranger.connected()
    # plain MQTT without TLS: the listener speaks TLS only
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plain", protocol=mqtt.MQTTv5)
    answers: list[int] = []
    plain.on_connect = lambda c, u, f, reason, p: answers.append(reason.value)
    plain.connect(fleet.host, fleet.port, 5)
    for _ in range(50):  # the broker hangs up on a CONNECT that is not a TLS handshake
        if plain.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
            break
    else:
        pytest.fail("the TLS listener kept a plain MQTT connection open")
    assert answers == []


def test_a_client_refuses_a_broker_under_another_name(fleet: Fleet) -> None:
    # 127.0.0.2 reaches the same listener, but the broker's certificate is not valid for it
    client = Client(fleet, fleet.device("edge-A"), "edge-A", host="127.0.0.2")
    assert isinstance(client.error, ssl.SSLCertVerificationError), client.error
    assert "127.0.0.2" in str(client.error)


def test_a_device_only_publishes_its_own_topics(fleet: Fleet, clients: list[Client]) -> None:
    a = connect(clients, fleet, fleet.device("edge-A"), "edge-A")
    operator = connect(clients, fleet, fleet.operator, "edgefleet-test-op0",
                       port=fleet.operator_port)
    assert a.connected()
    assert operator.connected()
    operator.subscribe("edgefleet/v1/#")
    a.mqtt.publish("edgefleet/v1/edge-B/telemetry", b"{}", qos=0)  # dropped without a word
    for topic in ("edge-B/status", "edge-B/out/x", "edge-B/response/ping", "edge-B/error",
                  "edge-B/request/ping", "edge-A/request/ping", "edge-A/in/cam",
                  "edge-B/model/m/state", f"blobs/{SHA}"):
        assert a.publish(f"edgefleet/v1/{topic}") == NOT_AUTHORIZED, topic
    for topic in ("status", "telemetry", "error", "event", "out/x", "response/ping",
                  "model/digits/state", "offload/request"):
        assert a.publish(f"edgefleet/v1/edge-A/{topic}") in OK, topic
    assert {t for t, _ in operator.received()} == {f"edgefleet/v1/edge-A/{t}" for t in (
        "status", "telemetry", "error", "event", "out/x", "response/ping", "model/digits/state",
        "offload/request")}
    assert a.disconnects == 0


def test_a_device_reads_only_its_own_inputs_requests_and_the_blobs(fleet: Fleet,
                                                                   clients: list[Client]) -> None:
    a = connect(clients, fleet, fleet.device("edge-A"), "edge-A")
    b = connect(clients, fleet, fleet.device("edge-B"), "edge-B")
    sensor = connect(clients, fleet, fleet.device(SENSOR), SENSOR)
    operator = connect(clients, fleet, fleet.operator, "edgefleet-test-op",
                       port=fleet.operator_port)
    assert all(c.connected() for c in (a, b, sensor, operator))
    assert operator.publish(f"edgefleet/v1/blobs/{SHA}", b"chunk", retain=True) in OK
    # Mosquitto 2.0.11 grants any SUBSCRIBE and filters each message by the ACL's read lines
    a.subscribe("edgefleet/v1/#", "edgefleet/v1/edge-B/in/+", "edgefleet/v1/edge-B/request/+",
                "edgefleet/v1/+/status")
    b.subscribe("edgefleet/v1/edge-B/in/+", "edgefleet/v1/edge-B/request/+",
                f"edgefleet/v1/blobs/{SHA}")
    assert b.publish("edgefleet/v1/edge-B/status", b"{}", retain=True) in OK
    assert sensor.publish("edgefleet/v1/edge-B/in/cam") in OK
    assert operator.publish("edgefleet/v1/edge-B/request/ping") in OK
    assert sorted(t for t, _ in b.received()) == [
        f"edgefleet/v1/blobs/{SHA}", "edgefleet/v1/edge-B/in/cam",
        "edgefleet/v1/edge-B/request/ping"]
    assert sorted(t for t, _ in a.received(0.2)) == [f"edgefleet/v1/blobs/{SHA}"]
    # and A's own
    assert sensor.publish("edgefleet/v1/edge-A/in/cam") in OK
    assert operator.publish("edgefleet/v1/edge-A/request/ping") in OK
    assert sorted(t for t, _ in a.received()) == ["edgefleet/v1/edge-A/in/cam",
                                                  "edgefleet/v1/edge-A/request/ping"]
    operator.publish(f"edgefleet/v1/blobs/{SHA}", b"", retain=True)
    b.publish("edgefleet/v1/edge-B/status", b"", retain=True)


def test_a_device_cannot_take_over_another_devices_session(fleet: Fleet,
                                                           clients: list[Client]) -> None:
    b = connect(clients, fleet, fleet.device("edge-B"), "edge-B", persistent=True)
    assert b.connected()
    b.subscribe("edgefleet/v1/edge-B/request/+")
    a = connect(clients, fleet, fleet.device("edge-A"), "edge-B", persistent=True)
    assert a.connected()  # ... as edge-A: the broker replaced the client id with the CN
    a.subscribe("edgefleet/v1/edge-B/request/+")
    operator = connect(clients, fleet, fleet.operator, "edgefleet-test-op2",
                       port=fleet.operator_port)
    assert operator.connected()
    assert operator.publish("edgefleet/v1/edge-B/request/ping", b"for B") in OK
    assert b.received() == [("edgefleet/v1/edge-B/request/ping", b"for B")]
    assert a.received(0.1) == []
    assert b.disconnects == 0
    assert a.disconnects == 0
    assert "as edge-A (p5, c0" in fleet.log.read_text()
    # and on the operator's listener, where client ids are free, a device cannot connect at all
    elsewhere = connect(clients, fleet, fleet.device("edge-A"), "edge-B", port=fleet.operator_port)
    assert not elsewhere.connected()
    assert b.disconnects == 0


def test_a_will_on_another_devices_status_is_dropped(fleet: Fleet, clients: list[Client]) -> None:
    operator = connect(clients, fleet, fleet.operator, "edgefleet-test-op3",
                       port=fleet.operator_port)
    assert operator.connected()
    operator.subscribe("edgefleet/v1/+/status")
    for will in ("edgefleet/v1/edge-B/status", "edgefleet/v1/edge-A/status"):
        a = Client(fleet, fleet.device("edge-A"), "edge-A", will=will)
        assert a.connected()
        a.mqtt.loop_stop()
        sock = a.mqtt.socket()
        assert sock is not None
        sock.close()  # an unclean end: the broker publishes the Will, if the ACL allows it
        time.sleep(0.5)
    assert [t for t, _ in operator.received()] == ["edgefleet/v1/edge-A/status"]


def test_the_operator_requests_publishes_blobs_and_reads_everything(fleet: Fleet,
                                                                    clients: list[Client]) -> None:
    collectors = [connect(clients, fleet, fleet.operator, f"edgefleet-collect-{n}",
                          port=fleet.operator_port, persistent=True) for n in ("a", "b")]
    status = connect(clients, fleet, fleet.operator, "edgefleet-status-1234",
                     port=fleet.operator_port)
    a = connect(clients, fleet, fleet.device("edge-A"), "edge-A")
    assert all(c.connected() for c in (*collectors, status, a))
    for collector in collectors:
        collector.subscribe("$share/collectors/edgefleet/v1/+/out/+")
    status.subscribe("edgefleet/v1/#")
    for topic in ("edge-A/request/ping", "edge-B/request/deploy", "any-device/request/x",
                  f"blobs/{SHA}"):
        assert status.publish(f"edgefleet/v1/{topic}") in OK, topic
    for topic in ("edge-A/in/cam", "edge-A/status", "edge-A/out/x", "edge-A/response/ping"):
        assert status.publish(f"edgefleet/v1/{topic}") == NOT_AUTHORIZED, topic
    for n in range(4):
        assert a.publish("edgefleet/v1/edge-A/out/cam", str(n).encode()) in OK
    assert a.publish("edgefleet/v1/edge-A/telemetry") in OK
    shared = [m for c in collectors for m in c.received(0.3)]
    assert sorted(p for _, p in shared) == [b"0", b"1", b"2", b"3"]  # each once, split
    seen = {t for t, _ in status.received()}
    assert {"edgefleet/v1/edge-A/out/cam", "edgefleet/v1/edge-A/telemetry",
            "edgefleet/v1/edge-A/request/ping", f"edgefleet/v1/blobs/{SHA}"} <= seen
    assert all(c.disconnects == 0 for c in (*collectors, status))
    # on the device listener the operator works too, as one client id ("operator")
    once = connect(clients, fleet, fleet.operator, "edgefleet-call-1")
    assert once.connected()
    assert once.publish("edgefleet/v1/edge-A/request/ping") in OK


def test_the_agent_answers_and_takes_a_deployment_through_the_acl(
        fleet: Fleet, tmp_path: Path, keys_dir: Path) -> None:
    package = write_package(tmp_path / "pkg", linear_model(tmp_path / "m.onnx"), name="lin",
                            version="1", sign_key=load_private_key(keys_dir / "fleet.key")).path
    config = write_config(tmp_path / "agent.toml", device_id="edge-e2e",
                          broker_url=f"mqtts://127.0.0.1:{fleet.port}", data_dir=tmp_path / "data",
                          package=None, keys=[keys_dir / "fleet.pub"])
    cert, key = fleet.device("edge-e2e")
    config.write_text(config.read_text().replace("keepalive_s = 5", (
        f'keepalive_s = 5\nca_file = "{fleet.pki / "ca.pem"}"\ncert_file = "{cert}"\n'
        f'key_file = "{key}"')))
    operator = [f"--ca-file={fleet.pki / 'ca.pem'}", f"--cert-file={fleet.operator[0]}",
                f"--key-file={fleet.operator[1]}"]

    def edgefleet(port: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgefleet.cli", "fleet", *args,
                               "--broker", f"mqtts://127.0.0.1:{port}", *operator],
                              capture_output=True, text=True, timeout=180)

    agent = AgentProcess(config).start()
    try:
        for port in (fleet.operator_port, fleet.port):  # the operator may use either listener
            for _ in range(20):  # until the agent is up
                out = edgefleet(port, "call", "edge-e2e", "ping", "--timeout", "3")
                if out.returncode == 0:
                    break
            assert out.returncode == 0, out.stderr + agent.logs()
            assert json.loads(out.stdout)["data"]["pong"] is True
        # a delivery: the deploy request, the chunks on blobs/, model/lin/state, a new birth
        out = edgefleet(fleet.operator_port, "deploy", str(package), "--device", "edge-e2e",
                        "--health-window", "1", "--timeout", "60", "--json")
        assert out.returncode == 0, out.stdout + out.stderr + agent.logs()
        models = edgefleet(fleet.operator_port, "call", "edge-e2e", "models")
        assert "lin" in models.stdout, models.stdout + models.stderr
    finally:
        assert agent.stop() == 0
    log = fleet.log.read_text()
    assert "as edge-e2e (p5" in log
    denied = [line for line in log.splitlines() if "Denied" in line and "edge-e2e" in line]
    assert denied == [], denied  # the agent needed no topic the ACL refuses


def test_every_fleet_tool_works_over_mutual_tls_and_commands_are_signed(
        fleet: Fleet, tmp_path: Path, keys_dir: Path, signed_digits_package: Any) -> None:
    """The agent, fleet call/status/collect/rollback and sensor simulate on the broker
    `pki mosquitto` configures; the device obeys only signed commands; a wrong CA and a wrong
    host name are refused with one line."""
    import sqlite3

    from runtime.signing import generate_keypair
    from tests.support.tls import make_ca_and_server

    device = "edge-tools"
    pki.issue_device(fleet.pki, device)
    command_key = tmp_path / "command"
    generate_keypair(command_key)
    config = write_config(tmp_path / "agent.toml", device_id=device,
                          broker_url=f"mqtts://127.0.0.1:{fleet.port}", data_dir=tmp_path / "data",
                          package=signed_digits_package.path, keys=[keys_dir / "fleet.pub"],
                          command_keys=[command_key / "fleet.pub"])
    cert, key = fleet.device(device)
    config.write_text(config.read_text().replace("keepalive_s = 5", (
        f'keepalive_s = 5\nca_file = "{fleet.pki / "ca.pem"}"\ncert_file = "{cert}"\n'
        f'key_file = "{key}"')))
    ca = f"--ca-file={fleet.pki / 'ca.pem'}"
    operator = [ca, f"--cert-file={fleet.operator[0]}", f"--key-file={fleet.operator[1]}"]
    on_port = f"--broker=mqtts://127.0.0.1:{fleet.operator_port}"

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgefleet.cli", *args],
                              capture_output=True, text=True, timeout=timeout)

    agent = AgentProcess(config).start()
    try:
        for _ in range(20):
            ping = run("fleet", "call", device, "ping", "--timeout", "3", on_port, *operator)
            if ping.returncode == 0:
                break
        assert ping.returncode == 0, ping.stderr + agent.logs()
        unsigned = run("fleet", "call", device, "config", on_port, *operator)
        assert unsigned.returncode == 1
        assert json.loads(unsigned.stdout)["error"]["code"] == "unauthorized"
        signed = run("fleet", "call", device, "config", on_port, *operator,
                     "--sign-key", str(command_key / "fleet.key"))
        assert signed.returncode == 0, signed.stdout + signed.stderr
        assert json.loads(signed.stdout)["data"]["device_id"] == device
        status = run("fleet", "status", "--json", "--wait", "2", on_port, *operator)
        assert status.returncode == 0, status.stderr
        assert {r["device"]: r["state"] for r in json.loads(status.stdout)}[device] == "online"

        db = tmp_path / "results.db"
        collect = subprocess.Popen(
            [sys.executable, "-m", "edgefleet.cli", "fleet", "collect", "--db", str(db),
             "--device", device, "--count", "20", "--duration", "90", "--json", on_port,
             *operator], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)  # subscribed before the sensor sends
        sensor_cert, sensor_key = fleet.device(SENSOR)
        sent = run("sensor", "simulate", "--device", device, "--stream", "cam", "--dataset",
                   "digits", "--rate", "50", "--count", "20", "--json",
                   f"--broker=mqtts://127.0.0.1:{fleet.port}", ca, f"--cert-file={sensor_cert}",
                   f"--key-file={sensor_key}")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        out, err = collect.communicate(timeout=120)
        assert collect.returncode == 0, out + err
        with sqlite3.connect(db) as conn:
            (rows,) = conn.execute("SELECT COUNT(*) FROM results").fetchone()
        assert rows == 20
    finally:
        assert agent.stop() == 0

    # a CA that did not sign the broker, and a host name its certificate does not carry
    other = make_ca_and_server(tmp_path / "other-ca")
    wrong_ca = run("fleet", "status", "--wait", "1", on_port, f"--ca-file={other['ca']}",
                   f"--cert-file={fleet.operator[0]}", f"--key-file={fleet.operator[1]}")
    wrong_host = run("fleet", "status", "--wait", "1",
                     f"--broker=mqtts://127.0.0.2:{fleet.operator_port}", *operator)
    for refused, why in ((wrong_ca, "certificate verify failed"), (wrong_host, "127.0.0.2")):
        assert refused.returncode == 2, refused.stdout + refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert why in lines[0], lines[0]
        assert "Traceback" not in refused.stderr
