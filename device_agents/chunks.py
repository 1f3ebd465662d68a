"""Content-defined chunks of model files, and the device's store of the chunks it holds.

Chunk boundaries come from the content (FastCDC), not from offsets, so a model whose unchanged
tensors keep their bytes (only the classifier head retrained) shares all but a few chunks with
its previous version, and only those few travel. Chunks stay well under common broker message
limits (AWS IoT Core: 128 KB).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from device_agents.durable import write_atomic

CHUNK_MIN: Final = 8 * 1024
CHUNK_AVG: Final = 32 * 1024
CHUNK_MAX: Final = 120 * 1024  # leaves room for topic and headers under a 128 KB limit


@dataclass(frozen=True, slots=True)
class Chunk:
    sha256: str
    offset: int
    size: int


def chunk_bytes(data: bytes) -> list[Chunk]:
    """Split data at content-defined boundaries (FastCDC) and hash each piece."""
    from fastcdc import fastcdc

    if not data:
        return []
    out = []
    for c in fastcdc(data, min_size=CHUNK_MIN, avg_size=CHUNK_AVG, max_size=CHUNK_MAX):
        piece = data[c.offset:c.offset + c.length]
        out.append(Chunk(hashlib.sha256(piece).hexdigest(), c.offset, c.length))
    return out


def chunk_file(path: Path) -> list[Chunk]:
    return chunk_bytes(path.read_bytes())




class ChunkStore:
    """What the device holds: loose chunks received for a delivery in progress (one file each,
    written with fsync and rename, so a power cut never leaves half a chunk), and an index of the
    chunks inside installed model files (the bytes are not stored twice)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.loose = root / "loose"
        self.loose.mkdir(parents=True, exist_ok=True)
        self._index_path = root / "index.json"
        self._index: dict[str, tuple[str, int, int]] = {}
        if self._index_path.exists():
            self._index = {k: tuple(v) for k, v in json.loads(self._index_path.read_text()).items()}  # type: ignore[misc]
        self._drop_indexed_loose()

    def has(self, sha: str) -> bool:
        if (self.loose / sha).exists():
            return True
        where = self._index.get(sha)
        return where is not None and Path(where[0]).exists()

    def put(self, sha: str, data: bytes, *, hashed: bool = False) -> bool:
        """Store a chunk if its bytes hash to `sha` (hashed=True: the caller checked); False
        (and nothing stored) otherwise."""
        if not hashed and hashlib.sha256(data).hexdigest() != sha:
            return False
        if not self.has(sha):
            # no directory fsync per chunk: a chunk a power cut loses is fetched again (the
            # resumed delivery asks for what `has` does not find), never half-read
            write_atomic(self.loose / sha, data, sync_dir=False)
        return True

    def read(self, sha: str) -> bytes:
        loose = self.loose / sha
        if loose.exists():
            return loose.read_bytes()
        path, offset, size = self._index[sha]
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if hashlib.sha256(data).hexdigest() != sha:
            raise OSError(f"chunk {sha[:12]} in {path} no longer matches its hash")
        return data

    def indexed(self, path: Path) -> bool:
        return any(where[0] == str(path) for where in self._index.values())

    def index_file(self, path: Path, chunks: list[Chunk], *, drop_loose: bool = True) -> None:
        """Record the chunks of an installed model file; their loose copies can go (now, or
        later with `drop_loose`: hundreds of unlinks need not delay an activation)."""
        for c in chunks:
            self._index[c.sha256] = (str(path), c.offset, c.size)
        write_atomic(self._index_path, json.dumps(self._index).encode())
        if drop_loose:
            self.drop_loose(chunks)

    def drop_loose(self, chunks: list[Chunk]) -> None:
        """Delete the loose copies of chunks an installed file now holds."""
        for c in chunks:
            (self.loose / c.sha256).unlink(missing_ok=True)

    def _drop_indexed_loose(self) -> None:
        """Loose chunks an installed file holds: left by a cleanup that a stop interrupted."""
        for loose in self.loose.iterdir():
            where = self._index.get(loose.name)
            if where is not None and Path(where[0]).exists():
                loose.unlink(missing_ok=True)
