"""`edgefleet sensor simulate`: datasets, usage errors, and real runs against a real agent."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from device_agents.config import BrokerConfig
from device_agents.sensors import DatasetError, Progress, SensorError, SensorSimulator, load_dataset
from edgefleet.cli import cli
from tests.device_agents.conftest import Bench

DOCS = Path(__file__).parent.parent.parent / "docs" / "sensors.md"


def simulate(*args: str) -> Result:
    return CliRunner().invoke(cli, ["sensor", "simulate", *args])


def simulate_json(bench: Bench, *args: str) -> dict[str, Any]:
    out = simulate("--device", bench.device_id, "--stream", "cam", "--broker", bench.broker.url,
                   "--json", *args)
    assert out.exit_code == 0, out.output
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


# -- datasets ----------------------------------------------------------------------------------

def test_digits_is_the_test_split_the_example_models_are_scored_on(digits_split: Any) -> None:
    ds = load_dataset("digits")
    assert ds.x.shape == digits_split.x_test.shape == (450, 1, 8, 8)
    assert ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.x, digits_split.x_test)
    assert ds.labels == tuple(str(v) for v in digits_split.y_test)
    assert ds.x.min() == 0
    assert ds.x.max() == 16
    x, label = ds.sample(450 + 3)  # cycles
    np.testing.assert_array_equal(x, digits_split.x_test[3])
    assert label == str(digits_split.y_test[3])


def test_digits_without_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(DatasetError, match=r"pip install 'edgefleet\[compress\]'"):
        load_dataset("digits")


def test_sine_windows_with_and_without_noise() -> None:
    clean = load_dataset("sine", window=16)
    assert clean.x.shape[1:] == (16,)
    assert clean.x.dtype == np.float32
    assert clean.labels is None
    np.testing.assert_allclose(clean.x[1, :-1], clean.x[0, 1:])  # one signal, hopping by one
    assert np.abs(clean.x).max() <= 1.0
    noisy = load_dataset("sine", window=16, noise=0.2)
    assert 0.1 < float(np.std(noisy.x - clean.x)) < 0.3
    with pytest.raises(DatasetError, match="--window"):
        load_dataset("sine", window=0)


def test_npz_samples_and_labels(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    np.savez(tmp_path / "xy.npz", x=x, y=np.array([3.0, 1.0, 2.0, 0.0]))
    ds = load_dataset(str(tmp_path / "xy.npz"))
    np.testing.assert_array_equal(ds.x, x)
    assert ds.labels == ("3", "1", "2", "0")  # class 3 saved as a float still reads "3"
    np.savez(tmp_path / "named.npz", image=x, labels=np.array(["a", "b", "c", "d"]))
    ds = load_dataset(str(tmp_path / "named.npz"))  # the layout of `compress --eval` files
    assert ds.sample_shape == (2, 3)
    assert ds.labels == ("a", "b", "c", "d")
    np.savez(tmp_path / "bare.npz", x)
    assert load_dataset(str(tmp_path / "bare.npz")).labels is None


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("not a zip"), "not a readable .npz"),
    (lambda p: np.savez(p, x=np.array([{"a": 1}], dtype=object)), "not a readable .npz"),
    (lambda p: np.savez(p, x=np.zeros((0, 3))), "holds no samples"),
    (lambda p: np.savez(p, x=np.array(["a", "b"])), "samples must be numbers"),
    (lambda p: np.savez(p, x=np.zeros((3, 2)), y=np.zeros(2)), "one label per sample"),
    (lambda p: np.savez(p, labels=np.zeros(2)), "no sample array"),
    (lambda p: np.savez(p), "holds no arrays"),
])
def test_bad_npz_files_are_named_errors(tmp_path: Path, make: Any, message: str) -> None:
    path = tmp_path / "data.npz"
    make(path)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(path))


def test_the_sensor_side_imports_no_torch() -> None:
    code = ("import sys\nfrom device_agents.sensors import cli, load_dataset\n"
            "load_dataset('digits')\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- usage errors: exit 2, one line --------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "mnist"], "unknown dataset 'mnist': use digits, sine or the path of a .npz"),
    (["--dataset", "missing.npz"], "missing.npz: no such file"),
    (["--rate", "-5"], "--rate must be 0 (as fast as possible) or more Hz, got -5.0"),
    (["--qos", "2"], "--qos must be 0 or 1, got 2"),
    (["--count", "0"], "--count must be at least 1"),
    (["--device", "a/b"], "--device 'a/b' is not a device id"),
    (["--stream", "cam/#"], "--stream 'cam/#' is not a stream name"),
    (["--broker", "http://nope"], "must look like mqtt://host:port"),
])
def test_bad_usage_is_one_line_with_exit_2(args: list[str], message: str) -> None:
    base = {"--device": "edge-001", "--stream": "cam", "--dataset": "sine"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    out = simulate(*[part for item in base.items() for part in item])
    assert out.exit_code == 2, out.output
    assert message in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.output


def test_a_non_number_rate_is_a_click_usage_error() -> None:
    out = simulate("--device", "d", "--stream", "s", "--dataset", "sine", "--rate", "fast")
    assert out.exit_code == 2
    assert "'fast' is not a valid float" in out.stderr


def test_an_unreachable_broker_is_one_clear_line() -> None:
    out = simulate("--device", "d", "--stream", "s", "--dataset", "sine", "--connect-timeout",
                   "1", "--broker", "mqtt://127.0.0.1:1")
    assert out.exit_code == 2
    assert out.stderr.count("\n") == 1, out.stderr
    assert "cannot connect to mqtt://127.0.0.1:1" in out.stderr
    assert "check --broker" in out.stderr


def test_unanswered_messages_are_lost_and_exit_1(broker: Any) -> None:
    out = simulate("--device", "nobody-here", "--stream", "s", "--dataset", "sine", "--count", "3",
                   "--rate", "0", "--wait-results", "--timeout", "0.5", "--json",
                   "--broker", broker.url)
    assert out.exit_code == 1
    summary = json.loads(out.stdout)
    assert (summary["sent"], summary["answered"], summary["lost"]) == (3, 0, 3)
    assert summary["unconfirmed"] == 0  # the broker took them all: nobody answered


# -- against a real agent --------------------------------------------------------------------

def test_digits_qos1_lists_are_all_answered_and_scored(bench: Bench) -> None:
    bench.start_online()
    s = simulate_json(bench, "--dataset", "digits", "--count", "90", "--rate", "300",
                      "--qos", "1", "--wait-results")
    assert (s["sent"], s["answered"], s["errors"], s["lost"]) == (90, 90, 0, 0)
    assert s["accuracy"] > 0.8
    assert s["answered_by_version"] == {"1": 90}
    assert s["accuracy_by_version"]["1"] == s["accuracy"]
    assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
    assert (s["qos"], s["encoding"], s["unconfirmed"]) == (1, "lists", 0)


def test_qos0_b64_bad_input_and_fire_and_forget(bench: Bench) -> None:
    watcher, _ = bench.start_online()
    s = simulate_json(bench, "--dataset", "digits", "--count", "60", "--rate", "0",
                      "--qos", "0", "--encoding", "b64", "--wait-results")
    assert (s["sent"], s["answered"], s["lost"]) == (60, 60, 0)
    assert s["accuracy"] > 0.8
    # a sine window is not an 8x8 image: every message comes back as an error, none lost
    s = simulate_json(bench, "--dataset", "sine", "--count", "5", "--wait-results")
    assert (s["answered"], s["errors"], s["lost"]) == (0, 5, 0)
    assert s["error_codes"] == {"bad_input": 5}
    assert s["accuracy"] is None
    # without --wait-results: the table, exit 0, and the device still answers each message
    out = simulate("--device", bench.device_id, "--stream", "plain", "--broker", bench.broker.url,
                   "--dataset", "digits", "--count", "4", "--rate", "50")
    assert out.exit_code == 0, out.output
    assert "4 in" in out.stdout
    assert "answered" not in out.stdout
    assert len(watcher.collect("/out/plain", 4, timeout=20)) == 4


def test_an_npz_dataset_from_python_with_progress(bench: Bench, tmp_path: Path,
                                                  digits_split: Any) -> None:
    bench.start_online()
    np.savez(tmp_path / "few.npz", x=digits_split.x_test[:20],
             y=digits_split.y_test[:20].astype(np.float64))
    seen: list[Progress] = []
    simulator = SensorSimulator(BrokerConfig(url=bench.broker.url), bench.device_id, "cam",
                                load_dataset(str(tmp_path / "few.npz")), rate_hz=100, count=40,
                                qos=1, wait_results=True, on_progress=seen.append)
    summary = simulator.run()
    assert (summary.sent, summary.answered, summary.lost) == (40, 40, 0)
    assert summary.accuracy is not None
    assert summary.accuracy > 0.8
    assert summary.dataset == "few.npz"
    assert seen
    assert seen[-1].answered == 40
    assert seen[-1].version == "1"
    assert [p.sent for p in seen] == sorted(p.sent for p in seen)
    with pytest.raises(SensorError, match="--qos must be 0 or 1"):
        SensorSimulator(BrokerConfig(), "d", "s", load_dataset("sine"), qos=2)


@pytest.mark.parametrize("doc", [DOCS, DOCS.parent.parent / "README.md"], ids=["docs", "readme"])
def test_the_mosquitto_pub_example_in_the_docs_works(bench: Bench, doc: Path) -> None:
    """The two commands of docs/sensors.md and of the README, run as written (test broker and
    device substituted)."""
    bench.start_online()
    lines = [x.split("   #")[0] for x in doc.read_text().splitlines()]

    def command(program: str) -> list[str]:
        line = next(x for x in lines if x.startswith(program + " ") and "/camera0" in x)
        line = line.replace("-h 127.0.0.1 -p 1883", f"-h {bench.broker.host} -p {bench.broker.port}")
        return shlex.split(line.replace("edge-001", bench.device_id))

    sub = subprocess.Popen([*command("mosquitto_sub"), "-C", "1", "-W", "30"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)  # mosquitto_sub has no "subscribed" signal
    subprocess.run(command("mosquitto_pub"), check=True, timeout=30)
    out, _ = sub.communicate(timeout=40)
    topic, _, payload = out.strip().partition(" ")
    assert topic == f"edgefleet/v1/{bench.device_id}/out/camera0"
    result = json.loads(payload)
    assert result["id"] == "img-1"
    assert result["label"] == "0"
