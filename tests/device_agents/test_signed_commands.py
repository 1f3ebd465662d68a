"""Signed commands (CONTRACT 10): the guard on its own, then a real agent with command_keys.

Every refusal must be `unauthorized` and change nothing; the signed command must still work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agents.commands import (
    CLOCK_SKEW_S,
    CommandGuard,
    NonceLedger,
    UnauthorizedError,
    sign,
)
from runtime.signing import load_private_key, load_public_key
from tests.device_agents.conftest import Bench
from tests.support.agent import ROOT, wait_for_status

NOW = 1_800_000_000.0


@pytest.fixture(scope="session")
def operator(keys_dir: Path) -> Path:
    """The session's key pair, here in the operator's role."""
    return keys_dir


@pytest.fixture(scope="session")
def stranger(other_keys_dir: Path) -> Path:
    return other_keys_dir


def guard(operator: Path, tmp: Path, *, required: bool = True,
          clock: float = NOW) -> CommandGuard:
    ledger = NonceLedger(tmp / "commands.db", clock=lambda: clock)
    return CommandGuard("edge-a", [load_public_key(operator / "fleet.pub")], required, ledger,
                        clock=lambda: clock)


def signed(operator: Path, command: str, args: dict[str, Any], *, device: str = "edge-a",
           at: float = NOW, lifetime: int = 300) -> dict[str, Any]:
    return sign(load_private_key(operator / "fleet.key"), device, command, args,
                lifetime_s=lifetime, clock=lambda: at)


def test_a_signed_command_passes_once_with_its_arguments_and_without_auth(
        operator: Path, tmp_path: Path) -> None:
    g = guard(operator, tmp_path)
    args = signed(operator, "rollback", {"transaction": "t1", "model": "digits"})
    assert g.check("rollback", args) == {"transaction": "t1", "model": "digits"}
    with pytest.raises(UnauthorizedError, match="replayed"):
        g.check("rollback", args)
    # the ledger is on disk: a restarted agent refuses the replay too
    again = guard(operator, tmp_path)
    with pytest.raises(UnauthorizedError, match="replayed"):
        again.check("rollback", args)
    assert g.refused == 1
    assert again.refused == 1


@pytest.mark.parametrize(("case", "match"), [
    ("unsigned", "must be signed"),
    ("other device", "bad signature"),
    ("other command", "bad signature"),
    ("changed argument", "bad signature"),
    ("added argument", "bad signature"),
    ("stranger's key", "not one of this device's command_keys"),
    ("stranger claims operator's key", "bad signature"),
    ("expired", "expired"),
    ("too long", "more than the 3600 s"),
    ("truncated signature", "not an Ed25519"),
    ("not base64", "not base64"),
    ("extra field", "auth"),
])
def test_refusals(operator: Path, stranger: Path, tmp_path: Path, case: str, match: str) -> None:
    g = guard(operator, tmp_path)
    base = {"transaction": "t", "model": "digits"}
    command = "rollback"
    if case == "unsigned":
        args = dict(base)
    elif case == "other device":
        args = signed(operator, command, base, device="edge-b")
    elif case == "other command":
        args = signed(operator, "config", base)
    elif case == "changed argument":
        args = {**signed(operator, command, base), "model": "other"}
    elif case == "added argument":
        args = {**signed(operator, command, base), "force": True}
    elif case == "stranger's key":
        args = signed(stranger, command, base)
    elif case == "stranger claims operator's key":
        args = signed(stranger, command, base)
        args["auth"]["key"] = signed(operator, command, base)["auth"]["key"]
    elif case == "expired":
        args = signed(operator, command, base, at=NOW - 300 - CLOCK_SKEW_S - 1)
    elif case == "too long":
        args = signed(operator, command, base, lifetime=24 * 3600)
    elif case == "truncated signature":
        args = signed(operator, command, base)
        args["auth"]["sig"] = args["auth"]["sig"][:40]
    elif case == "not base64":
        args = signed(operator, command, base)
        args["auth"]["sig"] = "!!" + args["auth"]["sig"][2:]
    else:
        args = signed(operator, command, base)
        args["auth"]["role"] = "admin"
    with pytest.raises(UnauthorizedError, match=match):
        g.check(command, args)
    # a refused command uses up no nonce: the genuine one still passes afterwards
    assert g.check(command, signed(operator, command, base))["model"] == "digits"


def test_ping_needs_no_signature_and_nothing_is_required_without_keys(
        operator: Path, tmp_path: Path) -> None:
    assert guard(operator, tmp_path).check("ping", {"transaction": 1}) == {"transaction": 1}
    open_door = CommandGuard("edge-a", [], required=False, ledger=None)
    assert open_door.check("rollback", {"model": "m"}) == {"model": "m"}
    relaxed = guard(operator, tmp_path, required=False)
    with pytest.raises(UnauthorizedError):  # signed but wrongly: refused even when optional
        relaxed.check("rollback", signed(operator, "config", {"model": "m"}))


def test_a_full_disk_refuses_the_command_rather_than_forget_its_nonce(
        operator: Path, tmp_path: Path) -> None:
    g = guard(operator, tmp_path)
    assert g.ledger is not None
    g.ledger.close()  # every write now fails, as on a disk that cannot take one
    with pytest.raises(UnauthorizedError, match="cannot record"):
        g.check("rollback", signed(operator, "rollback", {"model": "m"}))


@settings(max_examples=300, deadline=None)
@given(auth=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["key", "nonce", "expires", "sig", "x"]), inner, max_size=5),
    max_leaves=12))
def test_any_auth_value_is_refused_cleanly(operator: Path, auth: Any) -> None:
    g = CommandGuard("edge-a", [load_public_key(operator / "fleet.pub")], True, None,
                     clock=lambda: NOW)  # no ledger: nothing may get as far as a nonce
    with pytest.raises(UnauthorizedError):
        g.check("config", {"transaction": "t", "auth": auth})


# -- a real agent ------------------------------------------------------------------------------

def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet.cli", "fleet", *args],
                          capture_output=True, text=True, timeout=60)


def test_a_real_agent_obeys_only_signed_commands(bench: Bench, operator: Path,
                                                 stranger: Path) -> None:
    bench.write(command_keys=[operator / "fleet.pub"])
    watcher = bench.peer()
    agent = bench.agent()
    wait_for_status(watcher, "online")
    dev, url = bench.device_id, bench.broker.url
    req = f"{ROOT}/{dev}/request"

    def send(command: str, body: dict[str, Any]) -> dict[str, Any]:
        watcher.client.publish(f"{req}/{command}", json.dumps(body), qos=1)
        answer: dict[str, Any] = watcher.collect(f"/response/{command}", 1)[0]
        return answer

    assert json.loads(fleet("call", dev, "ping", "--broker", url).stdout)["status"] == "ok"
    unsigned = fleet("call", dev, "config", "--broker", url)
    assert unsigned.returncode == 1
    refusal = json.loads(unsigned.stdout)
    assert refusal["error"]["code"] == "unauthorized", refusal
    assert "must be signed" in refusal["error"]["message"]
    ok = fleet("call", dev, "config", "--broker", url, "--sign-key", str(operator / "fleet.key"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["data"]["device_id"] == dev

    # a stranger's key, a command signed for another device, and a replay: refused, no change
    wrong = fleet("rollback", "--device", dev, "--model", "digits", "--broker", url,
                  "--sign-key", str(stranger / "fleet.key"))
    assert json.loads(wrong.stdout)["error"]["code"] == "unauthorized"
    elsewhere = signed(operator, "rollback", {"transaction": "t-b", "model": "digits"},
                       device="edge-b", at=time.time())
    assert send("rollback", elsewhere)["error"]["code"] == "unauthorized"
    models = signed(operator, "models", {"transaction": "m1"}, device=dev, at=time.time())
    first = send("models", models)
    assert first["status"] == "ok", first
    assert first["data"][0]["active"] == "1"
    replay = send("models", models)
    assert replay["error"]["code"] == "unauthorized"
    assert "replayed" in replay["error"]["message"]

    # after a restart the nonce is still known
    agent.stop()
    agent = bench.agent()
    while wait_for_status(watcher, "online")["epoch"] < 2:
        pass
    again = send("models", models)
    assert again["error"]["code"] == "unauthorized"
    assert "replayed" in again["error"]["message"]
    assert "refused" in agent.logs()


def test_a_ledger_that_cannot_be_opened_refuses_signed_commands(operator: Path,
                                                                tmp_path: Path) -> None:
    """A full or read-only data dir: signed commands are refused, nothing raises at start."""
    from device_agents.commands import open_ledger

    ledger = open_ledger(tmp_path / "no-such-dir" / "commands.db")  # sqlite cannot create it
    g = CommandGuard("edge-a", [load_public_key(operator / "fleet.pub")], True, ledger,
                     clock=lambda: NOW)
    with pytest.raises(UnauthorizedError, match="cannot record command nonces"):
        g.check("config", signed(operator, "config", {}))
    assert g.check("ping", {}) == {}
