"""When a run saves and stops outside its schedule: stop signals (preemption) and time-based checkpoints.

A cluster ends a job by signalling it first: Slurm sends ``--signal`` (e.g. SIGUSR1) some seconds before the
end of the allocation and SIGTERM at it; Kubernetes and both launchers (``deepspeed``, ``torchrun``) pass
SIGTERM on to every rank and kill what is left 30 s later. A rank that receives one of ``run.stop_signals``
only records it. The trainer polls at the end of every ``run.control_every``-th step: a small all-reduce over a
host-side group (the ranks may not all have been signalled, or not at the same step), so every rank agrees on the
same step, writes the same checkpoint and leaves with ``EXIT_PREEMPTED``. The same poll carries rank 0's clock for
``run.save_every_minutes``, so the ranks agree on timed checkpoints too.

The loss of a rank's launcher (engine/watchdog.py, ``watch_launcher``) is acted on the same way, through
``request_stop``.

A signal that arrives outside the training loop (a stage's set-up, the final evaluation and exports) is acted on
at the next step, or not at all if none comes: the run then finishes or is killed by the launcher's deadline.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger("scale_refiner")

# The status every rank exits with after a stop signal and its checkpoint: EX_TEMPFAIL of sysexits.h, "try
# again later". A requeueing job script resumes on it (run.resume=auto); the launchers' own status differs
# (they were signalled too): look at the ranks' or at checkpoints/latest.
EXIT_PREEMPTED = 75

_received: List[str] = []
_installed: dict = {}


def _record(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def install_stop_signals(names: Sequence[str]) -> None:
    """From now on, each of ``names`` (e.g. ``["SIGTERM", "SIGUSR1"]``) is recorded instead of ending the
    process. Main thread only (Python's rule for signal handlers). Raises ``ValueError`` on an unknown name."""
    for name in names:
        try:
            number = signal.Signals[name]
        except KeyError:
            raise ValueError(f"config key 'run.stop_signals': unknown signal {name!r}") from None
        if name not in _installed:
            _installed[name] = signal.signal(number, _record)


def uninstall_stop_signals() -> None:
    """The handlers from before ``install_stop_signals`` back (tests, and code that runs several jobs)."""
    for name, previous in _installed.items():
        signal.signal(signal.Signals[name], previous)
    _installed.clear()
    _received.clear()


def request_stop(reason: str) -> None:
    """What a stop signal does, from any thread: the run checkpoints and stops at its next poll. ``reason`` is
    logged in the signal's place (e.g. "the loss of its launcher")."""
    _received.append(reason)


def describe_stop(reason: str) -> str:
    """``SIGTERM received``; a ``request_stop`` reason as it is."""
    return f"{reason} received" if reason.startswith("SIG") else reason


def received_signal() -> Optional[str]:
    """The first stop signal this process has received, if any."""
    return _received[0] if _received else None


class RunControl:
    """The per-step decision of whether to checkpoint (a stop signal, or ``save_every_minutes`` elapsed on rank 0)
    and whether to stop (a stop signal on any rank). Collective: every rank calls ``poll`` at the same steps."""

    def __init__(self, ctx, save_every_minutes: float = 0.0, every: int = 1):
        self.ctx = ctx
        self.save_every_s = 60.0 * save_every_minutes
        self.every = max(1, every)
        self.last_save = time.monotonic()
        self.signal: Optional[str] = None  # the signal that stopped the run, once agreed

    def saved(self) -> None:
        """A checkpoint was written (by whatever reason): the timed interval starts again."""
        self.last_save = time.monotonic()

    def poll(self, step: int) -> tuple:
        """``(save, stop)`` after ``step``; False, False between the polled steps."""
        if step % self.every:
            return False, False
        mine = received_signal()
        due = bool(self.save_every_s) and self.ctx.is_main and time.monotonic() - self.last_save >= self.save_every_s
        flags = torch.tensor([int(mine is not None), int(due)], dtype=torch.int32)  # host memory: no GPU sync
        if self.ctx.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.ctx.control_group)
        stop, due = bool(flags[0]), bool(flags[1])
        if stop:
            self.signal = mine or "a stop signal on another rank"
        return stop or due, stop
