"""What every command's argument parsing shares."""
from __future__ import annotations

import argparse
import sys


def parse_launched(parser: argparse.ArgumentParser, argv=None, intermixed: bool = False) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that the ``--local_rank=N`` the deepspeed launcher appends is dropped
    (every command reads its rank from the environment). ``intermixed``: options may follow the positionals."""
    parse = parser.parse_known_intermixed_args if intermixed else parser.parse_known_args
    args, unknown = parse(argv)
    unknown = [u for u in unknown if not u.startswith("--local_rank")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    return args


# The exit statuses of the training commands (docs/training.md, "Exit statuses"); 73 (run_lock.EXIT_LOCKED) and
# 75 (run_control.EXIT_PREEMPTED) are defined where they arise.
EXIT_FAILED = 1  # the run failed: divergence, an unusable checkpoint, an uncaught exception
EXIT_USAGE = 2  # a usage, configuration or input error (a key, a file, weights of another model)
EXIT_IO = 74  # EX_IOERR: an output could not be written (permission, full disk or quota), the file named
DEBUG_ENV = "SCALE_REFINER_DEBUG"  # set to 1: the faults below raise with their traceback instead


def describe_os_error(err: OSError) -> str:
    """One line for a failed read or write: what failed, on which file. Without a file name (a write into an
    open file), where in the project it happened."""
    import errno
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}.get(
        err.errno, err.strerror or type(err).__name__)
    if err.filename is not None:
        target = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 is not None else "")
        return f"{what}: {target}"
    where = None
    tb = err.__traceback__
    while tb is not None:  # the innermost frame of the project's own code
        if "scale_refiner" in tb.tb_frame.f_code.co_filename:
            code = tb.tb_frame.f_code
            where = f"{code.co_filename.rsplit('scale_refiner', 1)[1].lstrip('/')}:{tb.tb_lineno} ({code.co_name})"
        tb = tb.tb_next
    return f"{what} ({err})" + (f", writing in scale_refiner/{where}" if where else "")


def _rank_local_fault() -> None:
    """A fault this rank alone may have met (its peers may be inside a collective): the process group is not
    torn down at exit (engine/distributed.py, end_job); the launcher ends the peers."""
    from scale_refiner.engine.distributed import mark_failed
    mark_failed()


def run_reporting_faults(run, argv=None) -> int:
    """``run(argv)`` for a training command, each fault of a known class reported in one ``error: ...`` line with
    a fixed exit status instead of a traceback (``SCALE_REFINER_DEBUG=1`` raises it instead, with its
    traceback): a diverged run or an unusable checkpoint exit 1, the last checkpoint standing; a resume this
    configuration must not continue, a configuration error or weights that do not fit the model exit 2; an
    output that cannot be written (permission, full disk or quota, the checkpoint's included) exits 74."""
    import os
    from scale_refiner.config import ConfigError
    from scale_refiner.engine.checkpoint import CheckpointError, OutOfSpaceError
    from scale_refiner.engine.divergence import DivergenceError
    from scale_refiner.engine.trainer import DataLossError, ResumeError
    from scale_refiner.models.weights import WeightsError
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return run(argv)
    except OutOfSpaceError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_IO
    except (DivergenceError, CheckpointError, DataLossError) as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (ResumeError, ConfigError) as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except WeightsError as err:
        if debug:
            raise
        _rank_local_fault()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        if debug:
            raise
        _rank_local_fault()
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return EXIT_IO
