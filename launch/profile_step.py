"""Profile one training step of a recipe (default: the CPU demo) with torch.profiler.

A shim: the command is ``scale_refiner/cli/profile_step.py`` (also ``python -m scale_refiner.cli.profile_step``); this path
keeps working for the launchers (``deepspeed``, ``torchrun``) and scripts that name it.
"""
from scale_refiner.cli.profile_step import *  # noqa: F401,F403  (tests and tools load this file and call its main)
from scale_refiner.cli.profile_step import main

if __name__ == "__main__":
    raise SystemExit(main())
