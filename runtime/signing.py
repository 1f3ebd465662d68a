"""Ed25519 keys and signatures for model packages, on top of `cryptography`.

A fleet has one signing key (kept by whoever builds packages) and devices trust its public half.
Keys are PEM files so that `openssl` can read them too; signatures are the raw 64 bytes, so that
`openssl pkeyutl -verify -rawin` can check a package independently of edgefleet.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime.errors import KeyFileError

PRIVATE_KEY_NAME = "fleet.key"
PUBLIC_KEY_NAME = "fleet.pub"


@dataclass(frozen=True)
class PublicKey:
    """A trusted public key with the path it came from, so that messages can name it."""

    key: Ed25519PublicKey
    source: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def verifies(self, signature: bytes, data: bytes) -> bool:
        try:
            self.key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


def fingerprint(key: Ed25519PublicKey) -> str:
    """Short, stable identity of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write `fleet.key` (PKCS#8 PEM, mode 0600) and `fleet.pub` into out_dir.

    Refuses to overwrite an existing key unless asked: losing a fleet key means re-signing and
    re-trusting every package, so it must never happen by accident.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    if not overwrite:
        for path in (priv_path, pub_path):
            if path.exists():
                raise KeyFileError(f"{path} already exists; pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Create the private key file with 0600 from the start: no window where others can read it.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv_pem)
    os.chmod(priv_path, 0o600)
    pub_path.write_bytes(pub_pem)
    return priv_path, pub_path, fingerprint(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> PublicKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        hint = " (this looks like a private key: pass the .pub file)" if b"PRIVATE" in data else ""
        raise KeyFileError(f"{path} is not a PEM public key{hint}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return PublicKey(key=key, source=str(path))


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
