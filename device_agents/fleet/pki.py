"""The fleet's X.509 identities (CONTRACT section 10): a fleet CA, the broker's certificate, the
operator's identity and one certificate per device, as PEM files that Mosquitto and paho read.

Every key is ECDSA P-256 with SHA-256 signatures: OpenSSL, Mosquitto and embedded TLS stacks
(mbedTLS, wolfSSL) all speak it, where Ed25519 certificates are still refused by many; its
handshakes are a fraction of RSA's in bytes and CPU, which counts over an NB-IoT link and on a
small edge CPU; and 128-bit security is what a fleet needs for a decade. (Command signing keys are
Ed25519 and live elsewhere: runtime.signing.)

Two roots, because Mosquitto cannot tie a certificate to a client id by itself:
- `ca.pem` (the fleet CA) signs the broker and the devices. Devices connect on the device
  listener, where Mosquitto replaces the client id with the certificate's CN
  (`use_username_as_clientid`), so no device can take over another's session.
- `operator-ca.pem` signs operator identities only. The operator tools need free client ids
  (`edgefleet-collect-<name>` persistent sessions, several at once), so they get a listener of
  their own without that rule; it trusts only this root, so a device certificate cannot connect
  there and pick a client id that kicks a device off. See fleet/mosquitto.py.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agents import protocol
from device_agents.durable import write_atomic
from device_agents.errors import DeviceAgentError

CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca.key"
OPERATOR_CA_CERT: Final = "operator-ca.pem"
OPERATOR_CA_KEY: Final = "operator-ca.key"
BROKER_CERT: Final = "broker.pem"
BROKER_KEY: Final = "broker.key"
OPERATOR_CERT: Final = "operator.pem"
OPERATOR_KEY: Final = "operator.key"
DEVICES: Final = "devices"
OPERATOR: Final = "operator"  # the operator's CN, hence its MQTT username and ACL user
# Names a device may not take: the operator's username would give it the operator's rights, and
# `blobs` is the topic level beside the device ids (edgefleet/v1/blobs/{sha256}).
RESERVED_IDS: Final = frozenset({OPERATOR, "blobs"})
RESERVED_PREFIX: Final = "edgefleet-"
DEFAULT_HOSTS: Final = ("127.0.0.1", "localhost")
DEFAULT_DAYS: Final = 3650
_CLOCK_SKEW: Final = datetime.timedelta(minutes=5)  # a device whose clock is a little behind
INIT_FILES: Final = (CA_CERT, CA_KEY, OPERATOR_CA_CERT, OPERATOR_CA_KEY, BROKER_CERT, BROKER_KEY,
                     OPERATOR_CERT, OPERATOR_KEY)


class PkiError(DeviceAgentError):
    """A PKI directory or a name cannot be used; the message says which and how to fix it."""


@dataclass(frozen=True)
class Issued:
    """A certificate written to disk, for the command to report."""

    cert: Path
    key: Path
    subject: str
    not_after: datetime.datetime


@dataclass(frozen=True)
class _Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


# -- files -------------------------------------------------------------------------------------

def write_file(path: Path, data: bytes, mode: int) -> None:
    """Temp file created with `mode` (a key is never readable by others, even for a moment),
    fsync, rename, fsync the directory: a crash leaves the old file or the new one."""
    write_atomic(path, data, mode)


def _save(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path,
          key_path: Path) -> Issued:
    write_file(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(cert_path, key_path, cert.subject.rfc4514_string(), cert.not_valid_after_utc)


def _load_authority(pki_dir: Path, cert_name: str, key_name: str) -> _Authority:
    cert_path, key_path = pki_dir / cert_name, pki_dir / key_name
    for path in (cert_path, key_path):
        if not path.is_file():
            raise PkiError(f"{path} is missing: is {pki_dir} a directory made by "
                           "`edgefleet pki init --out DIR`?")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise PkiError(f"cannot read the CA in {pki_dir}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an EC private key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise PkiError(f"{key_path} is not the key of {cert_path}")
    return _Authority(cert, key)


# -- certificates ------------------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int, ca: _Authority | None) -> tuple[datetime.datetime, datetime.datetime]:
    """From a few minutes ago (clock skew) for `days`, never past the issuer's own end: a
    certificate that outlives its CA would fail verification on that day anyway."""
    if days < 1:
        raise PkiError(f"--days must be at least 1, not {days}")
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=days)
    if ca is not None:
        not_after = min(not_after, ca.cert.not_valid_after_utc)
        if not_after <= now:
            raise PkiError(f"the CA {ca.cert.subject.rfc4514_string()} has expired; make a new "
                           "PKI with `edgefleet pki init --force`")
    return now - _CLOCK_SKEW, not_after


def _make_ca(common_name: str, days: int) -> _Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, None)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(_name(common_name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(end)
            # path_length 0: a CA that signs leaves only, never another CA
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return _Authority(cert, key)


def _make_leaf(ca: _Authority, common_name: str, days: int, *, server: bool,
               sans: Iterable[x509.GeneralName] = ()) -> tuple[x509.Certificate,
                                                               ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, ca)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(start)
               .not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    names = list(sans)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def _host_name(host: str) -> x509.GeneralName:
    """An IP address SAN for an address, else a DNS name SAN (checked: a typo here is a broker
    that no client can verify)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or not all(
            0 < len(label) <= 63 and label.replace("-", "").replace("*", "").isalnum()
            and label.isascii() and not label.startswith("-") for label in labels):
        raise PkiError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.rstrip("."))


def init_pki(out_dir: Path, hosts: Iterable[str] = (), days: int = DEFAULT_DAYS,
             force: bool = False) -> list[Issued]:
    """Write a new fleet PKI into `out_dir`: both roots, the broker certificate (valid for
    127.0.0.1, localhost and `hosts`) and the operator identity.

    Refuses to replace an existing one unless `force`: a new CA orphans every device certificate
    the old one issued, and every device would need a new one by hand.
    """
    _validity(days, None)  # a bad --days fails before anything is written
    if not force:
        for name in INIT_FILES:
            if (out_dir / name).exists():
                raise PkiError(f"{out_dir / name} already exists: a new CA would orphan every "
                               "certificate the old one issued; pass --force to replace it")
    sans: dict[str, x509.GeneralName] = {}
    for host in (*DEFAULT_HOSTS, *hosts):
        sans.setdefault(host.lower(), _host_name(host))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / DEVICES).mkdir(exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create {out_dir}: {exc.strerror}") from None
    suffix = os.urandom(4).hex()  # two fleets' CAs never share a name
    fleet_ca = _make_ca(f"edgefleet fleet CA {suffix}", days)
    operator_ca = _make_ca(f"edgefleet operator CA {suffix}", days)
    broker = _make_leaf(fleet_ca, "edgefleet broker", days, server=True, sans=sans.values())
    operator = _make_leaf(operator_ca, OPERATOR, days, server=False)
    try:
        # the leaves first: a crash half-way leaves no CA, so the next init needs no --force
        written = [_save(*broker, out_dir / BROKER_CERT, out_dir / BROKER_KEY),
                   _save(*operator, out_dir / OPERATOR_CERT, out_dir / OPERATOR_KEY)]
        written.insert(0, _save(operator_ca.cert, operator_ca.key, out_dir / OPERATOR_CA_CERT,
                                out_dir / OPERATOR_CA_KEY))
        written.insert(0, _save(fleet_ca.cert, fleet_ca.key, out_dir / CA_CERT,
                                out_dir / CA_KEY))
    except OSError as exc:
        raise PkiError(f"cannot write into {out_dir}: {exc.strerror}") from None
    return written


def check_device_id(device_id: str) -> str:
    """`device_id` if it can be a certificate's CN, hence an MQTT username and a topic level,
    else PkiError: the contract's name pattern (no `+`, `#`, `/` or control characters, which
    would turn the ACL's %u into a wildcard or another device's topics) and no reserved name."""
    if not protocol.NAME_RE.fullmatch(device_id):  # match() lets a trailing newline through
        raise PkiError(f"device id {device_id[:80]!r} must match {protocol.NAME_PATTERN} (it "
                       "becomes the MQTT username and a topic level)")
    if device_id in RESERVED_IDS:
        raise PkiError(f"device id {device_id!r} is reserved (the operator's username or a "
                       "topic level of the fleet); choose another")
    if device_id.startswith(RESERVED_PREFIX):
        # client ids are one namespace across listeners: a device named like an operator tool
        # (edgefleet-collect-NAME) would take over that tool's persistent session
        raise PkiError(f"device id {device_id!r} starts with {RESERVED_PREFIX!r}, the prefix of "
                       "the fleet tools' MQTT client ids; choose another")
    return device_id


def issue_device(pki_dir: Path, device_id: str, days: int = DEFAULT_DAYS,
                 force: bool = False) -> Issued:
    """Write `pki_dir/devices/{id}.pem` and `.key` (0600): a client certificate whose CN is the
    device id, signed by the fleet CA. An existing one is kept unless `force` (its key may be on
    the device already; the old certificate stays valid until it expires either way)."""
    check_device_id(device_id)
    _validity(days, None)
    ca = _load_authority(pki_dir, CA_CERT, CA_KEY)
    devices = pki_dir / DEVICES
    cert_path, key_path = devices / f"{device_id}.pem", devices / f"{device_id}.key"
    if not force and (cert_path.exists() or key_path.exists()):
        raise PkiError(f"{cert_path} already exists; pass --force to issue a new one")
    cert, key = _make_leaf(ca, device_id, days, server=False)
    try:
        devices.mkdir(exist_ok=True)
        return _save(cert, key, cert_path, key_path)
    except OSError as exc:
        raise PkiError(f"cannot write into {devices}: {exc.strerror}") from None
