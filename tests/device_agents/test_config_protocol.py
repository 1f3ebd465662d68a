"""Config validation (every problem at once), the wire protocol's parsing, and backoff."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agents import protocol
from device_agents.config import ConfigError, load_config
from device_agents.protocol import (
    BAD_PAYLOAD,
    ProtocolError,
    Topics,
    encode_tensor,
    parse_sensor,
    peek_id,
)
from device_agents.transport import Backoff

GOOD = """
device_id = "edge-001"
groups = ["plant-a"]
data_dir = "{data}"

[uplink]
url = "mqtts://fleet.example:8883"
username = "edge-001"
password_env = "EDGEFLEET_TEST_PASSWORD"

[outbox]
max_bytes = 1048576
on_full = "reject-new"

[runtime]
threads = 1
"""


def test_a_good_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_TEST_PASSWORD", "s3cret")
    path = tmp_path / "agent.toml"
    path.write_text(GOOD.format(data=tmp_path / "data"))
    config = load_config(path)
    assert config.uplink.tls
    assert config.uplink.port == 8883
    assert config.uplink.password() == "s3cret"
    assert config.outbox.on_full == "reject-new"
    assert "s3cret" not in json.dumps(config.redacted())
    overridden = load_config(path, device_id="edge-002", broker="mqtt://10.0.0.1:1884")
    assert overridden.device_id == "edge-002"
    assert (overridden.uplink.host, overridden.uplink.port, overridden.uplink.tls) == (
        "10.0.0.1", 1884, False)


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("""
device_id = "bad id!"
colour = "blue"
[uplink]
url = "http://nope"
password_env = "X"
[outbox]
on_full = "explode"
max_bytes = "big"
[runtime]
threads = 0
[[models]]
package = "/nowhere"
streams = ["a b"]
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    for expected in ("device_id", "colour: unknown key", "uplink: broker URL 'http://nope'", "outbox.on_full",
                     "outbox.max_bytes", "runtime.threads", "models.0.streams"):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    assert len(info.value.problems) >= 7


def test_check_config_command_lists_problems(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "ok"\ndata_dir = "/tmp/x"\n[security]\ntrusted_keys = '
                    '["/no/such.pub"]\n[[models]]\npackage = "/no/pkg"\n')
    out = subprocess.run([sys.executable, "-m", "edgefleet.cli", "agent", "check-config",
                          "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "/no/such.pub does not exist" in out.stderr
    assert "/no/pkg is not a package" in out.stderr
    good = tmp_path / "good.toml"
    good.write_text(f'device_id = "ok"\ndata_dir = "{tmp_path}"\n')
    out = subprocess.run([sys.executable, "-m", "edgefleet.cli", "agent", "check-config",
                          "--config", str(good)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


@pytest.mark.parametrize(("text", "problem"), [
    ("device_id = [", "not valid TOML"),
    (None, "file not found"),
])
def test_unreadable_configs(tmp_path: Path, text: str | None, problem: str) -> None:
    path = tmp_path / "agent.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


def test_topics() -> None:
    t = Topics("edge-1")
    assert t.input("cam") == "edgefleet/v1/edge-1/in/cam"
    assert t.stream_of("edgefleet/v1/edge-1/in/cam") == "cam"
    assert t.stream_of("edgefleet/v1/edge-2/in/cam") is None
    assert t.command_of("edgefleet/v1/edge-1/request/ping") == "ping"
    assert t.inputs == "edgefleet/v1/edge-1/in/+"


def test_both_tensor_encodings_parse_to_the_same_array() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    nested = parse_sensor(json.dumps({"id": 1, "data": arr.tolist()}).encode(), 1 << 20)
    b64 = parse_sensor(json.dumps({"id": "x", "data": encode_tensor(arr)}).encode(), 1 << 20)
    assert isinstance(b64.inputs, np.ndarray)
    assert b64.inputs.dtype == np.float32
    np.testing.assert_allclose(np.asarray(nested.inputs, dtype=np.float32), b64.inputs)
    named = parse_sensor(b'{"inputs": {"a": [1, 2], "b": [[3]]}}', 1 << 20)
    assert isinstance(named.inputs, dict)
    assert set(named.inputs) == {"a", "b"}


def test_b64_is_little_endian() -> None:
    raw = np.array([1.5, -2.0], dtype="<f4").tobytes()
    doc = {"data": {"dtype": "float32", "shape": [2], "b64": base64.b64encode(raw).decode()}}
    parsed = parse_sensor(json.dumps(doc).encode(), 1 << 20)
    assert np.asarray(parsed.inputs).tolist() == [1.5, -2.0]


@pytest.mark.parametrize("payload", [
    b"", b"null", b'"text"', b'{"id": [1], "data": [1]}', b'{"inputs": {}}', b'{"inputs": [1]}',
    b'{"data": true}', b'{"data": {"dtype": "float32", "shape": [-1], "b64": ""}}',
    b'{"data": {"dtype": "float32", "shape": [1], "b64": "AAAAAA==", "extra": 1}}',
])
def test_malformed_messages_are_bad_payload(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_sensor(payload, 1 << 20)
    assert info.value.code == BAD_PAYLOAD


def test_size_limit() -> None:
    with pytest.raises(ProtocolError, match="over the 100-byte limit"):
        parse_sensor(b"{" + b" " * 200 + b"}", 100)


def test_peek_id() -> None:
    assert peek_id(b'{"id": "a", "data": [[1]]}', 1024) == "a"
    assert peek_id(b"{broken", 1024) is None
    assert peek_id(b'{"id": "a", "data": [[1]]}', 10) is None  # over the limit: not even read
    assert peek_id(b'{"id": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 1 << 20) is None
    assert peek_id(b'{"id": {"nested": 1}}', 1024) is None


def test_backoff_is_capped_exponential_with_jitter() -> None:
    backoff = Backoff(first_s=0.5, cap_s=8, rng=random.Random(1))
    waits = [backoff.next() for _ in range(10)]
    assert all(0.25 <= w <= 0.5 for w in waits[:1])
    assert all(w <= 8 for w in waits)
    assert waits[-1] >= 4  # reached the cap's range
    assert len({round(w, 6) for w in waits[5:]}) == 5  # jittered, not lockstep
    backoff.reset()
    assert backoff.next() <= 0.5


@pytest.mark.parametrize("device_id", ["edge-1\n", "edge/1", "edge+", "edge#", "edge\x00",
                                       "edge-1\r", "\u0085edge", ""])
def test_device_ids_that_could_make_a_topic_are_refused(tmp_path: Path, device_id: str) -> None:
    """A trailing newline once matched `$` (the trick behind CVE-2017-7650): names end at \\Z."""
    path = tmp_path / "agent.toml"
    path.write_text(f"device_id = {json.dumps(device_id)}\ndata_dir = \"{tmp_path}\"\n")
    with pytest.raises(ConfigError, match="device_id"):
        load_config(path)
    with pytest.raises(ProtocolError):
        Topics(device_id)


def test_health_window_parameters_come_bounded() -> None:
    base = {"deployment": "d", "name": "m", "version": "1", "manifest": "", "chunks": []}
    for field, value in (("health_window_s", float("nan")), ("health_window_s", float("inf")),
                         ("health_window_s", -1.0), ("max_error_rate", float("nan")),
                         ("max_error_rate", 1.5), ("max_error_rate", -0.1)):
        with pytest.raises(ProtocolError, match=field):
            protocol.parse_deploy({**base, field: value})
