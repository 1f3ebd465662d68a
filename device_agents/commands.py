"""Signed commands (CONTRACT 10): which requests this device obeys.

Anyone who can publish to `request/+` could otherwise roll a model back, read the config or
deploy a package. With `[security] command_keys` set, every command but `ping` must carry an
`auth` object: an Ed25519 signature by one of those keys over the device id, the command, its
arguments, a nonce and an expiry (`protocol.command_bytes`). The guard checks, in this order,
that it is well formed, signed by a known key, not expired nor valid for too long, that the
signature holds, and only then that the nonce is new. The nonce is recorded on disk before the
command acts, so a replay is refused after a restart too; since only correctly signed commands
reach the ledger, a stranger cannot fill it.

The threat the expiry bounds is a captured command replayed later; its cost is that the device
needs a clock within `CLOCK_SKEW_S` of the operator's (NTP, or the 5G network's time).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agents import protocol
from device_agents.protocol import ProtocolError
from runtime.signing import PublicKey, fingerprint

log = logging.getLogger("edgefleet.commands")

UNSIGNED_OK: Final = frozenset({"ping"})  # the liveness probe: answers nothing secret
CLOCK_SKEW_S: Final = 300  # how far the device's clock may be behind or ahead of the operator's
MAX_NONCES: Final = 100_000  # signed commands alive at once; more is refused, not forgotten
LIFETIME_S: Final = 300  # how long a command the fleet tools sign stays valid


def sign(key: Ed25519PrivateKey, device: str, command: str, args: dict[str, Any],
         lifetime_s: int = LIFETIME_S, clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """The request arguments with an `auth` object added: what the fleet tools send."""
    key_id = fingerprint(key.public_key())
    nonce = secrets.token_urlsafe(18)
    expires = int(clock()) + lifetime_s
    plain = {k: v for k, v in args.items() if k != "auth"}
    signature = key.sign(protocol.command_bytes(device, command, plain, key_id, nonce, expires))
    return {**plain, "auth": {"key": key_id, "nonce": nonce, "expires": expires,
                              "sig": base64.b64encode(signature).decode()}}


class UnauthorizedError(Exception):
    """A command refused: it changes nothing and is answered `unauthorized`."""

    def as_error(self) -> dict[str, str]:
        return {"code": protocol.UNAUTHORIZED, "message": str(self)}


class NonceLedger:
    """The nonces of signed commands seen and not yet expired, in SQLite under data_dir.

    `synchronous=FULL`: a command acts only after its nonce is on disk, so a power cut cannot
    make a replay look new. Expired rows go at each claim.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path, self.clock = path, clock
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, "
                         "expires INTEGER NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS nonces_expires ON nonces (expires)")

    def claim(self, nonce: str, expires: int) -> None:
        """Record a nonce as used; raises UnauthorizedError if it was, or if it cannot be recorded
        (a full disk refuses commands rather than risk obeying one twice)."""
        try:
            with self._db:
                self._db.execute("DELETE FROM nonces WHERE expires < ?",
                                 (int(self.clock()) - CLOCK_SKEW_S,))
                (alive,) = self._db.execute("SELECT COUNT(*) FROM nonces").fetchone()
                if alive >= MAX_NONCES:
                    raise UnauthorizedError(f"{alive} signed commands are still within their expiry; "
                                       "wait, or sign with a shorter one")
                self._db.execute("INSERT INTO nonces VALUES (?, ?)", (nonce, expires))
        except sqlite3.IntegrityError:
            raise UnauthorizedError("replayed: this signed command was received before and "
                                    "obeyed then (its answer may have been lost); sign a new "
                                    "one to do it again") from None
        except sqlite3.Error as exc:
            raise UnauthorizedError(f"cannot record the command's nonce ({exc}); refused") from None

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()


class RefusingLedger(NonceLedger):
    """The ledger of a data dir where none could be opened (a full or read-only disk): every
    signed command is refused, and the agent goes on serving its sensors."""

    def __init__(self, reason: str) -> None:  # no file: nothing to open
        self.reason = reason

    def claim(self, nonce: str, expires: int) -> None:
        raise UnauthorizedError(f"cannot record command nonces ({self.reason}); refused")

    def close(self) -> None:
        pass


def open_ledger(path: Path) -> NonceLedger:
    """The nonce ledger at `path`, or one that refuses every command when it cannot be opened."""
    try:
        return NonceLedger(path)
    except sqlite3.Error as exc:
        log.error("cannot open the command nonce ledger %s (%s): signed commands are refused",
                  path, exc)
        return RefusingLedger(str(exc))


class CommandGuard:
    """Checks a request's signature before its handler runs (see the module docstring)."""

    def __init__(self, device_id: str, keys: Sequence[PublicKey], required: bool,
                 ledger: NonceLedger | None, clock: Callable[[], float] = time.time) -> None:
        self.device_id, self.required, self.ledger, self.clock = device_id, required, ledger, clock
        self.keys = {key.fingerprint: key for key in keys}
        self.refused = 0

    def check(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """The arguments without `auth`, when the command may run; raises UnauthorizedError."""
        try:
            return self._check(command, args)
        except UnauthorizedError:
            self.refused += 1
            raise

    def _check(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        raw = args.get("auth")
        plain = {k: v for k, v in args.items() if k != "auth"}
        if raw is None:
            if self.required and command not in UNSIGNED_OK:
                raise UnauthorizedError(f"{command!r} must be signed: this device obeys only commands "
                                   "signed by its command_keys (fleet tools: --sign-key KEY)")
            return plain
        if not self.keys:  # nothing to check it against; obeyed as an unsigned command would be
            if self.required:
                raise UnauthorizedError("this device has no command_keys to check signatures with")
            return plain
        try:
            auth = protocol.parse_auth(raw)
            signature = protocol.signature_of(auth)
        except ProtocolError as exc:
            raise UnauthorizedError(str(exc)) from None
        key = self.keys.get(auth.key)
        if key is None:
            raise UnauthorizedError(f"signed by key {auth.key}, which is not one of this device's "
                               "command_keys")
        now = self.clock()
        if auth.expires < now - CLOCK_SKEW_S:
            raise UnauthorizedError(f"expired {now - auth.expires:.0f} s ago")
        if auth.expires > now + protocol.MAX_COMMAND_LIFETIME_S + CLOCK_SKEW_S:
            raise UnauthorizedError(f"expires {auth.expires - now:.0f} s from now: more than the "
                               f"{protocol.MAX_COMMAND_LIFETIME_S} s a command may live")
        signed = protocol.command_bytes(self.device_id, command, plain, auth.key, auth.nonce,
                                        auth.expires)
        if not key.verifies(signature, signed):
            raise UnauthorizedError("bad signature: not signed for this device, this command and "
                               "these arguments by that key")
        if self.ledger is not None:
            self.ledger.claim(auth.nonce, auth.expires)
        log.info("signed %s by key %s (%s)", command, auth.key, key.source)
        return plain
