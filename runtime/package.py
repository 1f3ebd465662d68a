"""Model packages: a directory with model.onnx, manifest.json and (when signed) manifest.sig.

The manifest records the model's SHA-256 and size, and the signature covers the manifest's exact
bytes, so one Ed25519 check plus one hash proves the whole package. Reading checks in the order
that gives the most useful message: format, schema, signature, then the (possibly large) model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from runtime.errors import (
    IntegrityError,
    ManifestError,
    PackageNotFoundError,
    SignatureError,
    UnsupportedFormatError,
)
from runtime.processing import Normalize, PostprocessKind
from runtime.schema import TensorSpec

if TYPE_CHECKING:  # cryptography is imported only when a signature is made or checked
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from runtime.signing import PublicKey

FORMAT = "edgefleet-model/1"
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"


Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """manifest.json of CONTRACT section 4.

    Unknown keys are accepted and ignored, so packages from a newer edgefleet of the same
    format still load; a breaking change bumps `format` instead.
    """

    format: str = FORMAT
    name: Name
    version: Name
    created: str
    file: str = MODEL_FILE
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
    size: Annotated[int, msgspec.Meta(ge=0)]
    inputs: Annotated[list[TensorSpec], msgspec.Meta(min_length=1)]
    outputs: Annotated[list[TensorSpec], msgspec.Meta(min_length=1)]
    labels: list[str] | None = None
    preprocess: dict[str, Normalize] | None = None
    postprocess: PostprocessKind = "none"
    top_k: Annotated[int, msgspec.Meta(ge=1)] = 5  # how many labels a result lists in `top`
    signer: str | None = None  # fingerprint of the key that signed the package
    compression: dict[str, Any] = msgspec.field(default_factory=dict)
    metrics: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            datetime.fromisoformat(self.created)
        except ValueError:
            raise ValueError(f"created must be an ISO 8601 time, got {self.created!r}") from None
        # A manifest must never point outside its own directory.
        if not self.file or "/" in self.file or "\\" in self.file or self.file in {".", ".."}:
            raise ValueError(f"file must be a file name inside the package, got {self.file!r}")
        unknown = set(self.preprocess or {}) - {s.name for s in self.inputs}
        if unknown:
            raise ValueError(f"preprocess names unknown inputs: {sorted(unknown)}")

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = msgspec.to_builtins(self)
        return doc


@dataclass(frozen=True)
class Package:
    """A package read from disk and checked as far as the caller asked."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signed: bool
    verified_by: PublicKey | None

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.file


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_manifest(path: Path) -> tuple[Manifest, bytes]:
    """Parse and validate manifest.json; the format is checked before the schema."""
    if not path.is_dir():
        raise PackageNotFoundError(f"package directory {path} does not exist")
    manifest_path = path / MANIFEST_FILE
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise PackageNotFoundError(f"{manifest_path} is missing: {path} is not a model package"
                                   ) from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{manifest_path} must hold a JSON object")
    fmt = doc.get("format")
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith("edgefleet-model/"):
            raise UnsupportedFormatError(
                f"{manifest_path} declares format {fmt!r}; this edgefleet reads {FORMAT!r} "
                "(upgrade edgefleet to read newer packages)")
        raise ManifestError(f"{manifest_path} has format {fmt!r}, expected {FORMAT!r}")
    if isinstance(doc.get("version"), int):  # `--version 3` is fine as a number too
        doc["version"] = str(doc["version"])
    try:
        return msgspec.convert(doc, Manifest), raw
    except msgspec.ValidationError as exc:
        raise ManifestError(f"{manifest_path}: {exc}") from None


def load_package(
    path: Path | str,
    *,
    trusted_keys: Sequence[PublicKey] = (),
    require_signed: bool = False,
    check_hash: bool = True,
) -> Package:
    """Read a package and prove it: signature (when keys are given or required), size, hash."""
    path = Path(path)
    manifest, raw = read_manifest(path)
    signed, verified_by = _check_signature(path, manifest, raw, trusted_keys, require_signed)
    model_path = path / manifest.file
    try:
        size = model_path.stat().st_size
    except FileNotFoundError:
        raise PackageNotFoundError(f"{model_path} is missing from the package") from None
    if check_hash:
        if size != manifest.size:
            raise IntegrityError(f"{model_path} is {size} bytes, the manifest says "
                                 f"{manifest.size}: the file is truncated or was replaced")
        digest = sha256_file(model_path)
        if digest != manifest.sha256:
            raise IntegrityError(f"{model_path} does not match the manifest's sha256 "
                                 f"(expected {manifest.sha256[:12]}…, got {digest[:12]}…): "
                                 "the model file was modified")
    return Package(path=path, manifest=manifest, manifest_bytes=raw, signed=signed,
                   verified_by=verified_by)


def verify_manifest(path: Path | str, *, trusted_keys: Sequence[PublicKey] = (),
                    require_signed: bool = False) -> tuple[Manifest, bytes]:
    """Check manifest.json and its signature before the model file is there (a delivery checks
    this first, so an untrusted package is refused before a byte of the model is fetched)."""
    path = Path(path)
    manifest, raw = read_manifest(path)
    _check_signature(path, manifest, raw, trusted_keys, require_signed)
    return manifest, raw


def _check_signature(
    path: Path, manifest: Manifest, raw: bytes, trusted_keys: Sequence[PublicKey],
    require_signed: bool,
) -> tuple[bool, PublicKey | None]:
    sig_path = path / SIGNATURE_FILE
    if not sig_path.exists():
        if require_signed:
            raise SignatureError(f"package {path} is not signed ({SIGNATURE_FILE} is missing) and "
                                 "signed packages are required; sign it with --sign-key")
        return False, None
    if not trusted_keys:
        if require_signed:
            raise SignatureError("signed packages are required but no trusted key is configured")
        return True, None
    signature = sig_path.read_bytes()
    if len(signature) != 64:
        raise SignatureError(f"{sig_path} is not an Ed25519 signature "
                             f"(64 bytes expected, {len(signature)} found)")
    for key in trusted_keys:
        if key.verifies(signature, raw):
            return True, key
    trusted = ", ".join(f"{k.fingerprint} ({k.source})" for k in trusted_keys)
    if manifest.signer and manifest.signer not in {k.fingerprint for k in trusted_keys}:
        raise SignatureError(f"package {path} was signed by key {manifest.signer}, which is not "
                             f"trusted (trusted: {trusted}): wrong signing key")
    raise SignatureError(f"signature of package {path} does not match its manifest.json: the "
                         "manifest was modified after signing, or manifest.sig was replaced")


def write_package(
    path: Path | str,
    model: Path | bytes,
    *,
    name: str,
    version: str = "1",
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
    sign_key: Ed25519PrivateKey | None = None,
    **fields: Any,
) -> Package:
    """Write a package directory atomically file by file; the manifest is written last.

    inputs/outputs default to what onnxruntime reads from the model. Extra manifest fields
    (labels, preprocess, postprocess, compression, metrics, ...) pass through **fields.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_path = path / MODEL_FILE
    data = model.read_bytes() if isinstance(model, Path) else model
    _atomic_write(model_path, data)
    if inputs is None or outputs is None:
        from runtime.model import read_io_specs

        found_in, found_out = read_io_specs(model_path)
        inputs, outputs = inputs or found_in, outputs or found_out
    signer = None
    if sign_key is not None:
        from runtime.signing import fingerprint

        signer = fingerprint(sign_key.public_key())
    doc = msgspec.to_builtins({
        "format": FORMAT, "name": name, "version": str(version),
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "file": MODEL_FILE,
        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "inputs": list(inputs),
        "outputs": list(outputs), "signer": signer, **fields,
    })
    try:  # the same validation a reader applies: never write a package nobody can load
        manifest = msgspec.convert(doc, Manifest)
    except msgspec.ValidationError as exc:
        raise ManifestError(f"cannot write package {path}: {exc}") from None
    raw = (json.dumps(manifest.to_dict(), indent=2) + "\n").encode()
    _atomic_write(path / MANIFEST_FILE, raw)
    sig_path = path / SIGNATURE_FILE
    if sign_key is not None:
        _atomic_write(sig_path, sign_key.sign(raw))
    else:
        sig_path.unlink(missing_ok=True)
    return Package(path=path, manifest=manifest, manifest_bytes=raw, signed=sign_key is not None,
                   verified_by=None)


def _atomic_write(target: Path, data: bytes) -> None:
    """Write, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
