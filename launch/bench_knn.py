"""Time the refine job's k-NN measurement (``scale_refiner.eval.knn.knn_of_state``) on 1 process and on N gloo CPU ranks,

A shim: the command is ``scale_refiner/cli/bench_knn.py`` (also ``python -m scale_refiner.cli.bench_knn``); this path
keeps working for the launchers (``deepspeed``, ``torchrun``) and scripts that name it.
"""
from scale_refiner.cli.bench_knn import *  # noqa: F401,F403  (tests and tools load this file and call its main)
from scale_refiner.cli.bench_knn import main

if __name__ == "__main__":
    raise SystemExit(main())
