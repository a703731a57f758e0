"""One run per output directory: an exclusive lock on ``<run.out_dir>/.run.lock`` for the run's whole life.

Two runs writing into one directory would silently replace each other's checkpoints, exports and config.json and
interleave metrics.jsonl. So rank 0 of a job takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file before
anything is written there, and writes its holder's description into it (host, pid, start time, command). The
other ranks never touch the file: they learn rank 0's outcome through one small collective (``claim_out_dir``),
so the ranks of a job -- on this node or on others that share the file system -- share the one lock, and every
rank of a second job leaves with ``EXIT_LOCKED`` while its rank 0 prints one line naming the directory and the
holder.

The kernel releases the lock when the holding process ends, however it ends (a crash, SIGKILL, a lost node's
lease on a network file system): nothing stale is left to break by hand, and ``run.resume=auto`` of the same
directory after a crash or preemption takes the lock as usual. A clean exit empties the file; a holder's
description still in it when the lock is taken says the previous run did not end cleanly (killed, or its node
lost), which is logged, and the temporaries of a save it was killed in are removed (no other run can be writing
them: the lock is held).

File systems: local ones and NFS (the Linux client maps flock to a byte-range lock the server arbitrates, so ranks
on other nodes are excluded too) support it; Lustre only when mounted with ``-o flock`` (``localflock`` excludes
runs on the same node only). Where locking fails, the run stops and says so; ``run.lock=false`` runs without it.
"""
from __future__ import annotations

import atexit
import datetime
import errno
import json
import logging
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("scale_refiner")

LOCK_NAME = ".run.lock"
# The status every rank of a run refused for a locked run.out_dir exits with: EX_CANTCREAT of sysexits.h ("cannot
# create an output file"). Not EX_TEMPFAIL (75): a requeueing script must not loop on it.
EXIT_LOCKED = 73


class RunLockedError(RuntimeError):
    """``run.out_dir`` is held by another run; the message names the directory and the holder."""


def _command_line() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = [sys.executable] + sys.argv
    return shlex.join(argv)


def holder_description() -> dict:
    """What the lock file says about its holder: this process."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": _command_line()}


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another run (which has not written its description yet)"
    text = (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}, "
            f"command: {holder.get('command')}")
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        text += f" (pid {pid} has ended: a process it started still holds the lock)"
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse(text: str) -> Optional[dict]:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """The lock of one output directory, held by this process from ``acquire`` to ``release`` (or its end)."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> Optional[dict]:
        """Take the lock or raise ``RunLockedError``; ``OSError`` where the file system cannot lock. Returns the
        description a previous holder left behind (it did not end cleanly), else None."""
        import fcntl
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Never unlinked: a process that opened the old file could then lock it while another locks a new one.
        # Opened once per process: POSIX-emulated locks (NFS) end when any descriptor of the file is closed.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(self.refusal()) from None
            raise OSError(err.errno, f"cannot lock {self.path} ({err.strerror}): the file system of run.out_dir "
                                     f"does not support locks; run.lock=false runs without one") from None
        previous = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
        data = json.dumps(holder_description()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)  # on a shared file system: what a refused run on another node reads
        self.fd = fd
        return previous

    def refusal(self) -> str:
        try:
            holder = _parse(self.path.read_text())
        except OSError:
            holder = None
        return (f"run.out_dir {self.out_dir} is in use by another run: {describe(holder)}. Wait for it to end, "
                f"or give this run another run.out_dir")

    def release(self) -> None:
        """Empty the file (a clean end) and unlock. Idempotent."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # unlocks


_held: dict = {}


def hold(out_dir) -> Optional[dict]:
    """``RunLock(out_dir).acquire()``, kept for the life of this process (released at exit, by the kernel if
    not by ``atexit``). A second call for the same directory is a no-op."""
    key = os.path.realpath(out_dir)
    if key in _held:
        return None
    lock = RunLock(out_dir)
    previous = lock.acquire()
    _held[key] = lock
    if len(_held) == 1:
        atexit.register(release_all)
    return previous


def release_all() -> None:
    for lock in _held.values():
        lock.release()
    _held.clear()


def remove_leftovers(out_dir) -> list:
    """The temporaries a killed run leaves: a checkpoint save's ``checkpoints/.tmp-<tag>`` and ``.latest.tmp``,
    and atomic writes' ``.<name>.*.tmp`` (in the directory, ``checkpoints/`` and ``export/``). Only safe with
    the lock held: no other run is writing them. Returns what was removed."""
    out_dir = Path(out_dir)
    found = list((out_dir / "checkpoints").glob(".tmp-*"))
    for where in (out_dir, out_dir / "checkpoints", out_dir / "export"):
        found += [p for p in where.glob(".*.tmp") if p.is_file()]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def claim_out_dir(out_dir, ctx, lock: bool = True) -> int:
    """Collective, before anything is written to ``out_dir``: rank 0 proves the directory writable and takes its
    lock (``lock``: ``run.lock``); every rank gets the outcome. Returns 0, or the exit status every rank leaves
    with: ``EXIT_LOCKED`` (another run holds the directory), 2 (not writable, no locking), after rank 0 printed
    one line saying why."""
    import torch
    import torch.distributed as dist
    from scale_refiner.engine.checkpoint import check_out_dir
    status = 0
    if ctx.is_main:
        try:
            check_out_dir(out_dir)
            if lock:
                previous = hold(out_dir)
                if previous:
                    log.warning("run.out_dir %s: the previous run did not end cleanly (killed, or its node lost: %s);"
                                " its lock is released, taking it over", out_dir, describe(previous))
                removed = remove_leftovers(out_dir)
                if removed:
                    log.info("removed %d temporaries of an interrupted write: %s", len(removed),
                             ", ".join(str(p) for p in removed))
        except RunLockedError as err:
            print(f"error: {err}", file=sys.stderr)
            status = EXIT_LOCKED
        except SystemExit as err:  # check_out_dir: not writable
            print(err.code, file=sys.stderr)
            status = 2
        except OSError as err:
            print(f"error: {err.strerror if err.filename is None and err.strerror else err}", file=sys.stderr)
            status = 2
    if ctx.world > 1:
        flag = torch.tensor([status], dtype=torch.int32)  # host memory: the control group is gloo
        dist.broadcast(flag, src=0, group=ctx.control_group)
        status = int(flag[0])
    return status
