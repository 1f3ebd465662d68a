"""Model delivery through a real Mosquitto: hot swap while streaming, refusals, automatic
rollback, resume after a cut link and after `kill -9`, deltas, canaries, groups."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agents.chunks import chunk_file
from device_agents.linkem import LinkEmulator
from device_agents.protocol import encode_tensor
from runtime.package import write_package
from runtime.signing import load_private_key
from tests.device_agents.conftest import Bench
from tests.support.agent import AgentProcess, Peer, wait_for_status
from tests.support.mosquitto import Mosquitto
from tests.support.onnx_models import image_mlp, linear_model

LABELS = [str(i) for i in range(10)]


@pytest.fixture(scope="session")
def mlp(tmp_path_factory: pytest.TempPathFactory, keys_dir: Path, other_keys_dir: Path
        ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlp")
    key = load_private_key(keys_dir / "fleet.key")
    other = load_private_key(other_keys_dir / "fleet.key")

    def pkg(name: str, version: str, model: Path | bytes, sign: Any = key) -> Path:
        return write_package(root / name, model, name="mlp", version=version, labels=LABELS,
                             postprocess="softmax", sign_key=sign).path

    def garbage() -> Path:
        """Signed, hashes right, but the model file is not ONNX."""
        path = pkg("garbage", "7", image_mlp(root / "g.onnx", seed=7))
        junk = b"this is not an onnx model" * 4000
        (path / "model.onnx").write_bytes(junk)
        doc = json.loads((path / "manifest.json").read_text())
        doc.update(sha256=hashlib.sha256(junk).hexdigest(), size=len(junk))
        raw = json.dumps(doc).encode()
        (path / "manifest.json").write_bytes(raw)
        (path / "manifest.sig").write_bytes(key.sign(raw))
        return path

    return {
        "garbage": garbage(),
        "v1": pkg("v1", "1", image_mlp(root / "v1.onnx", seed=0)),
        "v2_head": pkg("v2-head", "2", image_mlp(root / "v2.onnx", seed=0, head_seed=1)),
        "v3_full": pkg("v3-full", "3", image_mlp(root / "v3.onnx", seed=3)),
        "nan": pkg("nan", "4", image_mlp(root / "nan.onnx", nan_on_real_input=True)),
        "nan_always": pkg("nan-always", "9", image_mlp(root / "nan9.onnx", nan_always=True)),
        "unsigned": pkg("unsigned", "5", image_mlp(root / "u.onnx", seed=5), sign=None),
        "wrong_key": pkg("wrong-key", "6", image_mlp(root / "w.onnx", seed=6), sign=other),
        "wrong_schema": pkg("wrong-schema", "8", linear_model(root / "lin.onnx", in_dim=4)),
    }


@pytest.fixture
def mlp_bench(tmp_path: Path, broker: Mosquitto, mlp: dict[str, Path], keys_dir: Path):  # type: ignore[no-untyped-def]
    b = Bench(tmp_path, broker, mlp["v1"], [keys_dir / "fleet.pub"])
    yield b
    b.close()


def fleet_deploy(broker_url: str, package: Path, *targets: str, timeout: float = 90,
                 extra: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    args = [a for t in targets for a in (("--group", t[6:]) if t.startswith("group:") else
                                         ("--device", t))]
    out = subprocess.run([sys.executable, "-m", "edgefleet.cli", "fleet", "deploy", str(package),
                          *args, "--broker", broker_url, "--health-window", "1",
                          "--timeout", str(timeout), "--json", *extra],
                         capture_output=True, text=True, timeout=timeout * 3)
    assert out.stdout, out.stderr
    return out.returncode, json.loads(out.stdout)


def image(i: int) -> list[Any]:
    rng = np.random.default_rng(i)
    return (rng.integers(0, 17, size=(1, 8, 8))).astype(float).tolist()


def test_deploy_hot_swaps_while_a_sensor_streams(mlp_bench: Bench, mlp: dict[str, Path]) -> None:
    watcher = mlp_bench.peer()
    sensor = mlp_bench.peer(subscribe=[])
    mlp_bench.agent()
    wait_for_status(watcher, "online")
    n = 400
    stop = threading.Event()

    def stream() -> None:
        for i in range(n):
            sensor.send("cam", {"id": i, "data": image(i)})
            time.sleep(0.01)
        stop.set()

    sender = threading.Thread(target=stream)
    sender.start()
    time.sleep(1)
    code, outcome = fleet_deploy(mlp_bench.broker.url, mlp["v3_full"], mlp_bench.device_id)
    sender.join()
    assert code == 0, outcome
    assert outcome["devices"][0]["phase"] == "active"
    assert outcome["devices"][0]["healthy"] is True
    results = watcher.drain("/out/cam", set(range(n)), timeout=60)
    versions = {doc["model"]["version"] for docs in results.values() for doc in docs}
    assert versions == {"1", "3"}, versions  # zero lost, some served by each version
    birth = wait_for_status(mlp_bench.peer(), "online")
    assert birth["models"][0]["version"] == "3"


@pytest.mark.parametrize(("package", "reason"), [
    ("unsigned", "not signed"),
    ("wrong_key", "not trusted"),
    ("garbage", "onnxruntime cannot load"),
    ("wrong_schema", "do not fit the streams"),
    ("nan_always", "not finite"),
])
def test_refused_packages_leave_the_old_version_serving(mlp_bench: Bench, mlp: dict[str, Path],
                                                        package: str, reason: str) -> None:
    watcher, _ = mlp_bench.start_online()
    code, outcome = fleet_deploy(mlp_bench.broker.url, mlp[package], mlp_bench.device_id)
    assert code == 1
    device = outcome["devices"][0]
    assert device["phase"] == "failed"
    assert reason in device["error"], device["error"]
    watcher.send("cam", {"id": "after", "data": image(1)})
    result = watcher.collect("/out/cam", 1)[0]
    assert result["model"]["version"] == "1"


def test_automatic_rollback_on_nan_outputs(mlp_bench: Bench, mlp: dict[str, Path]) -> None:
    watcher = mlp_bench.peer()
    sensor = mlp_bench.peer(subscribe=[])
    mlp_bench.agent()
    wait_for_status(watcher, "online")
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set():
            sensor.send("cam", {"id": i, "data": image(i)})
            i += 1
            time.sleep(0.02)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        code, outcome = fleet_deploy(mlp_bench.broker.url, mlp["nan"], mlp_bench.device_id,
                                     extra=("--health-window", "5"))
    finally:
        stop.set()
        sender.join()
    assert code == 1
    device = outcome["devices"][0]
    assert device["phase"] == "rolled_back", device
    assert "health window" in device["error"]
    watcher.send("cam", {"id": "after", "data": image(2)})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result = watcher.collect("/out/cam", 1)[0]
        if result["id"] == "after":
            assert result["model"]["version"] == "1"
            break


def test_bad_input_in_the_health_window_does_not_roll_a_healthy_model_back(
        mlp_bench: Bench, mlp: dict[str, Path]) -> None:
    """The health window counts the model's failures, not the sender's: a sensor sending wrong
    shapes, NaN inputs and broken JSON throughout the window gets its errors, and v3 stays."""
    watcher = mlp_bench.peer()
    sensor = mlp_bench.peer(subscribe=[])
    mlp_bench.agent()
    wait_for_status(watcher, "online")
    stop = threading.Event()
    bad: list[Any] = [{"data": [1.0, 2.0]}, {"data": encode_tensor(np.full((1, 8, 8), np.nan,
                                                                           dtype=np.float32))},
                      b"{broken", {"inputs": {"nope": image(0)}}]

    def stream() -> None:
        i = 0
        while not stop.is_set():
            payload = bad[i % len(bad)]
            sensor.send("cam", payload if isinstance(payload, bytes) else {**payload, "id": i})
            i += 1
            time.sleep(0.02)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        code, outcome = fleet_deploy(mlp_bench.broker.url, mlp["v3_full"], mlp_bench.device_id,
                                     extra=("--health-window", "4"))
    finally:
        stop.set()
        sender.join()
    assert code == 0, outcome
    device = outcome["devices"][0]
    assert (device["phase"], device["healthy"]) == ("active", True), device
    codes = {doc["code"] for doc in watcher.collect("/error", 20)}
    assert codes <= {"bad_input", "bad_payload"}, codes
    assert "bad_input" in codes, codes
    watcher.send("cam", {"id": "after", "data": image(2)})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result = watcher.collect("/out/cam", 1)[0]
        if result["id"] == "after":
            assert result["model"]["version"] == "3"
            break
    else:
        raise AssertionError("no answer after the window")


def test_head_only_update_sends_only_the_changed_chunks(mlp: dict[str, Path]) -> None:
    old = {c.sha256 for c in chunk_file(mlp["v1"] / "model.onnx")}
    new = chunk_file(mlp["v2_head"] / "model.onnx")
    changed = sum(c.size for c in new if c.sha256 not in old)
    assert changed <= 0.10 * sum(c.size for c in new), changed


def test_delta_deploy_reports_only_missing_bytes(mlp_bench: Bench, mlp: dict[str, Path]) -> None:
    mlp_bench.start_online()
    code, outcome = fleet_deploy(mlp_bench.broker.url, mlp["v2_head"], mlp_bench.device_id)
    assert code == 0, outcome
    size = (mlp["v2_head"] / "model.onnx").stat().st_size
    assert 0 < outcome["devices"][0]["need_bytes"] <= 0.10 * size


def test_deploying_the_active_version_is_a_quick_no_op(mlp_bench: Bench, mlp: dict[str, Path]
                                                     ) -> None:
    """The device already serves v1: it needs nothing, and says active and healthy at once (the
    deploy command would otherwise wait for a health window that never starts)."""
    mlp_bench.start_online()
    code, outcome = fleet_deploy(mlp_bench.broker.url, mlp["v1"], mlp_bench.device_id, timeout=20)
    assert code == 0, outcome
    device = outcome["devices"][0]
    assert device["healthy"], device
    assert device["need_bytes"] == 0


def _deploy_in_background(mlp_bench: Bench, package: Path) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(
        fleet_deploy(mlp_bench.broker.url, package, mlp_bench.device_id, timeout=120)))
    thread.start()
    return thread, result


def _wait_progress(watcher: Peer, device: str, at_least: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for doc in watcher.collect("/state", 1, timeout=deadline - time.monotonic()):
            if doc.get("phase") == "downloading" and doc.get("progress", 0) >= at_least:
                return
    raise TimeoutError("the download never got going")


def _interrupted_transfer(mlp_bench: Bench, package: Path, seed: int,
                          interrupt: Callable[[LinkEmulator, AgentProcess], None]) -> int:
    """Deploy over a 2 Mbit/s link, interrupt at 30%, and return the bytes that went down."""
    with LinkEmulator((mlp_bench.broker.host, mlp_bench.broker.port), "lte", down_mbps=2.0,
                      seed=seed) as link:
        mlp_bench.uplink_through(link)
        watcher, agent = mlp_bench.start_online()
        before = link.stats().bytes_down
        thread, result = _deploy_in_background(mlp_bench, package)
        _wait_progress(watcher, mlp_bench.device_id, 0.3)
        interrupt(link, agent)
        thread.join()
        sent = link.stats().bytes_down - before
    code, outcome = result[0]
    assert code == 0, (outcome["devices"], agent.logs()[-3000:])
    return sent


def test_resume_after_the_link_is_cut_mid_transfer(mlp_bench: Bench, mlp: dict[str, Path]) -> None:
    size = (mlp["v3_full"] / "model.onnx").stat().st_size

    def cut(link: LinkEmulator, agent: AgentProcess) -> None:
        link.cut("reset")
        time.sleep(2)
        link.restore()

    sent = _interrupted_transfer(mlp_bench, mlp["v3_full"], 3, cut)
    assert sent <= 1.2 * size, f"{sent} bytes down for a {size}-byte model: it started over"


def test_resume_after_kill_9_mid_transfer(mlp_bench: Bench, mlp: dict[str, Path]) -> None:
    size = (mlp["v3_full"] / "model.onnx").stat().st_size

    def kill(link: LinkEmulator, agent: AgentProcess) -> None:
        agent.stop(kill=True)
        mlp_bench.agent()

    sent = _interrupted_transfer(mlp_bench, mlp["v3_full"], 4, kill)
    assert sent <= 1.3 * size, f"{sent} bytes down for a {size}-byte model: it started over"


def test_canary_failure_stops_the_rollout_and_group_deploy(tmp_path: Path, broker: Mosquitto,
                                                           mlp: dict[str, Path], keys_dir: Path) -> None:
    benches = [Bench(tmp_path / f"d{i}", broker, mlp["v1"], [keys_dir / "fleet.pub"])
               for i in range(2)]
    group = f"g-{benches[0].device_id}"
    try:
        for b in benches:
            b.config.write_text(b.config.read_text().replace('groups = ["test"]',
                                                             f'groups = ["{group}"]'))
            b.start_online()
        code, outcome = fleet_deploy(broker.url, mlp["garbage"], f"group:{group}",
                                     extra=("--canary", "1"))
        assert code == 1
        phases = [d["phase"] for d in outcome["devices"]]
        assert phases == ["failed", "skipped"], outcome
        code, outcome = fleet_deploy(broker.url, mlp["v2_head"], f"group:{group}",
                                     extra=("--canary", "1"))
        assert code == 0, outcome
        assert [d["phase"] for d in outcome["devices"]] == ["active", "active"]
    finally:
        for b in benches:
            b.close()


def test_a_downgrade_is_refused_and_going_back_takes_a_signed_rollback(
        mlp_bench: Bench, mlp: dict[str, Path], tmp_path: Path) -> None:
    from runtime.signing import generate_keypair

    operator = tmp_path / "operator"
    generate_keypair(operator)
    sign = ("--sign-key", str(operator / "fleet.key"))
    mlp_bench.write(command_keys=[operator / "fleet.pub"])
    watcher, _ = mlp_bench.start_online()
    dev, url = mlp_bench.device_id, mlp_bench.broker.url

    def serving() -> str:
        watcher.send("cam", {"id": "which", "data": image(3)})
        version: str = watcher.collect("/out/cam", 1)[0]["model"]["version"]
        return version

    code, outcome = fleet_deploy(url, mlp["v2_head"], dev, extra=sign)
    assert code == 0, outcome
    assert serving() == "2"
    unsigned = fleet_deploy(url, mlp["v3_full"], dev)[1]["devices"][0]
    assert "unauthorized" in unsigned["error"] or "must be signed" in unsigned["error"], unsigned
    code, outcome = fleet_deploy(url, mlp["v1"], dev, extra=sign)
    assert code == 1
    assert "older than the floor 2" in outcome["devices"][0]["error"], outcome
    assert serving() == "2"

    def rollback(*extra: str) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "edgefleet.cli", "fleet", "rollback",
                              "--device", dev, "--model", "mlp", "--broker", url, *extra],
                             capture_output=True, text=True, timeout=60)
        answer: dict[str, Any] = json.loads(out.stdout)
        return answer

    assert rollback()["error"]["code"] == "unauthorized"
    assert serving() == "2"  # refused: nothing changed
    back = rollback(*sign)
    assert back["status"] == "ok", back
    assert back["data"]["active"] == "1"
    assert serving() == "1"
    # the floor stays at 2; deploying the version now active is a no-op, not a downgrade
    floors = json.loads((mlp_bench.data_dir / "models" / "state.json").read_text())
    assert floors["mlp"] == {"active": "1", "previous": "2", "floor": "2"}
    code, outcome = fleet_deploy(url, mlp["v1"], dev, extra=sign)
    assert code == 0, outcome


def test_a_chunk_list_that_lies_about_sizes_stores_nothing(mlp_bench: Bench,
                                                          mlp: dict[str, Path]) -> None:
    from device_agents import protocol
    from device_agents.fleet.deploy import plan

    watcher, _ = mlp_bench.start_online()
    the_plan = plan(mlp["v3_full"], 1.0, 0.2)
    assert len(the_plan.chunks) >= 2, "the test needs a model of several chunks"
    descriptor = dict(the_plan.descriptor)
    first, second = the_plan.chunks[0], the_plan.chunks[1]
    # same total as the signed manifest, but the first chunk declared larger than it is
    descriptor["chunks"] = ([[first.sha256, first.size + 100], [second.sha256, second.size - 100]]
                            + [[c.sha256, c.size] for c in the_plan.chunks[2:]])
    for c in the_plan.chunks:  # the real bytes, as the fleet tool publishes them
        watcher.client.publish(protocol.blob_topic(c.sha256),
                               the_plan.data[c.offset:c.offset + c.size], qos=1, retain=True)
    watcher.client.publish(f"edgefleet/v1/{mlp_bench.device_id}/request/deploy",
                           json.dumps({"transaction": "lie", **descriptor}), qos=1)
    deadline = time.monotonic() + 30
    failed = None
    while failed is None and time.monotonic() < deadline:
        for state in watcher.collect("/model/mlp/state", 1, timeout=deadline - time.monotonic()):
            if state["phase"] == "failed":
                failed = state
    assert failed is not None, "the delivery never failed"
    assert "the descriptor says" in failed["error"], failed
    loose = mlp_bench.data_dir / "chunks" / "loose"
    assert not loose.exists() or not any(loose.iterdir()), sorted(loose.iterdir())
    # the failed delivery gave its subscription window back: an honest one goes through
    code, outcome = fleet_deploy(mlp_bench.broker.url, mlp["v3_full"], mlp_bench.device_id)
    assert code == 0, outcome
    for c in the_plan.chunks:  # tidy the broker: retained chunks outlive the test otherwise
        watcher.client.publish(protocol.blob_topic(c.sha256), b"", qos=1, retain=True)


def test_versions_compare_as_dotted_integers() -> None:
    from device_agents.store import version_key

    ordered = ["1", "1.0-beta", "1.0", "1.2", "1.9", "1.10", "2rc1", "2rc2", "2", "9.2", "10",
               "10.0.1"]
    assert sorted(reversed(ordered), key=version_key) == ordered
    assert version_key("10") > version_key("9.2")
    assert version_key("1.10") > version_key("1.9")
    assert version_key("v10") > version_key("v9")
    assert version_key("2.0rc1") < version_key("2.0")


def test_a_signed_deploy_whose_chunk_list_was_changed_is_refused_before_a_byte_is_stored(
        mlp_bench: Bench, mlp: dict[str, Path], tmp_path: Path) -> None:
    from device_agents import commands, protocol
    from device_agents.fleet.deploy import plan
    from runtime.signing import generate_keypair

    operator = tmp_path / "operator"
    generate_keypair(operator)
    mlp_bench.write(command_keys=[operator / "fleet.pub"])
    watcher, _ = mlp_bench.start_online()
    the_plan = plan(mlp["v3_full"], 1.0, 0.2)
    body = commands.sign(load_private_key(operator / "fleet.key"), mlp_bench.device_id, "deploy",
                         {"transaction": "tampered", **the_plan.descriptor})
    first, second = the_plan.chunks[0], the_plan.chunks[1]
    body["chunks"] = ([[first.sha256, first.size + 100], [second.sha256, second.size - 100]]
                      + [[c.sha256, c.size] for c in the_plan.chunks[2:]])
    for c in the_plan.chunks:
        watcher.client.publish(protocol.blob_topic(c.sha256),
                               the_plan.data[c.offset:c.offset + c.size], qos=1, retain=True)
    try:
        watcher.client.publish(f"edgefleet/v1/{mlp_bench.device_id}/request/deploy",
                               json.dumps(body), qos=1)
        answer = watcher.collect("/response/deploy", 1)[0]
        assert answer["error"]["code"] == "unauthorized", answer
        assert "bad signature" in answer["error"]["message"]
        time.sleep(1)  # anything it would wrongly fetch has time to arrive
        chunks = mlp_bench.data_dir / "chunks" / "loose"
        assert not chunks.exists() or not any(chunks.iterdir()), sorted(chunks.iterdir())
        assert not (mlp_bench.data_dir / "deliveries" / f"{body['deployment']}.json").exists()
    finally:
        for c in the_plan.chunks:
            watcher.client.publish(protocol.blob_topic(c.sha256), b"", qos=1, retain=True)


def test_a_broken_active_package_falls_back_to_the_previous_version(
        mlp_bench: Bench, mlp: dict[str, Path]) -> None:
    watcher, agent = mlp_bench.start_online()
    code, outcome = fleet_deploy(mlp_bench.broker.url, mlp["v2_head"], mlp_bench.device_id)
    assert code == 0, outcome
    assert agent.stop() == 0
    model = mlp_bench.data_dir / "models" / "mlp" / "2" / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])  # a bad SD card
    events = mlp_bench.peer(subscribe=[f"edgefleet/v1/{mlp_bench.device_id}/event"])
    agent = mlp_bench.agent()
    while wait_for_status(watcher, "online")["epoch"] < 2:  # not the birth after the deploy
        pass
    watcher.send("cam", {"id": "after", "data": image(5)})
    result = watcher.collect("/out/cam", 1)[0]
    assert result["model"]["version"] == "1"
    (fault,) = events.collect("/event", 1, timeout=20)
    assert fault["type"] == "model_unloadable"
    assert (fault["model"], fault["version"], fault["fallback"]) == ("mlp", "2", "1")
    assert "the file is truncated or was replaced" in fault["reason"], fault
    assert agent.stop() == 0


def test_only_the_active_and_previous_versions_are_kept(mlp_bench: Bench,
                                                        mlp: dict[str, Path]) -> None:
    mlp_bench.start_online()
    for package in ("v2_head", "v3_full"):
        code, outcome = fleet_deploy(mlp_bench.broker.url, mlp[package], mlp_bench.device_id)
        assert code == 0, outcome
    models = mlp_bench.data_dir / "models" / "mlp"
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["2", "3"]
    staging = mlp_bench.data_dir / "staging"
    assert not staging.exists() or list(staging.iterdir()) == []


def _small_disk(tmp_path: Path, size: str) -> Path:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                                            "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (and a kernel that allows it here)")
    return mount


def test_a_delivery_the_disk_cannot_hold_is_refused_before_a_byte_is_fetched(
        tmp_path: Path, broker: Mosquitto, mlp: dict[str, Path], keys_dir: Path) -> None:
    """On a real small file system (a tmpfs, mounted by the test): the free-space check."""
    mount = _small_disk(tmp_path, "10m")
    bench = Bench(mount, broker, mlp["v1"], [keys_dir / "fleet.pub"])
    try:
        watcher, _ = bench.start_online()
        code, outcome = fleet_deploy(broker.url, mlp["v3_full"], bench.device_id)
        assert code == 1
        assert "not enough free space" in outcome["devices"][0]["error"], outcome
        loose = bench.data_dir / "chunks" / "loose"
        assert not loose.exists() or list(loose.iterdir()) == []
        watcher.send("cam", {"id": "still", "data": image(4)})
        assert watcher.collect("/out/cam", 1)[0]["model"]["version"] == "1"
    finally:
        bench.close()
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
