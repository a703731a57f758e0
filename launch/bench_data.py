"""Images/s of the DALI pipeline and the torch reference pipeline on the same shards, cores and augmentation.

A shim: the command is ``scale_refiner/cli/bench_data.py`` (also ``python -m scale_refiner.cli.bench_data``); this path
keeps working for the launchers (``deepspeed``, ``torchrun``) and scripts that name it.
"""
from scale_refiner.cli.bench_data import *  # noqa: F401,F403  (tests and tools load this file and call its main)
from scale_refiner.cli.bench_data import main

if __name__ == "__main__":
    raise SystemExit(main())
