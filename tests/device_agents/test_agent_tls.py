"""The agent over TLS (a test CA) with a username and a password from the environment."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.package import Package
from tests.support.agent import AgentProcess, write_config
from tests.support.mosquitto import Mosquitto
from tests.support.tls import make_ca_and_server


@pytest.fixture
def tls_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    pki = make_ca_and_server(tmp_path / "pki")
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "edge-tls", "s3cret-pw"],
                   check=True)
    broker = Mosquitto(tmp_path / "mq", tls=True, allow_anonymous=False, listener_options=(
        f"cafile {pki['ca']}\ncertfile {pki['cert']}\nkeyfile {pki['key']}\n"
        f"password_file {passwords}\n"))
    broker.start()
    yield broker, pki
    broker.stop()


def _status(broker: Mosquitto, pki: dict[str, Path], device: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(["mosquitto_sub", "-h", broker.host, "-p", str(broker.port),
                          "--cafile", str(pki["ca"]), "-u", "edge-tls", "-P", "s3cret-pw",
                          "-t", f"edgefleet/v1/{device}/status", "-C", "1", "-W", "20"],
                         capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout) if out.stdout else {}


def test_agent_connects_with_tls_and_password(tmp_path: Path, tls_broker, keys_dir: Path,  # type: ignore[no-untyped-def]
                                              signed_digits_package: Package) -> None:
    broker, pki = tls_broker
    config = write_config(tmp_path / "agent.toml", device_id="tls-dev", broker_url=broker.url,
                          data_dir=tmp_path / "data", package=signed_digits_package.path,
                          keys=[keys_dir / "fleet.pub"])
    text = config.read_text().replace(
        "keepalive_s = 5", f'keepalive_s = 5\nusername = "edge-tls"\npassword_env = '
        f'"EDGEFLEET_TEST_PW"\nca_file = "{pki["ca"]}"')
    config.write_text(text)
    agent = AgentProcess(config, env={"EDGEFLEET_TEST_PW": "s3cret-pw"}).start()
    try:
        status = _status(broker, pki, "tls-dev")
        assert status.get("state") == "online", agent.logs()
        assert "s3cret-pw" not in agent.logs()
    finally:
        agent.stop()


def test_wrong_password_is_retried_and_logged_not_fatal(tmp_path: Path, tls_broker,  # type: ignore[no-untyped-def]
                                                        keys_dir: Path) -> None:
    broker, pki = tls_broker
    config = write_config(tmp_path / "agent.toml", device_id="tls-bad", broker_url=broker.url,
                          data_dir=tmp_path / "data", package=None, keys=[keys_dir / "fleet.pub"])
    config.write_text(config.read_text().replace(
        "keepalive_s = 5", f'keepalive_s = 5\nusername = "edge-tls"\npassword_env = "PW"\n'
        f'ca_file = "{pki["ca"]}"'))
    agent = AgentProcess(config, env={"PW": "not-the-pw-7f3a"}).start()
    try:
        time.sleep(4)
        assert agent.proc is not None
        assert agent.proc.poll() is None, agent.logs()
        assert "refused the connection" in agent.logs()
        assert "not-the-pw-7f3a" not in agent.logs()
    finally:
        assert agent.stop() == 0


def test_agent_connects_with_a_client_certificate(tmp_path: Path, keys_dir: Path) -> None:
    pki = make_ca_and_server(tmp_path / "pki")
    broker = Mosquitto(tmp_path / "mq", tls=True, listener_options=(
        f"cafile {pki['ca']}\ncertfile {pki['cert']}\nkeyfile {pki['key']}\n"
        "require_certificate true\nuse_identity_as_username true\n"))
    broker.start()
    try:
        config = write_config(tmp_path / "agent.toml", device_id="edge-client", broker_url=broker.url,
                              data_dir=tmp_path / "data", package=None,
                              keys=[keys_dir / "fleet.pub"])
        config.write_text(config.read_text().replace(
            "keepalive_s = 5", f'keepalive_s = 5\nca_file = "{pki["ca"]}"\n'
            f'cert_file = "{pki["client_cert"]}"\nkey_file = "{pki["client_key"]}"'))
        agent = AgentProcess(config).start()
        try:
            out = subprocess.run(
                ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "--cafile",
                 str(pki["ca"]), "--cert", str(pki["client_cert"]), "--key",
                 str(pki["client_key"]), "-t", "edgefleet/v1/edge-client/status", "-C", "1",
                 "-W", "20"], capture_output=True, text=True, timeout=30)
            assert json.loads(out.stdout or "{}").get("state") == "online", agent.logs()
        finally:
            agent.stop()
    finally:
        broker.stop()


def test_a_client_certificate_must_name_the_device(tmp_path: Path, keys_dir: Path) -> None:
    """CN = device id, or the config is refused with the fix in the message."""
    from device_agents.config import ConfigError, load_config

    pki = make_ca_and_server(tmp_path / "pki")
    config = write_config(tmp_path / "agent.toml", device_id="edge-other",
                          broker_url="mqtts://127.0.0.1:8883", data_dir=tmp_path / "data",
                          package=None, keys=[keys_dir / "fleet.pub"])
    config.write_text(config.read_text().replace(
        "keepalive_s = 5", f'keepalive_s = 5\nca_file = "{pki["ca"]}"\n'
        f'cert_file = "{pki["client_cert"]}"\nkey_file = "{pki["client_key"]}"'))
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "the certificate is for 'edge-client', but device_id is 'edge-other'" in str(err.value)
    out = subprocess.run([sys.executable, "-m", "edgefleet.cli", "agent", "check-config",
                          "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "edgefleet pki issue --device edge-other" in out.stderr + out.stdout
