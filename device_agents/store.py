"""Installed model packages on the device: `data_dir/models/{name}/{version}/`, with the active
and previous version of each model recorded in `state.json` (written atomically), so an
activation or a rollback survives a restart and the previous version is always kept."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
            _fsync_dir(target.parent)
        elif not (target / "manifest.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
            for item in ("manifest.json", "manifest.sig", pkg.manifest.file):
                if (directory / item).exists():
                    shutil.copy2(directory / item, staging / item)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        return Installed(name, version, target)

    def path(self, name: str, version: str) -> Path:
        return self.root / name / version

    def activate(self, name: str, version: str) -> None:
        if not (self.path(name, version) / "manifest.json").exists():
            raise StoreError(f"model {name} version {version} is not installed")
        entry = self._state.get(name, {})
        if entry.get("active") != version:
            self._state[name] = {"active": version, "previous": entry.get("active")}
            self._save()

    def rollback(self, name: str) -> str:
        """Make the previous version active again (the current one becomes 'previous')."""
        entry = self._state.get(name)
        if entry is None:
            raise StoreError(f"no model named {name!r} is installed")
        previous = entry.get("previous")
        if not previous:
            raise StoreError(f"model {name} has no previous version to roll back to")
        self._state[name] = {"active": previous, "previous": entry.get("active")}
        self._save()
        return previous

    def active(self) -> list[Installed]:
        return [Installed(n, str(e["active"]), self.path(n, str(e["active"])))
                for n, e in sorted(self._state.items()) if e.get("active")]

    def entry(self, name: str) -> dict[str, str | None]:
        return dict(self._state.get(name, {}))

    def _save(self) -> None:  # written, fsynced, renamed: a power cut leaves old or new
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=1))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self._state_path)


def _fsync_dir(path: Path) -> None:
    """Make a rename in this directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
