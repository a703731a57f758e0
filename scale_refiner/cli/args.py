"""What every command's argument parsing shares."""
from __future__ import annotations

import argparse


def parse_launched(parser: argparse.ArgumentParser, argv=None, intermixed: bool = False) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that the ``--local_rank=N`` the deepspeed launcher appends is dropped
    (every command reads its rank from the environment). ``intermixed``: options may follow the positionals."""
    parse = parser.parse_known_intermixed_args if intermixed else parser.parse_known_args
    args, unknown = parse(argv)
    unknown = [u for u in unknown if not u.startswith("--local_rank")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    return args
