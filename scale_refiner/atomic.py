"""Atomic file writes: write into a temporary file next to the target, fsync it, rename it over the target.

A reader never sees a half-written file and a write killed at any point leaves the previous file (or none)
and no temporary behind: the one mechanism behind checkpoints, exports, shards, indexes and manifests.
Also the one file hash (SHA-256) that shard manifests and checkpoints record.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path`` for a writer that wants a file name; on success the file is
    fsynced, made world-readable (mkstemp creates it 0600) and renamed onto ``path``, else deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb"):
    """``open`` a temporary file next to ``path`` (same guarantees as :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def format_bytes(n: float) -> str:
    """``n`` bytes in the unit that fits: 512 B, 3.4 KB, 12.0 MB, 1.25 GB, 2.00 TB (powers of 1000)."""
    if n < 1000:
        return f"{int(n)} B"
    for unit, scale in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if n < scale * 1000:
            return f"{n / scale:.1f} {unit}" if unit != "GB" else f"{n / scale:.2f} GB"
    return f"{n / 1e12:.2f} TB"
