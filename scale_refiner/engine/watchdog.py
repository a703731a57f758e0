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
# using. So each launched rank is watched, and when one of its launchers is gone it gets SIGTERM -- a stop signal
# by default: its run checkpoints at the next step and every rank exits 75 (``run_control``) -- and, if it is
# still there ``LAUNCHER_GRACE_S`` later (the grace both launchers give a SIGTERM: a rank stuck in a collective,
# in C code that holds the GIL, in a set-up or the final evaluation, where no step comes), SIGKILL. A save cut
# short that way is never promoted (checkpoints are written atomically: ``checkpoints/latest`` names the last
# complete one) and its temporaries are removed when the next run takes the directory's lock (``run_lock``).
#
# The mechanisms, the first two on Linux:
# - ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel sends SIGTERM the moment the parent dies. (Linux ties it to
#   the thread that forked the rank; both launchers start their ranks from their main thread.)
# - A watcher process (``python -m scale_refiner.engine.watchdog``, a child of the rank that dies with it) that
#   polls the parent and the launchers above it by pid and start time every ``POLL_S`` (the `deepspeed` runner's
#   death leaves its per-node ``deepspeed.launcher.launch`` running, which would not end the ranks) and sends
#   the SIGTERM, then the SIGKILL. A process, not a thread: it acts even when the rank's interpreter cannot run
#   a thread (a C loop holding the GIL, e.g. a communication op's set-up waiting for a peer that is gone).
# - Elsewhere: a thread that polls ``os.getppid()`` for a change, stops the run the same way and ends the
#   process after the grace.
# ``SCALE_REFINER_WATCH_LAUNCHER=0`` turns them off.
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
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
        if fields[0] in (b"Z", b"X"):  # dead, not yet reaped
            return None
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
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, signum, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _say(text: str) -> None:
    """One line on standard error, whatever became of it (a launcher gone may have taken the pipe's reader)."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


def watch_launcher(rank: int, grace_s: float = LAUNCHER_GRACE_S, poll_s: float = POLL_S):
    """Start the watch for this (launched) rank: see the comment above. Returns the watcher (a ``Popen`` or a
    thread), or None when turned off or already watched. Call after ``install_stop_signals`` (SIGTERM is then
    a stop request)."""
    if os.environ.get("SCALE_REFINER_WATCH_LAUNCHER", "1") == "0" or _watching:
        return None
    parent = os.getppid()
    chain = launcher_chain(parent)
    if _set_parent_death_signal(signal.SIGTERM) and chain:
        watcher = start_watcher(rank, chain, grace_s, poll_s)
        _watching.append(watcher)
        return watcher
    thread = threading.Thread(target=_watch_in_process, args=(rank, parent, grace_s, poll_s),
                              name="launcher-watch", daemon=True)
    _watching.append(thread)
    thread.start()
    return thread


def start_watcher(rank: int, chain, grace_s: float = LAUNCHER_GRACE_S, poll_s: float = POLL_S):
    """The watcher process of this process (rank ``rank``), watching ``chain`` ((pid, start time, command) each,
    as ``launcher_chain`` gives)."""
    watched = [f"{pid}:{started}:{command}" for pid, started, command in chain]
    # its own environment: no RANK / LOCAL_RANK, so that nothing takes it for a rank
    return subprocess.Popen([sys.executable, "-m", "scale_refiner.engine.watchdog", str(os.getpid()), str(rank),
                             str(grace_s), str(poll_s), *watched], stdin=subprocess.DEVNULL,
                            env={"PATH": os.environ.get("PATH", ""),
                                 "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})


def _lost(chain) -> Optional[str]:
    for pid, started, command in chain:
        stat = _proc_stat(pid)
        if stat is None or stat[1] != started:  # gone, or its pid taken by another process since
            return f"pid {pid} ({command})"
    return None


def _watcher_main(argv: List[str]) -> int:
    """The watcher process: ``<rank pid> <rank> <grace s> <poll s> <pid:start:command>...``."""
    target, rank, grace_s, poll_s = int(argv[0]), int(argv[1]), float(argv[2]), float(argv[3])
    chain = []
    for item in argv[4:]:
        pid, started, command = item.split(":", 2)
        chain.append((int(pid), int(started), command))
    _set_parent_death_signal(signal.SIGKILL)  # it goes with the rank
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the rank's to handle
    if os.getppid() != target:
        return 0
    rank_started = _proc_stat(target)[1] if _proc_stat(target) else None
    alive = lambda: rank_started is not None and (_proc_stat(target) or (0, None))[1] == rank_started  # noqa: E731
    while alive():
        lost = _lost(chain)
        if lost is not None:
            break
        time.sleep(poll_s)
    else:
        return 0
    _say(f"rank {rank}: its launcher {lost} is gone: stopping at the next step with a checkpoint (SIGTERM), "
         f"ending it in {grace_s:.0f} s otherwise")
    os.kill(target, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive():
        _say(f"error: rank {rank}: its launcher {lost} is gone and the run did not stop within {grace_s:.0f} s: "
             f"SIGKILL; checkpoints/latest names the last complete checkpoint")
        os.kill(target, signal.SIGKILL)
    return 0


def _watch_in_process(rank: int, parent: int, grace_s: float, poll_s: float) -> None:
    """Without /proc or prctl: the parent's pid, polled from a thread of the rank."""
    from scale_refiner.engine.run_control import request_stop
    while os.getppid() == parent:
        time.sleep(poll_s)
    request_stop(f"the loss of its launcher (pid {parent})")
    _say(f"rank {rank}: its launcher pid {parent} is gone: stopping at the next step with a checkpoint, leaving "
         f"within {grace_s:.0f} s")
    time.sleep(grace_s)
    _say(f"error: rank {rank}: its launcher pid {parent} is gone and the run did not stop within {grace_s:.0f} s: "
         f"leaving now; checkpoints/latest names the last complete checkpoint")
    os._exit(EXIT_LAUNCHER_LOST)


if __name__ == "__main__":
    sys.exit(_watcher_main(sys.argv[1:]))
