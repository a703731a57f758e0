"""A stalled-rank watchdog: a rank that makes no training progress for ``run.timeout_minutes`` prints the
Python stack of every one of its threads and exits with status 1, so the launcher ends the job.

The collective timeout (``init_distributed(timeout_minutes=...)``) ends a rank that waits in a collective for
a peer; this catches the rest -- a rank stuck outside any collective (a data loader, a file system, a deadlock)
and a backend that does not time out -- and says where each rank was. It is ``faulthandler``'s timer, which
runs in a C thread of its own: it fires even while the main thread is blocked inside a C call, holding the GIL
or not. ``beat`` re-arms it after each step; ``pause`` disarms it around work of unbounded length (evaluation,
checkpoint writes), which the collective timeout still covers.
"""
from __future__ import annotations

import faulthandler
import sys


class Watchdog:
    def __init__(self, timeout_minutes: float):
        self.timeout_s = 60.0 * timeout_minutes  # 0: off
        self.armed = False

    def beat(self) -> None:
        """Progress: the rank has until ``timeout_s`` from now to make more."""
        if self.timeout_s > 0:
            faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)
            self.armed = True

    def pause(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self.armed = False

    def __enter__(self) -> "Watchdog":
        self.beat()
        return self

    def __exit__(self, *exc) -> None:
        self.pause()


# ------------------------------------------------------------------------------------------- lost launchers
# A rank must not outlive its job. When the launcher that started it dies without ending its ranks (SIGKILL of
# `torchrun`, of `python -m deepspeed.launcher.launch`, of the `deepspeed` runner above the latter, a lost node
# agent), nothing else would stop them: they would train to the end, writing into a directory a new job may be
# using. So each launched rank watches its launchers and, when one is gone, does what a stop signal does -- its
# run checkpoints at the next step and every rank exits 75 (``run_control``) -- within ``LAUNCHER_GRACE_S``, the
# grace both launchers give a SIGTERM; past it (a rank stuck in a collective, a set-up or the final evaluation,
# where no step comes) it leaves at once with status 1. A save cut short that way is never promoted (checkpoints
# are written atomically: ``checkpoints/latest`` names the last complete one) and its temporaries are removed
# when the next run takes the directory's lock (``run_lock``).
#
# Two mechanisms, the first where the platform has it:
# - Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel sends SIGTERM (a stop signal by default) the moment
#   the parent dies, whatever the rank is doing. (Linux ties it to the thread that forked the rank; both
#   launchers start their ranks from their main thread.)
# - Everywhere: a thread that polls ``os.getppid()`` for a change every ``POLL_S``, and, with ``/proc``, the
#   launchers above the parent by pid and start time: the `deepspeed` runner's death leaves its per-node
#   ``deepspeed.launcher.launch`` running, which would not end the ranks.
# ``SCALE_REFINER_WATCH_LAUNCHER=0`` turns both off.
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import List, Optional, Tuple  # noqa: E402

LAUNCHER_GRACE_S = 30.0
POLL_S = 0.5
EXIT_LAUNCHER_LOST = 1
_LAUNCHER_SCRIPTS = {"deepspeed", "ds", "torchrun"}
_LAUNCHER_MODULES = {"deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                     "torch.distributed.launch"}
_watching: list = []


def _proc_stat(pid: int) -> Optional[Tuple[int, int]]:
    """(parent pid, start time in clock ticks) of ``pid`` from /proc, or None (gone, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and parentheses
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_launcher(argv: List[str]) -> bool:
    """Whether a command line is one of the launchers' (the `deepspeed` runner, deepspeed.launcher.launch,
    torchrun / torch.distributed.run)."""
    for i, arg in enumerate(argv[:6]):
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] in _LAUNCHER_MODULES:
            return True
        if os.path.basename(arg) in _LAUNCHER_SCRIPTS:
            return True
    return False


def launcher_chain(parent: int) -> List[Tuple[int, int, str]]:
    """(pid, start time, command) of the parent and of the launchers right above it; [] without /proc."""
    chain, pid = [], parent
    while pid > 1 and len(chain) < 4:
        stat = _proc_stat(pid)
        if stat is None:
            break
        argv = _cmdline(pid)
        if chain and not is_launcher(argv):
            break
        chain.append((pid, stat[1], " ".join(argv[:4])))
        pid = stat[0]
    return chain


def _set_parent_death_signal(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, signum)`` through libc; False where there is none (not Linux)."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, signum, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def watch_launcher(rank: int, grace_s: float = LAUNCHER_GRACE_S, poll_s: float = POLL_S):
    """Start the watch for this (launched) rank: see the comment above. Returns the thread, or None when turned
    off or already running. Call after ``install_stop_signals`` (SIGTERM is then a stop request)."""
    if os.environ.get("SCALE_REFINER_WATCH_LAUNCHER", "1") == "0" or _watching:
        return None
    parent = os.getppid()
    _set_parent_death_signal(signal.SIGTERM)  # (a parent that died before this is the thread's first find)
    chain = launcher_chain(parent)
    thread = threading.Thread(target=_watch, args=(rank, parent, chain, grace_s, poll_s), name="launcher-watch",
                              daemon=True)
    _watching.append(thread)
    thread.start()
    return thread


def _lost(parent: int, chain) -> Optional[str]:
    if os.getppid() != parent:
        return f"pid {parent}" + (f" ({chain[0][2]})" if chain else "")
    for pid, started, command in chain:
        stat = _proc_stat(pid)
        if stat is None or stat[1] != started:  # gone, or its pid taken by another process since
            return f"pid {pid} ({command})"
    return None


def _watch(rank: int, parent: int, chain, grace_s: float, poll_s: float) -> None:
    from scale_refiner.engine.run_control import request_stop
    log = logging.getLogger("scale_refiner")
    while True:
        lost = _lost(parent, chain)
        if lost is not None:
            break
        time.sleep(poll_s)
    request_stop(f"the loss of its launcher ({lost})")
    log.warning("rank %d: its launcher %s is gone: stopping at the next step with a checkpoint, leaving within "
                "%.0f s", rank, lost, grace_s)
    time.sleep(grace_s)
    # still here: no step came (a set-up, a collective whose peer is gone, the final evaluation)
    import sys
    print(f"error: rank {rank}: its launcher {lost} is gone and the run did not stop within {grace_s:.0f} s: "
          f"leaving now; checkpoints/latest names the last complete checkpoint", file=sys.stderr, flush=True)
    os._exit(EXIT_LAUNCHER_LOST)
