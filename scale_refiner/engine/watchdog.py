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
