"""Installed model packages on the device: `data_dir/models/{name}/{version}/`, with the active
and previous version of each model recorded in `state.json` (written atomically), so an
activation or a rollback survives a restart and the previous version is always kept.

`state.json` also keeps each model's version floor, the highest version ever activated: an
activation below it is refused (CONTRACT 10, anti-rollback), so a replayed or re-sent old
package, correctly signed as it is, cannot bring back a version with a known flaw. Going back is
`rollback` only: the device's own after a failed health window, or a signed request.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from device_agents.durable import fsync_dir, write_atomic
from device_agents.errors import DeviceAgentError
from runtime.package import Package, load_package
from runtime.signing import PublicKey


class StoreError(DeviceAgentError):
    """A model cannot be installed, activated or rolled back."""


@dataclass(frozen=True)
class Installed:
    name: str
    version: str
    path: Path


class ModelStore:
    def __init__(self, root: Path, trusted_keys: Sequence[PublicKey] = (),
                 require_signed: bool = True) -> None:
        self.root = root
        self.trusted_keys = list(trusted_keys)
        self.require_signed = require_signed
        root.mkdir(parents=True, exist_ok=True)
        self._state_path = root / "state.json"
        # the request worker (rollback), the delivery worker (activate) and health watches
        # (their rollback) change the state: each read-modify-save holds this lock
        self._lock = threading.RLock()
        self._state: dict[str, dict[str, str | None]] = (
            json.loads(self._state_path.read_text()) if self._state_path.exists() else {})

    def verify(self, directory: Path) -> Package:
        """Load a package with its hash and signature checked against the trusted keys."""
        return load_package(directory, trusted_keys=self.trusted_keys,
                            require_signed=self.require_signed)

    def install(self, directory: Path, *, move: bool = False, verified: Package | None = None
                ) -> Installed:
        """Copy a verified package into the store (a no-op if that version is already there).

        move=True renames the directory into place instead (a staging directory on the same
        file system: no second copy of a large model)."""
        pkg = verified or self.verify(directory)
        name, version = pkg.manifest.name, pkg.manifest.version
        target = self.root / name / version
        if not (target / "manifest.json").exists() and move:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(directory, target)
            fsync_dir(target.parent)
        elif not (target / "manifest.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
            for item in ("manifest.json", "manifest.sig", pkg.manifest.file):
                if (directory / item).exists():
                    shutil.copy2(directory / item, staging / item)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
            fsync_dir(target.parent)
        return Installed(name, version, target)

    def path(self, name: str, version: str) -> Path:
        return self.root / name / version

    def floor(self, name: str) -> str | None:
        """The highest version of `name` activated here (None: never activated)."""
        entry = self._state.get(name, {})
        if entry.get("floor"):
            return entry["floor"]
        # state.json from before floors: the higher of what is and was active (after a rollback
        # the previous version is the higher one)
        known = [v for v in (entry.get("active"), entry.get("previous")) if v]
        return max(known, key=version_key) if known else None

    def check_floor(self, name: str, version: str) -> None:
        """Raise StoreError if `version` is older than the floor of `name`."""
        floor = self.floor(name)
        if floor is not None and version_key(version) < version_key(floor):
            raise StoreError(f"{name} {version} is older than the floor {floor} (the highest "
                             f"version activated on this device); to go back, send a signed "
                             "rollback")

    def activate(self, name: str, version: str) -> None:
        with self._lock:
            self._activate(name, version)

    def _activate(self, name: str, version: str) -> None:
        if not (self.path(name, version) / "manifest.json").exists():
            raise StoreError(f"model {name} version {version} is not installed")
        self.check_floor(name, version)
        entry = self._state.get(name, {})
        floor = self.floor(name)
        if floor is None or version_key(version) > version_key(floor):
            floor = version
        if entry.get("active") != version or entry.get("floor") != floor:
            self._state[name] = {"active": version, "previous": entry.get("active")
                                 if entry.get("active") != version else entry.get("previous"),
                                 "floor": floor}
            self._save()
        self._prune(name)

    def _prune(self, name: str) -> None:
        """Remove the versions of `name` that are neither active nor previous: a box that takes
        an update a week would otherwise fill its disk with every model it ever ran."""
        entry = self._state.get(name, {})
        keep = {entry.get("active"), entry.get("previous")}
        for path in sorted((self.root / name).iterdir()) if (self.root / name).is_dir() else []:
            if path.is_dir() and path.name not in keep and not path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)

    def rollback(self, name: str, expected: str | None = None) -> str:
        """Make the previous version active again (the current one becomes 'previous');
        with `expected`, only if that is still the previous version (it was checked)."""
        with self._lock:
            entry = self._state.get(name)
            if expected is not None and entry is not None and entry.get("previous") != expected:
                raise StoreError(f"model {name} changed meanwhile (previous is now "
                                 f"{entry.get('previous')}, not {expected}); try again")
            return self._rollback(name)

    def _rollback(self, name: str) -> str:
        entry = self._state.get(name)
        if entry is None:
            raise StoreError(f"no model named {name!r} is installed")
        previous = entry.get("previous")
        if not previous:
            raise StoreError(f"model {name} has no previous version to roll back to")
        self._state[name] = {"active": previous, "previous": entry.get("active"),
                             "floor": self.floor(name)}  # the floor stays: no way back up below it
        self._save()
        return previous

    def active(self) -> list[Installed]:
        return [Installed(n, str(e["active"]), self.path(n, str(e["active"])))
                for n, e in sorted(self._state.items()) if e.get("active")]

    def entry(self, name: str) -> dict[str, str | None]:
        return dict(self._state.get(name, {}))

    def _save(self) -> None:  # a power cut leaves the old state or the new one
        with self._lock:
            write_atomic(self._state_path, json.dumps(self._state, indent=1).encode())


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """How versions of one model compare (CONTRACT 10): dotted integers, so `10` > `9.2` and
    `1.10` > `1.9`; a leading `v` is ignored (`v10` > `v9`). A part with text after its number is
    a pre-release of that number (`2.0rc1` < `2.0`, `1.0-beta` < `1.0`), ordered by the text;
    a missing part is lower than any (`1` < `1.0`)."""
    key = []
    for part in version.removeprefix("v").removeprefix("V").split("."):
        digits = len(part) - len(part.lstrip("0123456789"))
        number = int(part[:digits]) if digits else -1
        suffix = part[digits:]
        key.append((number, 0 if suffix else 1, suffix))
    return tuple(key)
