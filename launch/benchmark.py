"""Throughput, MFU, memory and GPU-hour benchmark of a recipe, launched as the main job is launched.

A shim: the command is ``scale_refiner/cli/benchmark.py`` (also ``python -m scale_refiner.cli.benchmark``, ``scale-refiner benchmark``); this path
keeps working for the launchers (``deepspeed``, ``torchrun``) and scripts that name it.
"""
from scale_refiner.cli.benchmark import *  # noqa: F401,F403  (tests and tools load this file and call its main)
from scale_refiner.cli.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
