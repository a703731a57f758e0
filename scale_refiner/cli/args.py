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


def run_reporting_faults(run, argv=None) -> int:
    """``run(argv)`` for a training command, with the faults every rank agrees on reported in one line: a diverged
    run or an unusable checkpoint (a full disk) exit 1, the last checkpoint standing; a resume this configuration
    must not continue exits 2."""
    from scale_refiner.engine.checkpoint import CheckpointError
    from scale_refiner.engine.divergence import DivergenceError
    from scale_refiner.engine.trainer import ResumeError
    try:
        return run(argv)
    except (DivergenceError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ResumeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
