"""Files that must survive a power cut: the one way the agent and the fleet tools write them.

A file is written under a temporary name in its own directory (created with its final mode, so a
key is never readable by others, even for a moment), fsynced, renamed over the old one, and the
directory fsynced: after a crash at any point the name holds the old bytes or the new ones,
never a mix and never nothing. Without the directory fsync, ext4 and most SD-card file systems
may lose the rename itself.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, sync_dir: bool = True) -> None:
    """Replace `path` with `data` durably (see the module docstring). sync_dir=False skips the
    directory fsync, for a file that is fetched again when a power cut loses its name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the renames and creations in this directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
