"""Host peak RSS per rank of building the model, through the public launchers only (issue #13 item 3).

A shim: the command is ``scale_refiner/cli/bench_build_memory.py`` (also ``python -m scale_refiner.cli.bench_build_memory``); this path
keeps working for the launchers (``deepspeed``, ``torchrun``) and scripts that name it.
"""
from scale_refiner.cli.bench_build_memory import *  # noqa: F401,F403  (tests and tools load this file and call its main)
from scale_refiner.cli.bench_build_memory import main

if __name__ == "__main__":
    raise SystemExit(main())
