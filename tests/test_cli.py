"""The `edgefleet` command: keys, package info/verify, errors as one line with the right exit code."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edgefleet import __version__
from edgefleet.cli import cli


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args))


def test_version_and_help():
    assert run("--version").output.strip().endswith(__version__)
    result = run("--help")
    assert result.exit_code == 0
    for name in ("keys", "package", "demo"):
        assert name in result.output
    for group in (("keys", "generate"), ("package", "info"), ("package", "verify")):
        sub = run(*group, "--help")
        assert sub.exit_code == 0
        assert "Example:" in sub.output


def test_keys_generate_writes_a_private_key_only_the_owner_reads(tmp_path: Path):
    result = run("keys", "generate", "--out", str(tmp_path / "k"), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert stat.S_IMODE((tmp_path / "k" / "fleet.key").stat().st_mode) == 0o600
    assert (tmp_path / "k" / "fleet.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(info["fingerprint"]) == 16
    again = run("keys", "generate", "--out", str(tmp_path / "k"))
    assert again.exit_code == 2
    assert "already exists; pass --force" in again.output
    assert run("keys", "generate", "--out", str(tmp_path / "k"), "--force").exit_code == 0


def test_package_info_table_and_json(digits_package: Path):
    table = run("package", "info", str(digits_package))
    assert table.exit_code == 0, table.output
    assert "digits v1" in table.output
    assert "float32[batch,1,8,8]" in table.output
    as_json = run("package", "info", str(digits_package), "--json")
    assert json.loads(as_json.output) == json.loads((digits_package / "manifest.json").read_text())


def test_package_verify_ok_and_failures(digits_package: Path, keys_dir: Path,
                                        other_keys_dir: Path):
    ok = run("package", "verify", str(digits_package), "--key", str(keys_dir / "fleet.pub"))
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("ok: digits v1")

    wrong = run("package", "verify", str(digits_package), "--key",
                str(other_keys_dir / "fleet.pub"))
    assert wrong.exit_code == 1
    assert "which is not trusted" in wrong.output

    model = digits_package / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    tampered = run("package", "verify", str(digits_package), "--key",
                   str(keys_dir / "fleet.pub"), "--json")
    assert tampered.exit_code == 1
    assert "sha256" in json.loads(tampered.output.splitlines()[0])["error"]


def test_bad_usage_is_exit_2_with_one_line(tmp_path: Path, digits_package: Path, keys_dir: Path):
    missing = run("package", "info", str(tmp_path / "nope"))
    assert missing.exit_code == 2
    assert missing.output.strip() == f"error: package directory {tmp_path / 'nope'} does not exist"
    private_as_public = run("package", "verify", str(digits_package), "--key",
                            str(keys_dir / "fleet.key"))
    assert private_as_public.exit_code == 2
    assert "looks like a private key" in private_as_public.output
    assert run("package", "verify", str(digits_package)).exit_code == 2  # --key is required
    assert run("nonsense").exit_code == 2


def test_console_script_prints_no_traceback(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "edgefleet", "package", "info", str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1
