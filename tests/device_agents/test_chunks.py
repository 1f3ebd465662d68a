"""The device's chunk store: loose chunks of a delivery in progress, and the index of the chunks
inside installed model files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from device_agents.chunks import ChunkStore, chunk_bytes


def model_bytes() -> bytes:
    return os.urandom(300 * 1024)  # several content-defined chunks


def test_a_chunk_is_kept_only_if_its_bytes_hash_to_its_name(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data = b"weights" * 1000
    sha = hashlib.sha256(data).hexdigest()
    assert not store.put(sha, data + b"!")
    assert not store.has(sha)
    assert store.put(sha, data)
    assert store.has(sha)
    assert store.read(sha) == data


def test_indexed_chunks_are_read_from_the_installed_file_and_checked(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    data = model_bytes()
    chunks = chunk_bytes(data)
    assert len(chunks) > 3
    for c in chunks:
        store.put(c.sha256, data[c.offset:c.offset + c.size])
    installed = tmp_path / "model.onnx"
    installed.write_bytes(data)
    store.index_file(installed, chunks)
    assert not any(store.loose.iterdir())  # the installed file holds them now
    assert b"".join(store.read(c.sha256) for c in chunks) == data
    installed.write_bytes(b"\0" * len(data))  # the file changed under the index
    with pytest.raises(OSError, match="no longer matches its hash"):
        store.read(chunks[0].sha256)


def test_loose_copies_can_go_after_activation_and_a_restart_finishes_the_job(tmp_path: Path
                                                                              ) -> None:
    store = ChunkStore(tmp_path / "chunks")
    data = model_bytes()
    chunks = chunk_bytes(data)
    for c in chunks:
        store.put(c.sha256, data[c.offset:c.offset + c.size])
    installed = tmp_path / "model.onnx"
    installed.write_bytes(data)
    store.index_file(installed, chunks, drop_loose=False)
    assert len(list(store.loose.iterdir())) == len(chunks)  # activation is not held up
    store.drop_loose(chunks[:1])
    assert len(list(store.loose.iterdir())) == len(chunks) - 1
    # a stop before the rest were deleted: the next start removes what the index covers
    reopened = ChunkStore(tmp_path / "chunks")
    assert not any(reopened.loose.iterdir())
    assert all(reopened.has(c.sha256) for c in chunks)
    # a loose chunk of a delivery still in progress (not indexed) stays
    other = b"next version" * 500
    sha = hashlib.sha256(other).hexdigest()
    reopened.put(sha, other)
    assert ChunkStore(tmp_path / "chunks").read(sha) == other
