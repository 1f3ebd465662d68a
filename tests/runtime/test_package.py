"""Packages: written, signed, read back, and every kind of damage refused with its own message."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from runtime.errors import (
    IntegrityError,
    ManifestError,
    PackageNotFoundError,
    SignatureError,
    UnsupportedFormatError,
)
from runtime.package import FORMAT, load_package, read_manifest, sha256_file, write_package
from runtime.signing import load_private_key, load_public_key


@pytest.fixture
def trusted(keys_dir: Path):  # type: ignore[no-untyped-def]
    return [load_public_key(keys_dir / "fleet.pub")]


def test_written_package_matches_contract(digits_package: Path, digits_onnx: Path):
    doc = json.loads((digits_package / "manifest.json").read_text())
    assert doc["format"] == FORMAT
    assert doc["file"] == "model.onnx"
    assert doc["sha256"] == sha256_file(digits_onnx)
    assert doc["size"] == digits_onnx.stat().st_size
    assert doc["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert doc["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]
    assert doc["labels"] == [str(i) for i in range(10)]
    assert doc["postprocess"] == "softmax"
    for key in ("name", "version", "created", "compression", "metrics", "preprocess"):
        assert key in doc
    assert len((digits_package / "manifest.sig").read_bytes()) == 64


def test_signed_package_verifies(digits_package: Path, trusted):
    pkg = load_package(digits_package, trusted_keys=trusted, require_signed=True)
    assert pkg.signed
    assert pkg.verified_by is not None
    assert pkg.verified_by.fingerprint == pkg.manifest.signer


def test_openssl_verifies_the_signature_independently(digits_package: Path, keys_dir: Path):
    result = subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(keys_dir / "fleet.pub"),
         "-rawin", "-in", str(digits_package / "manifest.json"),
         "-sigfile", str(digits_package / "manifest.sig")],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verified Successfully" in result.stdout


def test_tampered_model_is_refused(digits_package: Path, trusted):
    model = digits_package / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match the manifest's sha256"):
        load_package(digits_package, trusted_keys=trusted, require_signed=True)


def test_truncated_model_is_refused(digits_package: Path, trusted):
    model = digits_package / "model.onnx"
    model.write_bytes(model.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match="truncated"):
        load_package(digits_package, trusted_keys=trusted)


def test_tampered_manifest_is_refused(digits_package: Path, trusted):
    path = digits_package / "manifest.json"
    path.write_text(path.read_text().replace('"version": "1"', '"version": "2"'))
    with pytest.raises(SignatureError, match="modified after signing"):
        load_package(digits_package, trusted_keys=trusted, require_signed=True)


def test_manifest_hash_swapped_to_match_a_new_model_is_refused(digits_package: Path, trusted,
                                                               linear_onnx: Path):
    # An attacker replaces the model and fixes up sha256/size: only the signature catches it.
    shutil.copy(linear_onnx, digits_package / "model.onnx")
    path = digits_package / "manifest.json"
    doc = json.loads(path.read_text())
    doc["sha256"], doc["size"] = sha256_file(linear_onnx), linear_onnx.stat().st_size
    path.write_text(json.dumps(doc, indent=2))
    with pytest.raises(SignatureError, match="modified after signing"):
        load_package(digits_package, trusted_keys=trusted, require_signed=True)


def test_wrong_key_is_refused(digits_package: Path, other_keys_dir: Path):
    other = [load_public_key(other_keys_dir / "fleet.pub")]
    with pytest.raises(SignatureError, match=r"signed by key \w+, which is not trusted"):
        load_package(digits_package, trusted_keys=other, require_signed=True)


def test_unsigned_package_is_refused_when_signatures_are_required(digits_package: Path, trusted):
    (digits_package / "manifest.sig").unlink()
    with pytest.raises(SignatureError, match="not signed"):
        load_package(digits_package, trusted_keys=trusted, require_signed=True)
    assert not load_package(digits_package).signed  # allowed when not required


def test_garbage_signature_is_refused(digits_package: Path, trusted):
    (digits_package / "manifest.sig").write_bytes(b"not a signature")
    with pytest.raises(SignatureError, match="64 bytes expected"):
        load_package(digits_package, trusted_keys=trusted)


def test_missing_model_file_is_refused(digits_package: Path, trusted):
    (digits_package / "model.onnx").unlink()
    with pytest.raises(PackageNotFoundError, match=r"model\.onnx is missing"):
        load_package(digits_package, trusted_keys=trusted)


def test_missing_manifest_and_missing_directory(tmp_path: Path):
    with pytest.raises(PackageNotFoundError, match="does not exist"):
        load_package(tmp_path / "nowhere")
    with pytest.raises(PackageNotFoundError, match="not a model package"):
        load_package(tmp_path)


def test_unknown_format_version_is_refused(digits_package: Path):
    path = digits_package / "manifest.json"
    path.write_text(path.read_text().replace(FORMAT, "edgefleet-model/2"))
    with pytest.raises(UnsupportedFormatError, match=r"edgefleet-model/2.*upgrade edgefleet"):
        load_package(digits_package)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(sha256="xyz"), "sha256"),
    (lambda d: d.update(file="../../etc/passwd"), "file"),
    (lambda d: d.pop("inputs"), "inputs"),
    (lambda d: d.update(name="bad name!"), "name"),
    (lambda d: d.update(preprocess={"nope": {"scale": 1.0}}), "unknown inputs"),
    (lambda d: d.update(created="yesterday"), "created"),
])
def test_invalid_manifest_fields_are_named(digits_package: Path, edit, message: str):
    path = digits_package / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=message):
        read_manifest(digits_package)


def test_manifest_that_is_not_json(digits_package: Path):
    (digits_package / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_package(digits_package)


def test_unknown_manifest_keys_are_accepted_for_forward_compatibility(digits_package: Path):
    path = digits_package / "manifest.json"
    doc = json.loads(path.read_text())
    doc["future_field"] = {"x": 1}
    path.write_text(json.dumps(doc))
    manifest, raw = read_manifest(digits_package)
    assert manifest.name == "digits"
    assert json.loads(raw)["future_field"] == {"x": 1}  # still there for `package info --json`


def test_invalid_fields_are_refused_at_write_time(tmp_path: Path, linear_onnx: Path):
    with pytest.raises(ManifestError, match=r"cannot write package .*\$\.name"):
        write_package(tmp_path / "p", linear_onnx, name="no spaces allowed")


def test_unsigned_write_removes_a_stale_signature(tmp_path: Path, linear_onnx: Path,
                                                  keys_dir: Path):
    key = load_private_key(keys_dir / "fleet.key")
    write_package(tmp_path / "p", linear_onnx, name="lin", sign_key=key)
    assert (tmp_path / "p" / "manifest.sig").exists()
    write_package(tmp_path / "p", linear_onnx, name="lin", version="2")
    assert not (tmp_path / "p" / "manifest.sig").exists()
    assert load_package(tmp_path / "p").manifest.version == "2"
