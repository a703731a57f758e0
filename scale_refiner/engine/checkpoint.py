"""Atomic checkpoint writes and output-directory checks.

A save goes to a temporary file in the same directory and is moved into place with ``os.replace`` (atomic
on POSIX), so a save killed half-way never replaces the last good file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_out_dir(path: Path) -> None:
    """Create ``path`` and prove it writable before any work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"error: output directory {path} (config key 'run.out_dir') is not writable: {err}")
