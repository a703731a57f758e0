"""Head-norm benchmark: ``bn`` vs ``syncbn`` vs ``async`` (heads/async_bn.py), side by side in one run.

A shim: the command is ``scale_refiner/cli/bench_norm.py`` (also ``python -m scale_refiner.cli.bench_norm``); this path
keeps working for the launchers (``deepspeed``, ``torchrun``) and scripts that name it.
"""
from scale_refiner.cli.bench_norm import *  # noqa: F401,F403  (tests and tools load this file and call its main)
from scale_refiner.cli.bench_norm import main

if __name__ == "__main__":
    raise SystemExit(main())
