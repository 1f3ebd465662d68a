"""A ready Mosquitto configuration for a fleet PKI (CONTRACT section 10): `mosquitto.conf` with
TLS listeners that require client certificates, and the `acl` that confines each device to its
own topics.

Who may connect where (measured on Mosquitto 2.0.11: tests/device_agents/test_pki.py):

| listener | trusts | client id | for |
|---|---|---|---|
| `port` | fleet CA, operator CA | the CN (`use_username_as_clientid`) | devices; the operator, once |
| `operator_port` | operator CA only | as sent | operator tools, several at once |

Without `use_username_as_clientid`, a device that connects with client id `edge-B` closes
edge-B's connection ("Client edge-B already connected, closing old connection") and the two take
the session from each other at every reconnect. The option belongs to a listener (whatever
`per_listener_settings` says), so the operator's tools, whose client ids must differ
(`edgefleet-collect-<name>`, `edgefleet-status-<hex>`), get a listener without it; only the
operator CA signs for that one, so no device can connect there. Usernames are the certificates'
CNs (`use_identity_as_username`): the ACL's `%u`. Security settings are global (one ACL, no
anonymous clients anywhere), so a persistent session keeps the same rules whichever listener it
last used.

Mosquitto started as root switches to `user` (its default: `mosquitto`) before it reads the
broker's key and writes its persistence file, so those must belong to that user: when this runs
as root it hands them over; otherwise it says what to do.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from device_agents import protocol
from device_agents.fleet import pki
from device_agents.fleet.pki import PkiError

CONF: Final = "mosquitto.conf"
ACL: Final = "acl"
CLIENT_CAS: Final = "clients-ca.pem"
DEFAULT_USER: Final = "mosquitto"  # Mosquitto's own default for `user`
ROOT: Final = protocol.ROOT

# What a device (username = its CN) may do, each only under its own edgefleet/v1/{dev}/.
DEVICE_WRITES: Final = ("status", "telemetry", "error", "event", "out/+", "response/+",
                        "model/+/state", "offload/#")
DEVICE_READS: Final = ("in/+", "request/+", "offload/#")  # offload/#: the cloud's answers
# Every device reads the delivery chunks: retained, one topic per sha256, each subscribed by
# name while the agent lacks it (protocol.blob_topic, delivery.py).
BLOBS: Final = f"{protocol.BLOBS_PREFIX}+"
OPERATOR_WRITES: Final = (f"{ROOT}/+/request/+", BLOBS)
OPERATOR_READS: Final = (f"{ROOT}/#",)


@dataclass(frozen=True)
class BrokerFiles:
    """What `write_mosquitto` wrote, the listeners' ports, and what the user still has to do."""

    conf: Path
    acl: Path
    client_cas: Path
    port: int
    operator_port: int
    notes: list[str] = field(default_factory=list)


def acl_text() -> str:
    """The ACL file. Mosquitto denies whatever no line allows, so these lines are everything
    anyone may do. `pattern` lines apply to every client, %u being its username, that is its
    certificate's CN (a device id: pki refuses `+`, `#`, `/` and the reserved names); `topic`
    lines before any `user` line would apply to anonymous clients only, hence the blobs as a
    pattern (Mosquitto warns at start that it has no %u; that is expected)."""
    lines = ["# Written by `edgefleet pki mosquitto`. Usernames are certificate CNs.",
             "# Devices: only their own topics, and the delivery blobs.",
             *(f"pattern write {ROOT}/%u/{t}" for t in DEVICE_WRITES),
             *(f"pattern read {ROOT}/%u/{t}" for t in DEVICE_READS),
             f"pattern read {BLOBS}",
             "",
             "# The operator: requests and blobs to any device; reads everything of the fleet.",
             f"user {pki.OPERATOR}",
             *(f"topic write {t}" for t in OPERATOR_WRITES),
             *(f"topic read {t}" for t in OPERATOR_READS),
             ""]
    return "\n".join(lines)


def _listener(port: int, cafile: Path, pki_dir: Path, *, fixed_ids: bool) -> list[str]:
    lines = [f"listener {port}",
             f"cafile {cafile}",
             f"certfile {pki_dir / pki.BROKER_CERT}",
             f"keyfile {pki_dir / pki.BROKER_KEY}",
             "tls_version tlsv1.2",  # the lowest accepted
             "require_certificate true",
             "use_identity_as_username true"]
    if fixed_ids:
        lines.append("use_username_as_clientid true")
    return [*lines, ""]


def conf_text(pki_dir: Path, out_dir: Path, port: int, operator_port: int,
              user: str = DEFAULT_USER) -> str:
    """mosquitto.conf for absolute `pki_dir` and `out_dir` (see the module docstring)."""
    return "\n".join([
        f"# Written by `edgefleet pki mosquitto`. Run: mosquitto -c {out_dir / CONF}",
        f"user {user}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {out_dir / ACL}",
        "persistence true",
        f"persistence_location {out_dir}/",
        "",
        "# Devices: the client id is the certificate's CN, so no device takes over another's "
        "session.",
        *_listener(port, out_dir / CLIENT_CAS, pki_dir, fixed_ids=True),
        "# Operator tools: operator certificates only; client ids as sent.",
        *_listener(operator_port, pki_dir / pki.OPERATOR_CA_CERT, pki_dir, fixed_ids=False),
    ])


def _checked_path(path: Path, what: str) -> Path:
    """`path` made absolute; a newline or control character would end a line of the config
    early and start another, so such a path is refused."""
    absolute = path.expanduser().resolve()
    if not str(absolute).isprintable():
        raise PkiError(f"{what} {str(absolute)!r} holds a control character; Mosquitto reads "
                       "its config line by line, so use another path")
    return absolute


def _check_port(port: int, what: str) -> None:
    if not 1 <= port <= 65535:
        raise PkiError(f"{what} {port} is not a TCP port (1 to 65535)")


def _blocked_at(path: Path, account: pwd.struct_passwd) -> Path | None:
    """The first directory above `path` that `account` cannot enter, if any."""
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for parent in reversed(path.parents):
        mode = parent.stat()
        if mode.st_uid == account.pw_uid:
            ok = mode.st_mode & stat.S_IXUSR
        elif mode.st_gid in groups:
            ok = mode.st_mode & stat.S_IXGRP
        else:
            ok = mode.st_mode & stat.S_IXOTH
        if not ok:
            return parent
    return None


def _hand_over(user: str, key: Path, out_dir: Path) -> list[str]:
    """Make the broker's key and its persistence directory the broker user's (see the module
    docstring); notes for what cannot be done from here."""
    if user == "root":
        return []
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise PkiError(f"there is no user {user!r}, which Mosquitto switches to when started as "
                       "root; install Mosquitto first or pass --user NAME") from None
    if os.geteuid() != 0:
        if account.pw_uid == os.geteuid():
            return []
        return [f"started as root, Mosquitto runs as {user!r}, which must own the broker's key "
                f"and its persistence directory: sudo chown {user} {key} {out_dir}"]
    os.chown(key, account.pw_uid, -1)  # stays 0600
    os.chown(out_dir, account.pw_uid, -1)
    notes = []
    for path, why in ((key, f"read {key}"), (out_dir / "x", f"keep its persistence in {out_dir}")):
        blocked = _blocked_at(path, account)
        if blocked is not None:
            notes.append(f"{user!r} cannot enter {blocked}, so Mosquitto cannot {why}: move "
                         "the files or open the directory (chmod o+x)")
    return notes


def write_mosquitto(pki_dir: Path, out_dir: Path, port: int, operator_port: int | None = None,
                    user: str = DEFAULT_USER) -> BrokerFiles:
    """Write OUT/mosquitto.conf, OUT/acl and OUT/clients-ca.pem (the two roots the device
    listener trusts) for the PKI in `pki_dir`. The operator's listener is on `operator_port`
    (default port + 1); Mosquitto keeps its persistence file in OUT, as `user`."""
    operator_port = port + 1 if operator_port is None else operator_port
    _check_port(port, "--port")
    _check_port(operator_port, "--operator-port")
    if port == operator_port:
        raise PkiError(f"--port and --operator-port are both {port}; the operator's listener "
                       "needs a port of its own")
    if not user or not user.isprintable() or " " in user:
        raise PkiError(f"--user {user!r} is not a user name")
    pki_dir = _checked_path(pki_dir, "--pki")
    out_dir = _checked_path(out_dir, "--out")
    for name in (pki.CA_CERT, pki.OPERATOR_CA_CERT, pki.BROKER_CERT, pki.BROKER_KEY):
        if not (pki_dir / name).is_file():
            raise PkiError(f"{pki_dir / name} is missing: make the PKI first with "
                           f"`edgefleet pki init --out {pki_dir}`")
    files = BrokerFiles(out_dir / CONF, out_dir / ACL, out_dir / CLIENT_CAS, port, operator_port)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        roots = b"".join((pki_dir / name).read_bytes()
                         for name in (pki.CA_CERT, pki.OPERATOR_CA_CERT))
        pki.write_file(files.client_cas, roots, 0o644)
        pki.write_file(files.acl, acl_text().encode(), 0o644)
        pki.write_file(files.conf, conf_text(pki_dir, out_dir, port, operator_port, user
                                             ).encode(), 0o644)
        files.notes.extend(_hand_over(user, pki_dir / pki.BROKER_KEY, out_dir))
    except OSError as exc:
        raise PkiError(f"cannot write into {out_dir}: {exc.strerror or exc}") from None
    return files
